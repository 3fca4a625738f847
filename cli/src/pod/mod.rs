//! `isola pod`: runs a Pod manifest through containerd's CRI the way
//! kubelet does (RunPodSandbox with the runtime handler, CreateContainer,
//! StartContainer, status polling; StopContainer with the grace period,
//! StopPodSandbox, RemovePodSandbox), for trying isola on a node without a
//! cluster and as the end-to-end tests' driver.

pub mod cri;
pub mod logs;
pub mod manifest;
pub mod portforward;
pub mod volumes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use k8s_cri::v1 as api;
use serde_json::json;

use self::cri::{
    Cri, PodPaths, PreparedVolume, LABEL_CONTAINER_NAME, LABEL_POD_NAME, LABEL_POD_NAMESPACE,
    LABEL_POD_UID,
};
use self::manifest::{Pod, VolumeKind};

/// How often status is polled, as kubelet's PLEG relists (1 s there).
const POLL: Duration = Duration::from_millis(200);
/// Where the manifest of a pod is kept, in its directory.
const MANIFEST: &str = "pod.yaml";

#[derive(Debug, Args)]
pub struct PodArgs {
    /// containerd's socket (a `unix://` prefix is allowed).
    #[arg(
        long,
        global = true,
        env = "ISOLA_POD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    address: String,
    /// Where pods' volumes, manifests and termination logs live (kubelet's
    /// /var/lib/kubelet/pods).
    #[arg(
        long,
        global = true,
        env = "ISOLA_POD_ROOT",
        default_value = "/var/lib/isola/pods"
    )]
    root: PathBuf,
    /// Where containerd writes the pods' CRI logs (kubelet's /var/log/pods).
    #[arg(
        long,
        global = true,
        env = "ISOLA_POD_LOG_ROOT",
        default_value = "/var/log/pods"
    )]
    log_root: PathBuf,
    /// The pod's namespace.
    #[arg(short = 'n', long, global = true, default_value = manifest::DEFAULT_NAMESPACE)]
    namespace: String,
    #[command(subcommand)]
    command: PodCommand,
}

