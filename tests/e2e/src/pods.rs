//! Kubernetes pods through containerd's CRI, driven by `isola pod` the way
//! kubelet drives CRI: the test binary's private containerd
//! ([`Containerd::shared`]) with the pause and busybox images imported into
//! the `k8s.io` namespace, a CNI bridge on 198.18.0.0/24, and checks that a
//! removed pod left nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::containerd::{processes_containing, text, wait_output, Containerd};
use crate::containers::release_binary;
use crate::project_dir;

/// The busybox image as pods name it.
pub const BUSYBOX: &str = crate::containerd::BUSYBOX;
/// The runtime handler of isola pods (configs/containerd-isola.toml).
pub const ISOLA: &str = "isola";
/// Deadline of one `isola pod` command: a VM boot in the emulated host,
/// and for delete a grace period.
pub const POD_DEADLINE: Duration = Duration::from_secs(300);

/// The pods' side of the test binary's containerd.
#[derive(Debug)]
pub struct Pods {
    pub containerd: &'static Containerd,
    /// `isola pod --root`: volumes, manifests, termination logs.
    pub root: PathBuf,
    /// `isola pod --log-root`: the CRI logs.
    pub log_root: PathBuf,
    isola: PathBuf,
}

static SHARED: OnceLock<Pods> = OnceLock::new();