#[derive(Debug, Subcommand)]
enum PodCommand {
    /// Runs the pod in FILE ("-": stdin) and waits until its containers
    /// have started. Run again on a running pod: its configMap volumes are
    /// updated (kubelet's atomic swap); nothing else changes.
    Apply {
        file: PathBuf,
        /// The runtime handler (default: spec.runtimeClassName, taken as a
        /// RuntimeClass whose handler has the same name; none: containerd's
        /// default runtime).
        #[arg(long)]
        handler: Option<String>,
        /// Seconds to wait for the containers to start.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// The pod's sandbox and containers: state, exit code, reason, times.
    Status {
        name: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Runs CMD in a container (ExecSync) and exits with its status.
    Exec {
        name: String,
        /// The container (default: the manifest's first).
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Seconds CMD may run (0: no limit).
        #[arg(long, default_value_t = 0)]
        timeout: i64,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Forwards 127.0.0.1:LOCAL to the pod's PORT until interrupted, as
    /// `kubectl port-forward` does (CRI PortForward; LOCAL 0: any free
    /// port, printed).
    PortForward {
        name: String,
        /// `[LOCAL:]PORT`.
        ports: String,
    },
    /// Prints a container's CRI log: stdout lines on stdout, stderr lines
    /// on stderr.
    Logs {
        name: String,
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Prefix each line with its time.
        #[arg(long)]
        timestamps: bool,
        /// The container's previous attempt (before its restart).
        #[arg(long)]
        previous: bool,
    },
    /// Container stats as JSON: ListContainerStats of the pod, or
    /// ContainerStats of one container.
    Stats {
        name: String,
        #[arg(short = 'c', long)]
        container: Option<String>,
    },
    /// Stops one container as kubelet does before a restart: SIGTERM, then
    /// SIGKILL after the grace period (StopContainer).
    Stop {
        name: String,
        #[arg(short = 'c', long)]
        container: String,
        /// Seconds between SIGTERM and SIGKILL (default: the manifest's
        /// terminationGracePeriodSeconds, else 30).
        #[arg(long)]
        grace: Option<i64>,
    },
    /// Starts a container that has exited again, in the same sandbox (the
    /// next attempt, as kubelet's restart does).
    Restart {
        name: String,
        #[arg(short = 'c', long)]
        container: String,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Stops the pod (SIGTERM, then SIGKILL after the grace period),
    /// removes it and its volumes.
    Delete {
        name: String,
        /// Seconds between SIGTERM and SIGKILL (default: the manifest's
        /// terminationGracePeriodSeconds, else 30).
        #[arg(long)]
        grace: Option<i64>,
    },
}

pub fn run(args: PodArgs) -> i32 {
    let runtime = match crate::runtime() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("isola pod: error: starting the runtime: {err}");
            return 1;
        }
    };
    match runtime.block_on(dispatch(args)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("isola pod: error: {err:#}");
            1
        }
    }
}

struct Ctx {
    cri: Cri,
    root: PathBuf,
    log_root: PathBuf,
    namespace: String,
}

async fn dispatch(args: PodArgs) -> Result<i32> {
    let socket = args
        .address
        .strip_prefix("unix://")
        .unwrap_or(&args.address)
        .to_string();
    let ctx = Ctx {
        cri: Cri::connect(Path::new(&socket)).await?,
        root: args.root,
        log_root: args.log_root,
        namespace: args.namespace,
    };
    match args.command {
        PodCommand::Apply {
            file,
            handler,
            timeout,
        } => apply(&ctx, &file, handler, Duration::from_secs(timeout)).await,
        PodCommand::Status { name, json } => status(&ctx, &name, json).await,
        PodCommand::Exec {
            name,
            container,
            timeout,
            cmd,
        } => exec(&ctx, &name, container, timeout, cmd).await,
        PodCommand::PortForward { name, ports } => {
            let (local, port) = portforward::parse_ports(&ports)?;
            let found = ctx.find(&name).await?;
            portforward::run(&ctx.cri, &found.sandbox.id, local, port).await
        }
        PodCommand::Logs {
            name,
            container,
            timestamps,
            previous,
        } => logs(&ctx, &name, container, timestamps, previous).await,
        PodCommand::Stats { name, container } => stats(&ctx, &name, container).await,
        PodCommand::Stop {
            name,
            container,
            grace,
        } => stop(&ctx, &name, &container, grace).await,
        PodCommand::Restart {
            name,
            container,
            timeout,
        } => restart(&ctx, &name, &container, Duration::from_secs(timeout)).await,
        PodCommand::Delete { name, grace } => delete(&ctx, &name, grace).await,
    }
}

fn status_error(what: &str, status: tonic::Status) -> anyhow::Error {
    anyhow!("{what}: {}", status.message())
}

fn new_uid() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .context("reading /proc/sys/kernel/random/uuid")?
        .trim()
        .to_string())
}

/// One pod as found through CRI: its sandbox and manifest.
struct Found {
    sandbox: api::PodSandbox,
    uid: String,
    pod: Pod,
    paths: PodPaths,
}