impl Pods {
    /// containerd (started on first use) with the pause, busybox and
    /// busybox-user images in `k8s.io`.
    pub fn shared() -> &'static Pods {
        SHARED.get_or_init(|| Pods::init().expect("setting up CRI pods"))
    }

    fn init() -> Result<Pods> {
        Pods::on(Containerd::shared())
    }

    /// Pods through `containerd` (its images imported into `k8s.io`).
    pub fn on(containerd: &'static Containerd) -> Result<Pods> {
        let project = project_dir();
        for image in ["pause.tar", "busybox.tar", "busybox-user.tar"] {
            let tar = project.join("build/images").join(image);
            ensure!(
                tar.exists(),
                "{} is missing: run `make pause-image busybox-image`",
                tar.display()
            );
            let out =
                containerd.ctr(&["-n", "k8s.io", "image", "import", &tar.to_string_lossy()])?;
            ensure!(
                out.status.success(),
                "importing {image} into k8s.io: {}",
                text(&out.stderr)
            );
        }
        let base = containerd.dir.join("pods");
        Ok(Pods {
            containerd,
            root: base.join("root"),
            log_root: base.join("logs"),
            isola: release_binary("isola")?,
        })
    }

    /// `isola pod ARGS` against this containerd.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.isola);
        cmd.arg("pod")
            .args(args)
            .env("ISOLA_POD_ADDRESS", &self.containerd.sock)
            .env("ISOLA_POD_ROOT", &self.root)
            .env("ISOLA_POD_LOG_ROOT", &self.log_root);
        cmd
    }

    /// Runs `isola pod ARGS` with a deadline, stdin from `input`, and
    /// prints its time.
    pub fn pod(&self, args: &[&str], input: Option<&str>) -> Result<Output> {
        self.run_pod(args, input, true)
    }

    fn run_pod(&self, args: &[&str], input: Option<&str>, timed: bool) -> Result<Output> {
        let mut child = self
            .command(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning isola pod")?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            use std::io::Write;
            stdin.write_all(text.as_bytes())?;
        }
        let started = Instant::now();
        let out = wait_output(child, POD_DEADLINE);
        // The test's timeline (shown when it fails, or with --nocapture).
        if timed {
            eprintln!(
                "isola pod {}: {:.1} s",
                args.join(" "),
                started.elapsed().as_secs_f64()
            );
        }
        out
    }

    /// `isola pod apply -` of `manifest`; the sandbox id.
    pub fn apply(&self, manifest: &str) -> Result<String> {
        let out = self.pod(&["apply", "-"], Some(manifest))?;
        ensure!(
            out.status.success(),
            "{}",
            self.report("isola pod apply", &out)
        );
        let printed = text(&out.stdout);
        printed
            .split_whitespace()
            .nth(1)
            .map(str::to_string)
            .with_context(|| format!("isola pod apply printed {printed:?}"))
    }

    /// `isola pod status --json NAME`.
    pub fn status(&self, name: &str) -> Result<Value> {
        self.status_of(name, true)
    }

    fn status_of(&self, name: &str, timed: bool) -> Result<Value> {
        let out = self.run_pod(&["status", "--json", name], None, timed)?;
        ensure!(
            out.status.success(),
            "{}",
            self.report("isola pod status", &out)
        );
        serde_json::from_slice(&out.stdout).context("isola pod status --json")
    }

    /// The latest attempt of container `container` in `status`.
    pub fn container<'a>(status: &'a Value, container: &str) -> Option<&'a Value> {
        status["containers"]
            .as_array()?
            .iter()
            .filter(|c| c["name"] == container)
            .max_by_key(|c| c["attempt"].as_u64())
    }

    /// Polls status until `container` is in `state` (created, running,
    /// exited); its status then.
    pub fn wait_state(&self, name: &str, container: &str, state: &str) -> Result<Value> {
        let started = Instant::now();
        let deadline = started + POD_DEADLINE;
        loop {
            // Its polls untimed: the wait prints its own time.
            let status = self.status_of(name, false)?;
            if let Some(c) = Self::container(&status, container) {
                if c["state"] == state {
                    eprintln!(
                        "pod {name}: {container} {state} after {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(c.clone());
                }
            }
            if Instant::now() > deadline {
                bail!("pod {name}: container {container} not {state}: {status:#}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `isola pod exec NAME -c C -- CMD`.
    pub fn exec(&self, name: &str, container: &str, cmd: &[&str]) -> Result<Output> {
        let mut args = vec!["exec", name, "-c", container, "--"];
        args.extend_from_slice(cmd);
        self.pod(&args, None)
    }

    /// `exec` that must succeed; its stdout.
    pub fn sh(&self, name: &str, container: &str, script: &str) -> Result<String> {
        let out = self.exec(name, container, &["sh", "-c", script])?;
        ensure!(
            out.status.success(),
            "{}",
            self.report(&format!("exec in {name}/{container}: {script}"), &out)
        );
        Ok(text(&out.stdout))
    }

    /// Which of [`OFFLOAD_FEATURE_BITS`] the guest's virtio-net device
    /// negotiated, read in container `container` of isola pod `name` from
    /// the guest's sysfs (`features`: character i is bit i). An error if
    /// the guest has no virtio-net device.
    pub fn guest_offloads(&self, name: &str, container: &str) -> Result<Vec<usize>> {
        let features = self.sh(
            name,
            container,
            "for d in /sys/bus/virtio/devices/*; do \
             [ \"$(cat $d/device)\" = 0x0001 ] && cat $d/features; done; true",
        )?;
        let line = features
            .lines()
            .next()
            .filter(|l| l.len() >= 32 && l.bytes().all(|b| b == b'0' || b == b'1'))
            .with_context(|| {
                format!("pod {name}: no virtio-net features in the guest: {features:?}")
            })?;
        Ok(OFFLOAD_FEATURE_BITS
            .into_iter()
            .filter(|&bit| line.as_bytes()[bit] == b'1')
            .collect())
    }

    /// `isola pod logs NAME -c C`: (stdout, stderr).
    pub fn logs(&self, name: &str, container: &str) -> Result<(String, String)> {
        let out = self.pod(&["logs", name, "-c", container], None)?;
        ensure!(
            out.status.success(),
            "{}",
            self.report("isola pod logs", &out)
        );
        Ok((text(&out.stdout), text(&out.stderr)))
    }

    /// `isola pod delete NAME` (with `--grace` if given), then checks that
    /// pod `name` with sandbox `id` left nothing.
    pub fn delete(&self, name: &str, id: &str, grace: Option<u32>) -> Result<()> {
        let grace = grace.map(|g| g.to_string());
        let mut args = vec!["delete", name];
        if let Some(g) = &grace {
            args.extend_from_slice(&["--grace", g]);
        }
        let out = self.pod(&args, None)?;
        ensure!(
            out.status.success(),
            "{}",
            self.report("isola pod delete", &out)
        );
        self.assert_clean(name, id)
    }

    /// Nothing of pod `name` with sandbox `id` is left: no shim, VMM or
    /// virtiofsd, run directory or mount (the shim's checks), no process
    /// naming the sandbox, no tap, and no directory of `isola pod` (its
    /// volumes, manifest and logs) or mount there.
    pub fn assert_clean(&self, name: &str, id: &str) -> Result<()> {
        self.containerd.assert_clean(id)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let problems = self.leftovers(name, id)?;
            if problems.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("pod {name} (sandbox {id}) left: {problems:#?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn leftovers(&self, name: &str, id: &str) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for (pid, cmd) in processes_containing(id) {
            if !cmd.contains("isola pod") {
                problems.push(format!("process {pid}: {cmd}"));
            }
        }
        let links = Command::new("ip").args(["-o", "link", "show"]).output()?;
        for line in text(&links.stdout).lines() {
            if line.contains("_isola") {
                problems.push(format!("link: {line}"));
            }
        }
        // The pod's directories: its log directory by name, its volume
        // directory by the manifest in it.
        let mut dirs = Vec::new();
        let log_prefix = format!("default_{name}_");
        for e in std::fs::read_dir(&self.log_root)
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(&log_prefix) {
                dirs.push(e.path());
            }
        }
        let own = format!("\n  name: {name}\n");
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let manifest = std::fs::read_to_string(e.path().join("pod.yaml")).unwrap_or_default();
            if manifest.contains(&own) || !e.path().join("pod.yaml").exists() {
                dirs.push(e.path());
            }
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for dir in dirs {
            problems.push(format!("{} left", dir.display()));
            for line in mountinfo.lines() {
                if line.contains(&*dir.to_string_lossy()) {
                    problems.push(format!("mount: {line}"));
                }
            }
        }
        Ok(problems)
    }

    /// Deletes pods `names` (grace 0) when dropped, if they still exist: a
    /// failed test does not leave its pods to the next.
    pub fn guard(&self, names: &[&str]) -> PodGuard<'_> {
        PodGuard {
            pods: self,
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    /// A failed `isola pod` command, with the end of containerd's log
    /// (the shims log there).
    pub fn report(&self, what: &str, out: &Output) -> String {
        self.containerd.report(what, out)
    }

    /// The network namespace of pod sandbox `id` (its OCI spec's, as
    /// containerd's `ctr containers info` shows it).
    pub fn netns_of(&self, id: &str) -> Result<PathBuf> {
        let out = self
            .containerd
            .ctr(&["-n", "k8s.io", "containers", "info", id])?;
        ensure!(
            out.status.success(),
            "{}",
            self.report("ctr containers info", &out)
        );
        let info: Value = serde_json::from_slice(&out.stdout).context("ctr containers info")?;
        info["Spec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|nss| {
                nss.iter()
                    .find(|ns| ns["type"] == "network")
                    .and_then(|ns| ns["path"].as_str())
            })
            .map(PathBuf::from)
            .with_context(|| format!("sandbox {id} has no network namespace path"))
    }

    /// The network namespace paths CRI made (`/var/run/netns/cni-*`).
    pub fn netns_paths() -> Vec<PathBuf> {
        std::fs::read_dir(Path::new("/var/run/netns"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

/// A pod manifest: `name`, handler `runtime_class` ("" for containerd's
/// default, runc), `spec_extra` (YAML lines at the spec's level, indented
/// two spaces) and `containers` (YAML list items, indented two spaces).
pub fn manifest(name: &str, runtime_class: &str, spec_extra: &str, containers: &str) -> String {
    let class = if runtime_class.is_empty() {
        String::new()
    } else {
        format!("  runtimeClassName: {runtime_class}\n")
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{class}  terminationGracePeriodSeconds: 5\n{spec_extra}  containers:\n{containers}"
    )
}

/// The pod annotation that turns its virtio-net offloads off (the test
/// containerd's isola config lets pods set `net_offloads`).
pub const NO_OFFLOADS: (&str, &str) = ("io.isola.config.net_offloads", "false");

/// `manifest` (of [`manifest`]) with one annotation in its metadata.
pub fn annotate(manifest: &str, (key, value): (&str, &str)) -> String {
    manifest.replacen(
        "metadata:\n",
        &format!("metadata:\n  annotations:\n    {key}: \"{value}\"\n"),
        1,
    )
}

/// The virtio-net checksum and TSO feature bits a guest negotiated.
pub const OFFLOAD_FEATURE_BITS: [usize; 6] = [
    0,  // CSUM
    1,  // GUEST_CSUM
    7,  // GUEST_TSO4
    8,  // GUEST_TSO6
    11, // HOST_TSO4
    12, // HOST_TSO6
];

/// See [`Pods::guard`].
#[derive(Debug)]
pub struct PodGuard<'a> {
    pods: &'a Pods,
    names: Vec<String>,
}

impl Drop for PodGuard<'_> {
    fn drop(&mut self) {
        for name in &self.names {
            if self.pods.status(name).is_ok() {
                eprintln!("pods: deleting pod {name}, left by a failed test");
                let _ = self.pods.pod(&["delete", name, "--grace", "0"], None);
            }
        }
    }
}