impl Ctx {
    async fn sandboxes(&self, name: &str) -> Result<Vec<api::PodSandbox>> {
        let mut labels = HashMap::new();
        labels.insert(LABEL_POD_NAME.to_string(), name.to_string());
        labels.insert(LABEL_POD_NAMESPACE.to_string(), self.namespace.clone());
        let mut sandboxes = self
            .cri
            .runtime
            .clone()
            .list_pod_sandbox(api::ListPodSandboxRequest {
                filter: Some(api::PodSandboxFilter {
                    label_selector: labels,
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| status_error("ListPodSandbox", s))?
            .into_inner()
            .items;
        sandboxes.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        Ok(sandboxes)
    }

    async fn find(&self, name: &str) -> Result<Found> {
        let sandbox = self
            .sandboxes(name)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("pod {}/{name}: not found", self.namespace))?;
        self.found(sandbox)
    }

    fn found(&self, sandbox: api::PodSandbox) -> Result<Found> {
        let uid = sandbox
            .labels
            .get(LABEL_POD_UID)
            .cloned()
            .ok_or_else(|| anyhow!("sandbox {}: no {LABEL_POD_UID} label", sandbox.id))?;
        // The label is anyone's who can call CRI; it becomes a path.
        manifest::check_uid(
            &format!("sandbox {}: label {LABEL_POD_UID}", sandbox.id),
            &uid,
        )?;
        let manifest = self.root.join(&uid).join(MANIFEST);
        let text = std::fs::read_to_string(&manifest)
            .with_context(|| format!("sandbox {}: reading {}", sandbox.id, manifest.display()))?;
        let mut pod = Pod::parse(&text).with_context(|| manifest.display().to_string())?;
        // A manifest without a namespace was applied to the one it was found in.
        pod.metadata
            .namespace
            .get_or_insert_with(|| self.namespace.clone());
        let paths = PodPaths::new(&self.root, &self.log_root, &pod, &uid);
        Ok(Found {
            sandbox,
            uid,
            pod,
            paths,
        })
    }

    async fn containers(&self, sandbox: &str) -> Result<Vec<api::Container>> {
        let mut list = self
            .cri
            .runtime
            .clone()
            .list_containers(api::ListContainersRequest {
                filter: Some(api::ContainerFilter {
                    pod_sandbox_id: sandbox.to_string(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| status_error("ListContainers", s))?
            .into_inner()
            .containers;
        list.sort_by_key(|c| c.created_at);
        Ok(list)
    }

    async fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
        self.cri
            .runtime
            .clone()
            .container_status(api::ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            })
            .await
            .map_err(|s| status_error(&format!("ContainerStatus {id}"), s))?
            .into_inner()
            .status
            .ok_or_else(|| anyhow!("ContainerStatus {id}: no status"))
    }

    /// The latest attempt of container `name` (or of the manifest's
    /// first), and the one before it.
    async fn pick(
        &self,
        found: &Found,
        name: Option<&str>,
        previous: bool,
    ) -> Result<api::Container> {
        let name = name.unwrap_or(&found.pod.spec.containers[0].name);
        let mut attempts: Vec<api::Container> = self
            .containers(&found.sandbox.id)
            .await?
            .into_iter()
            .filter(|c| c.labels.get(LABEL_CONTAINER_NAME).map(String::as_str) == Some(name))
            .collect();
        attempts.sort_by_key(|c| c.metadata.as_ref().map_or(0, |m| m.attempt));
        if previous {
            attempts.pop();
        }
        attempts.pop().ok_or_else(|| {
            anyhow!(
                "pod {}/{}: no {}container {name:?}",
                self.namespace,
                found.pod.metadata.name,
                if previous { "previous attempt of " } else { "" }
            )
        })
    }

    async fn ensure_image(&self, image: &str) -> Result<()> {
        let spec = api::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        };
        let present = self
            .cri
            .images
            .clone()
            .image_status(api::ImageStatusRequest {
                image: Some(spec.clone()),
                verbose: false,
            })
            .await
            .map_err(|s| status_error(&format!("ImageStatus {image}"), s))?
            .into_inner()
            .image
            .is_some();
        if present {
            return Ok(());
        }
        // kubelet's IfNotPresent.
        self.cri
            .images
            .clone()
            .pull_image(api::PullImageRequest {
                image: Some(spec),
                ..Default::default()
            })
            .await
            .map_err(|s| {
                anyhow!(
                    "image {image} is not in containerd's k8s.io namespace and pulling it failed ({}); \
                     import it with `ctr -n k8s.io image import FILE`",
                    s.message()
                )
            })?;
        Ok(())
    }

    async fn create_and_start(
        &self,
        found: &Found,
        index: usize,
        attempt: u32,
        volumes: &[PreparedVolume],
        sandbox_config: &api::PodSandboxConfig,
    ) -> Result<String> {
        let name = &found.pod.spec.containers[index].name;
        let config = cri::container_config(
            &found.pod,
            &found.uid,
            index,
            attempt,
            volumes,
            &found.paths,
        )?;
        let id = self
            .cri
            .runtime
            .clone()
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: found.sandbox.id.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .map_err(|s| status_error(&format!("container {name:?}: CreateContainer"), s))?
            .into_inner()
            .container_id;
        self.cri
            .runtime
            .clone()
            .start_container(api::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(|s| status_error(&format!("container {name:?}: StartContainer"), s))?;
        Ok(id)
    }

    /// Polls until no container of `ids` is still CREATED.
    async fn wait_started(&self, ids: &[String], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for id in ids {
            loop {
                let s = self.container_status(id).await?;
                if s.state != api::ContainerState::ContainerCreated as i32 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("container {id}: not started after {} s", timeout.as_secs());
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }
}

fn prepared_volumes(found: &Found) -> Result<Vec<PreparedVolume>> {
    found
        .pod
        .spec
        .volumes
        .iter()
        .map(|v| {
            let host_path = match v.kind()? {
                VolumeKind::HostPath { path, .. } => PathBuf::from(path),
                VolumeKind::EmptyDir { .. } => found.paths.volume_dir(volumes::EMPTY_DIR, &v.name),
                VolumeKind::ConfigMap { .. } => {
                    found.paths.volume_dir(volumes::CONFIG_MAP, &v.name)
                }
            };
            Ok(PreparedVolume {
                name: v.name.clone(),
                host_path,
            })
        })
        .collect()
}

async fn apply(ctx: &Ctx, file: &Path, handler: Option<String>, timeout: Duration) -> Result<i32> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the manifest from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let mut pod = Pod::parse(&text).with_context(|| file.display().to_string())?;
    // As kubectl: a manifest without a namespace goes to -n's; one with a
    // namespace must agree with an -n given.
    match &pod.metadata.namespace {
        None => pod.metadata.namespace = Some(ctx.namespace.clone()),
        Some(ns) if *ns != ctx.namespace && ctx.namespace != manifest::DEFAULT_NAMESPACE => {
            bail!("the manifest's namespace {ns} is not -n {}", ctx.namespace)
        }
        Some(_) => {}
    }
    let ctx = Ctx {
        cri: ctx.cri.clone(),
        root: ctx.root.clone(),
        log_root: ctx.log_root.clone(),
        namespace: pod.namespace().to_string(),
    };
    let name = pod.metadata.name.clone();
    // A running pod: only its configMaps change.
    if let Some(sandbox) = ctx
        .sandboxes(&name)
        .await?
        .into_iter()
        .find(|s| s.state == api::PodSandboxState::SandboxReady as i32)
    {
        let found = ctx.found(sandbox)?;
        let n = volumes::update_config_maps(&pod, &found.paths)?;
        std::fs::write(found.paths.dir.join(MANIFEST), &text)
            .with_context(|| format!("writing {}", found.paths.dir.join(MANIFEST).display()))?;
        println!(
            "pod/{name} {} (configMap volumes updated: {n})",
            found.sandbox.id
        );
        return Ok(0);
    }
    let handler = handler
        .or_else(|| pod.spec.runtime_class_name.clone())
        .unwrap_or_default();
    let uid = match &pod.metadata.uid {
        Some(uid) => uid.clone(),
        None => new_uid()?,
    };
    let paths = PodPaths::new(&ctx.root, &ctx.log_root, &pod, &uid);
    let volumes = volumes::prepare(&pod, &paths)?;
    let setup = (|| -> Result<()> {
        std::fs::write(paths.dir.join(MANIFEST), &text)
            .with_context(|| format!("writing {}", paths.dir.join(MANIFEST).display()))?;
        std::fs::create_dir_all(&paths.log_dir)
            .with_context(|| format!("creating {}", paths.log_dir.display()))
    })();
    if let Err(err) = setup {
        let _ = volumes::remove(&paths);
        return Err(err);
    }
    let sandbox_config = cri::sandbox_config(&pod, &uid, &paths)?;
    let run = ctx
        .cri
        .runtime
        .clone()
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: handler.clone(),
        })
        .await;
    let sandbox_id = match run {
        Ok(r) => r.into_inner().pod_sandbox_id,
        Err(s) => {
            let _ = volumes::remove(&paths);
            let _ = std::fs::remove_dir_all(&paths.log_dir);
            remove_cgroup(&paths);
            bail!(
                "pod {}/{name}: RunPodSandbox (handler {handler:?}): {}",
                ctx.namespace,
                s.message()
            );
        }
    };
    let found = Found {
        sandbox: api::PodSandbox {
            id: sandbox_id.clone(),
            ..Default::default()
        },
        uid,
        pod,
        paths,
    };
    let mut ids = Vec::new();
    let started = async {
        for (index, c) in found.pod.spec.containers.iter().enumerate() {
            ctx.ensure_image(&c.image)
                .await
                .with_context(|| format!("container {:?}", c.name))?;
            ids.push(
                ctx.create_and_start(&found, index, 0, &volumes, &sandbox_config)
                    .await?,
            );
        }
        ctx.wait_started(&ids, timeout).await
    }
    .await;
    if let Err(err) = started {
        // As kubelet would: the pod does not stay half made.
        if let Err(e) = remove_pod(&ctx, &found, 0).await {
            eprintln!("isola pod: removing the failed pod: {e:#}");
        }
        return Err(err.context(format!("pod {}/{name}", ctx.namespace)));
    }
    println!("pod/{name} {sandbox_id}");
    Ok(0)
}

fn state_name(state: i32) -> &'static str {
    match api::ContainerState::try_from(state) {
        Ok(api::ContainerState::ContainerCreated) => "created",
        Ok(api::ContainerState::ContainerRunning) => "running",
        Ok(api::ContainerState::ContainerExited) => "exited",
        _ => "unknown",
    }
}

async fn status(ctx: &Ctx, name: &str, as_json: bool) -> Result<i32> {
    let found = ctx.find(name).await?;
    let sandbox = ctx
        .cri
        .runtime
        .clone()
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: found.sandbox.id.clone(),
            verbose: false,
        })
        .await
        .map_err(|s| status_error("PodSandboxStatus", s))?
        .into_inner()
        .status
        .ok_or_else(|| anyhow!("PodSandboxStatus: no status"))?;
    let mut containers = Vec::new();
    for c in ctx.containers(&found.sandbox.id).await? {
        let s = ctx.container_status(&c.id).await?;
        containers.push(json!({
            "name": s.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
            "attempt": s.metadata.as_ref().map_or(0, |m| m.attempt),
            "id": s.id,
            "state": state_name(s.state),
            "exit_code": s.exit_code,
            "reason": s.reason,
            "message": s.message,
            "created_at": s.created_at,
            "started_at": s.started_at,
            "finished_at": s.finished_at,
            "log_path": s.log_path,
            "image": s.image.map(|i| i.image).unwrap_or_default(),
        }));
    }
    let ready = sandbox.state == api::PodSandboxState::SandboxReady as i32;
    let ip = sandbox
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    let report = json!({
        "name": name,
        "namespace": ctx.namespace,
        "uid": found.uid,
        "id": sandbox.id,
        "state": if ready { "ready" } else { "notready" },
        "ip": ip,
        "runtime_handler": sandbox.runtime_handler,
        "created_at": sandbox.created_at,
        "containers": containers,
    });
    if as_json {
        println!("{report}");
    } else {
        println!(
            "pod {}/{name}  sandbox {}  {}  ip {}  handler {}",
            ctx.namespace,
            sandbox.id,
            if ready { "ready" } else { "notready" },
            if ip.is_empty() { "-" } else { &ip },
            if sandbox.runtime_handler.is_empty() {
                "(default)"
            } else {
                &sandbox.runtime_handler
            },
        );
        for c in report["containers"].as_array().into_iter().flatten() {
            println!(
                "  {:<16} attempt {:<2} {:<8} exit {:<4} {} {}",
                c["name"].as_str().unwrap_or(""),
                c["attempt"],
                c["state"].as_str().unwrap_or(""),
                c["exit_code"],
                c["reason"].as_str().unwrap_or(""),
                c["id"].as_str().unwrap_or(""),
            );
        }
    }
    Ok(0)
}

async fn exec(
    ctx: &Ctx,
    name: &str,
    container: Option<String>,
    timeout: i64,
    cmd: Vec<String>,
) -> Result<i32> {
    use std::io::Write;
    let found = ctx.find(name).await?;
    let c = ctx.pick(&found, container.as_deref(), false).await?;
    let reply = ctx
        .cri
        .runtime
        .clone()
        .exec_sync(api::ExecSyncRequest {
            container_id: c.id.clone(),
            cmd,
            timeout,
        })
        .await
        .map_err(|s| status_error(&format!("ExecSync in {}", c.id), s))?
        .into_inner();
    std::io::stdout()
        .write_all(&reply.stdout)
        .context("stdout")?;
    std::io::stderr()
        .write_all(&reply.stderr)
        .context("stderr")?;
    Ok(reply.exit_code)
}

async fn logs(
    ctx: &Ctx,
    name: &str,
    container: Option<String>,
    timestamps: bool,
    previous: bool,
) -> Result<i32> {
    let found = ctx.find(name).await?;
    let c = ctx.pick(&found, container.as_deref(), previous).await?;
    let path = ctx.container_status(&c.id).await?.log_path;
    let file = std::fs::File::open(&path).with_context(|| format!("reading the log {path}"))?;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    logs::copy(
        std::io::BufReader::new(file),
        &mut out,
        &mut err,
        timestamps,
    )
    .with_context(|| path.clone())?;
    Ok(0)
}

fn stats_json(s: &api::ContainerStats) -> serde_json::Value {
    let attrs = s.attributes.as_ref();
    json!({
        "id": attrs.map(|a| a.id.clone()).unwrap_or_default(),
        "name": attrs.and_then(|a| a.metadata.as_ref()).map(|m| m.name.clone()).unwrap_or_default(),
        "cpu_usage_core_nano_seconds": s.cpu.as_ref().and_then(|c| c.usage_core_nano_seconds.as_ref()).map(|v| v.value),
        "memory_working_set_bytes": s.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref()).map(|v| v.value),
        "memory_usage_bytes": s.memory.as_ref().and_then(|m| m.usage_bytes.as_ref()).map(|v| v.value),
    })
}

async fn stats(ctx: &Ctx, name: &str, container: Option<String>) -> Result<i32> {
    let found = ctx.find(name).await?;
    let list: Vec<serde_json::Value> = match container {
        Some(c) => {
            let c = ctx.pick(&found, Some(&c), false).await?;
            let s = ctx
                .cri
                .runtime
                .clone()
                .container_stats(api::ContainerStatsRequest {
                    container_id: c.id.clone(),
                })
                .await
                .map_err(|s| status_error(&format!("ContainerStats {}", c.id), s))?
                .into_inner()
                .stats;
            s.iter().map(stats_json).collect()
        }
        None => ctx
            .cri
            .runtime
            .clone()
            .list_container_stats(api::ListContainerStatsRequest {
                filter: Some(api::ContainerStatsFilter {
                    pod_sandbox_id: found.sandbox.id.clone(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| status_error("ListContainerStats", s))?
            .into_inner()
            .stats
            .iter()
            .map(stats_json)
            .collect(),
    };
    println!("{}", serde_json::Value::Array(list));
    Ok(0)
}

async fn stop(ctx: &Ctx, name: &str, container: &str, grace: Option<i64>) -> Result<i32> {
    let found = ctx.find(name).await?;
    let c = ctx.pick(&found, Some(container), false).await?;
    let grace = grace.unwrap_or_else(|| found.pod.grace_secs());
    ctx.cri
        .runtime
        .clone()
        .stop_container(api::StopContainerRequest {
            container_id: c.id.clone(),
            timeout: grace,
        })
        .await
        .map_err(|s| status_error(&format!("StopContainer {}", c.id), s))?;
    println!("container/{container} {} stopped", c.id);
    Ok(0)
}

async fn restart(ctx: &Ctx, name: &str, container: &str, timeout: Duration) -> Result<i32> {
    let found = ctx.find(name).await?;
    let index = found
        .pod
        .spec
        .containers
        .iter()
        .position(|c| c.name == container)
        .ok_or_else(|| {
            anyhow!(
                "pod {}/{name}: no container {container:?} in its manifest",
                ctx.namespace
            )
        })?;
    let last = ctx.pick(&found, Some(container), false).await?;
    if last.state != api::ContainerState::ContainerExited as i32 {
        bail!(
            "container {container:?} ({}) is {}: only an exited container restarts",
            last.id,
            state_name(last.state)
        );
    }
    let status = ctx.container_status(&last.id).await?;
    if !found.pod.restarts(status.exit_code) {
        bail!(
            "container {container:?} exited with {} and the pod's restartPolicy is {:?}: kubelet would not restart it",
            status.exit_code,
            found.pod.spec.restart_policy.unwrap_or(manifest::RestartPolicy::Always)
        );
    }
    let attempt = last.metadata.as_ref().map_or(0, |m| m.attempt) + 1;
    volumes::touch_termination_log(&found.paths, container, attempt)?;
    let volumes = prepared_volumes(&found)?;
    let sandbox_config = cri::sandbox_config(&found.pod, &found.uid, &found.paths)?;
    let id = ctx
        .create_and_start(&found, index, attempt, &volumes, &sandbox_config)
        .await?;
    ctx.wait_started(std::slice::from_ref(&id), timeout).await?;
    println!("container/{container} {id} attempt {attempt}");
    Ok(0)
}

async fn delete(ctx: &Ctx, name: &str, grace: Option<i64>) -> Result<i32> {
    let sandboxes = ctx.sandboxes(name).await?;
    if sandboxes.is_empty() {
        bail!("pod {}/{name}: not found", ctx.namespace);
    }
    for sandbox in sandboxes {
        let found = ctx.found(sandbox)?;
        let grace = grace.unwrap_or_else(|| found.pod.grace_secs());
        remove_pod(ctx, &found, grace).await?;
    }
    println!("pod/{name} deleted");
    Ok(0)
}

/// kubelet's pod teardown: every running container stopped at once with
/// the grace period, the sandbox stopped, then everything removed.
async fn remove_pod(ctx: &Ctx, found: &Found, grace: i64) -> Result<()> {
    let containers = ctx.containers(&found.sandbox.id).await?;
    let stops = containers
        .iter()
        .filter(|c| c.state != api::ContainerState::ContainerExited as i32)
        .map(|c| {
            let mut rt = ctx.cri.runtime.clone();
            let id = c.id.clone();
            async move {
                rt.stop_container(api::StopContainerRequest {
                    container_id: id.clone(),
                    timeout: grace,
                })
                .await
                .map_err(|s| status_error(&format!("StopContainer {id}"), s))
            }
        });
    for result in futures::future::join_all(stops).await {
        result?;
    }
    let mut rt = ctx.cri.runtime.clone();
    rt.stop_pod_sandbox(api::StopPodSandboxRequest {
        pod_sandbox_id: found.sandbox.id.clone(),
    })
    .await
    .map_err(|s| status_error("StopPodSandbox", s))?;
    for c in &containers {
        rt.remove_container(api::RemoveContainerRequest {
            container_id: c.id.clone(),
        })
        .await
        .map_err(|s| status_error(&format!("RemoveContainer {}", c.id), s))?;
    }
    rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
        pod_sandbox_id: found.sandbox.id.clone(),
    })
    .await
    .map_err(|s| status_error("RemovePodSandbox", s))?;
    volumes::remove(&found.paths)?;
    match std::fs::remove_dir_all(&found.paths.log_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing {}", found.paths.log_dir.display()))
        }
    }
    remove_cgroup(&found.paths);
    Ok(())
}

/// kubelet removes a pod's cgroup once its containers are gone.
fn remove_cgroup(paths: &PodPaths) {
    let dir = Path::new("/sys/fs/cgroup").join(paths.cgroup_parent.trim_start_matches('/'));
    let _ = std::fs::remove_dir(dir);
}
