//! From a Pod manifest to the CRI requests kubelet would send, and the
//! gRPC connection to containerd's CRI plugin over its Unix socket.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::manifest::{Container, Limits, MountPropagation, Pod};

/// The labels kubelet puts on every pod sandbox and container; `isola pod`
/// finds its pods by them.
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";

/// kubelet's CFS period.
pub const CPU_PERIOD_US: i64 = 100_000;

/// containerd's CRI services on one channel.
#[derive(Debug, Clone)]
pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

impl Cri {
    pub async fn connect(socket: &Path) -> Result<Cri> {
        let path = socket.to_path_buf();
        // The URI is a placeholder: the connector dials the socket.
        let channel =
            Endpoint::try_from("http://[::]:0")
                .context("CRI endpoint")?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .with_context(|| {
                    format!("connecting to containerd's CRI at {}", socket.display())
                })?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }
}

/// Where kubelet-like state of one pod lives on the host.
#[derive(Debug, Clone)]
pub struct PodPaths {
    /// `<root>/<uid>`: volumes, termination logs.
    pub dir: PathBuf,
    /// `<log_root>/<namespace>_<name>_<uid>`: the CRI log directory.
    pub log_dir: PathBuf,
    /// The pod's cgroup parent (cgroupfs form), as kubelet's.
    pub cgroup_parent: String,
}

impl PodPaths {
    pub fn new(root: &Path, log_root: &Path, pod: &Pod, uid: &str) -> PodPaths {
        PodPaths {
            dir: root.join(uid),
            log_dir: log_root.join(format!("{}_{}_{}", pod.namespace(), pod.metadata.name, uid)),
            cgroup_parent: format!("/kubepods/pod{uid}"),
        }
    }

    pub fn volume_dir(&self, plugin: &str, name: &str) -> PathBuf {
        self.dir.join("volumes").join(plugin).join(name)
    }

    pub fn termination_log(&self, container: &str, attempt: u32) -> PathBuf {
        self.dir
            .join("containers")
            .join(container)
            .join(format!("termination-log.{attempt}"))
    }
}

fn kv(map: impl IntoIterator<Item = (String, String)>) -> HashMap<String, String> {
    map.into_iter().collect()
}

pub fn pod_labels(pod: &Pod, uid: &str) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> = kv(pod.metadata.labels.clone());
    labels.insert(LABEL_POD_NAME.into(), pod.metadata.name.clone());
    labels.insert(LABEL_POD_NAMESPACE.into(), pod.namespace().into());
    labels.insert(LABEL_POD_UID.into(), uid.into());
    labels
}

/// kubelet's `LinuxContainerResources` for a set of limits and requests.
fn resources(limits: Limits, requests: Limits) -> cri::LinuxContainerResources {
    let mut r = cri::LinuxContainerResources::default();
    if let Some(m) = limits.milli_cpu {
        r.cpu_period = CPU_PERIOD_US;
        // kubelet's milliCPUToQuota, with its 1 ms floor.
        r.cpu_quota = ((m as i64) * CPU_PERIOD_US / 1000).max(1000);
    }
    // kubelet's milliCPUToShares: the request (else the limit), at least 2.
    let share_basis = requests.milli_cpu.or(limits.milli_cpu);
    r.cpu_shares = share_basis.map_or(2, |m| ((m as i64) * 1024 / 1000).max(2));
    if let Some(bytes) = limits.memory {
        r.memory_limit_in_bytes = bytes as i64;
    }
    r
}

/// The RunPodSandbox request's config.
pub fn sandbox_config(pod: &Pod, uid: &str, paths: &PodPaths) -> Result<cri::PodSandboxConfig> {
    let mut port_mappings = Vec::new();
    for c in &pod.spec.containers {
        for p in &c.ports {
            if let Some(host_port) = p.host_port {
                port_mappings.push(cri::PortMapping {
                    protocol: match p.protocol.as_deref() {
                        Some("UDP") => cri::Protocol::Udp,
                        Some("SCTP") => cri::Protocol::Sctp,
                        _ => cri::Protocol::Tcp,
                    } as i32,
                    container_port: p.container_port,
                    host_port,
                    host_ip: p.host_ip.clone().unwrap_or_default(),
                });
            }
        }
    }
    let dns_config = pod.spec.dns_config.as_ref().map(|d| cri::DnsConfig {
        servers: d.nameservers.clone(),
        searches: d.searches.clone(),
        options: d
            .options
            .iter()
            .map(|o| match &o.value {
                Some(v) => format!("{}:{v}", o.name),
                None => o.name.clone(),
            })
            .collect(),
    });
    let sandbox_limits = pod.sandbox_limits()?;
    let overhead = pod.overhead()?;
    Ok(cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: pod.metadata.name.clone(),
            uid: uid.into(),
            namespace: pod.namespace().into(),
            attempt: 0,
        }),
        hostname: pod
            .spec
            .hostname
            .clone()
            .unwrap_or_else(|| pod.metadata.name.clone()),
        log_directory: paths.log_dir.to_string_lossy().into_owned(),
        dns_config,
        port_mappings,
        labels: pod_labels(pod, uid),
        annotations: kv(pod.metadata.annotations.clone()),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: paths.cgroup_parent.clone(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(pod)),
                ..Default::default()
            }),
            resources: Some(resources(sandbox_limits, Limits::default())),
            overhead: (overhead != Limits::default())
                .then(|| resources(overhead, Limits::default())),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The pod's namespaces, as kubelet asks for them of the sandbox and of
/// every container: the node's where hostNetwork, hostPID or hostIPC say
/// so, else the pod's network and IPC, and a PID namespace per container
/// or the pod's one (shareProcessNamespace).
fn namespace_options(pod: &Pod) -> cri::NamespaceOption {
    let node_or = |node: bool, otherwise: cri::NamespaceMode| {
        if node {
            cri::NamespaceMode::Node as i32
        } else {
            otherwise as i32
        }
    };
    cri::NamespaceOption {
        network: node_or(pod.spec.host_network, cri::NamespaceMode::Pod),
        pid: node_or(
            pod.spec.host_pid,
            if pod.spec.share_process_namespace {
                cri::NamespaceMode::Pod
            } else {
                cri::NamespaceMode::Container
            },
        ),
        ipc: node_or(pod.spec.host_ipc, cri::NamespaceMode::Pod),
        ..Default::default()
    }
}

/// A volume as a container sees it: the host path kubelet prepared.
#[derive(Debug, Clone)]
pub struct PreparedVolume {
    pub name: String,
    pub host_path: PathBuf,
}

/// The CreateContainer request's config for `container`, attempt
/// `attempt` (0 first, +1 per restart).
pub fn container_config(
    pod: &Pod,
    uid: &str,
    index: usize,
    attempt: u32,
    volumes: &[PreparedVolume],
    paths: &PodPaths,
) -> Result<cri::ContainerConfig> {
    let c: &Container = &pod.spec.containers[index];
    let at = format!("spec.containers[{index}]");
    let mut mounts = Vec::new();
    for m in &c.volume_mounts {
        let v = volumes
            .iter()
            .find(|v| v.name == m.name)
            .with_context(|| format!("{at}.volumeMounts: volume {:?} was not prepared", m.name))?;
        mounts.push(cri::Mount {
            container_path: m.mount_path.clone(),
            host_path: v.host_path.to_string_lossy().into_owned(),
            readonly: m.read_only,
            propagation: match m.mount_propagation {
                None | Some(MountPropagation::None) => cri::MountPropagation::PropagationPrivate,
                Some(MountPropagation::HostToContainer) => {
                    cri::MountPropagation::PropagationHostToContainer
                }
                Some(MountPropagation::Bidirectional) => {
                    cri::MountPropagation::PropagationBidirectional
                }
            } as i32,
            ..Default::default()
        });
    }
    // kubelet's termination message file.
    mounts.push(cri::Mount {
        container_path: "/dev/termination-log".into(),
        host_path: paths
            .termination_log(&c.name, attempt)
            .to_string_lossy()
            .into_owned(),
        ..Default::default()
    });
    let mut labels = pod_labels(pod, uid);
    labels.retain(|k, _| k.starts_with("io.kubernetes."));
    labels.insert(LABEL_CONTAINER_NAME.into(), c.name.clone());
    let mut annotations = HashMap::new();
    annotations.insert(
        "io.kubernetes.container.restartCount".into(),
        attempt.to_string(),
    );
    annotations.insert(
        "io.kubernetes.container.terminationMessagePath".into(),
        "/dev/termination-log".into(),
    );
    let security = c.security_context.clone().unwrap_or_default();
    Ok(cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: c.name.clone(),
            attempt,
        }),
        image: Some(cri::ImageSpec {
            image: c.image.clone(),
            ..Default::default()
        }),
        command: c.command.clone(),
        args: c.args.clone(),
        working_dir: c.working_dir.clone().unwrap_or_default(),
        envs: c
            .env
            .iter()
            .map(|e| cri::KeyValue {
                key: e.name.clone(),
                value: e.value.clone(),
            })
            .collect(),
        mounts,
        labels,
        annotations,
        log_path: format!("{}/{attempt}.log", c.name),
        stdin: c.stdin,
        tty: c.tty,
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(resources(c.limits(&at)?, c.requests(&at)?)),
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: security.run_as_user.map(|value| cri::Int64Value { value }),
                run_as_group: security.run_as_group.map(|value| cri::Int64Value { value }),
                readonly_rootfs: security.read_only_root_filesystem,
                namespace_options: Some(namespace_options(pod)),
                capabilities: security.capabilities.as_ref().map(|c| cri::Capability {
                    add_capabilities: c.add.clone(),
                    drop_capabilities: c.drop.clone(),
                    ..Default::default()
                }),
                no_new_privs: security.allow_privilege_escalation == Some(false),
                ..Default::default()
            }),
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(extra: &str) -> Pod {
        Pod::parse(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: ns}}\nspec:\n  runtimeClassName: isola\n{extra}  containers:\n  - name: a\n    image: busybox\n    resources: {{requests: {{cpu: 100m}}, limits: {{cpu: 1500m, memory: 64Mi}}}}\n    ports: [{{containerPort: 80, hostPort: 8080}}]\n  - name: b\n    image: busybox\n    resources: {{limits: {{cpu: 500m, memory: 32Mi}}}}\n"
        ))
        .expect("pod")
    }

    fn paths(p: &Pod) -> PodPaths {
        PodPaths::new(
            Path::new("/var/lib/isola/pods"),
            Path::new("/var/log/pods"),
            p,
            "u1",
        )
    }

    #[test]
    fn the_sandbox_carries_the_pods_summed_limits_like_kubelet() {
        let p = pod("");
        let c = sandbox_config(&p, "u1", &paths(&p)).expect("config");
        let linux = c.linux.expect("linux");
        let r = linux.resources.expect("resources");
        assert_eq!((r.cpu_period, r.cpu_quota), (100_000, 200_000));
        assert_eq!(r.memory_limit_in_bytes, 96 << 20);
        assert_eq!(linux.cgroup_parent, "/kubepods/podu1");
        assert!(linux.overhead.is_none());
        assert_eq!(c.log_directory, "/var/log/pods/ns_p_u1");
        assert_eq!(c.hostname, "p");
        assert_eq!(c.port_mappings.len(), 1);
        assert_eq!(c.port_mappings[0].host_port, 8080);
        assert_eq!(c.labels.get(LABEL_POD_UID).map(String::as_str), Some("u1"));
        let ns = linux
            .security_context
            .and_then(|s| s.namespace_options)
            .expect("ns");
        assert_eq!(ns.network, cri::NamespaceMode::Pod as i32);
    }

    #[test]
    fn host_network_asks_for_the_node_namespace() {
        let p = pod("  hostNetwork: true\n  overhead: {cpu: 250m, memory: 100Mi}\n");
        let c = sandbox_config(&p, "u1", &paths(&p)).expect("config");
        let linux = c.linux.expect("linux");
        let ns = linux
            .security_context
            .and_then(|s| s.namespace_options)
            .expect("ns");
        assert_eq!(ns.network, cri::NamespaceMode::Node as i32);
        assert_eq!(
            linux.overhead.map(|o| o.memory_limit_in_bytes),
            Some(100 << 20)
        );
    }

    #[test]
    fn host_pid_and_ipc_ask_for_the_node_namespaces_everywhere() {
        let p = pod("  hostPID: true\n  hostIPC: true\n");
        let sandbox = sandbox_config(&p, "u1", &paths(&p)).expect("config");
        let container = container_config(&p, "u1", 0, 0, &[], &paths(&p)).expect("config");
        for ns in [
            sandbox
                .linux
                .and_then(|l| l.security_context)
                .and_then(|s| s.namespace_options),
            container
                .linux
                .and_then(|l| l.security_context)
                .and_then(|s| s.namespace_options),
        ] {
            let ns = ns.expect("ns");
            assert_eq!(ns.pid, cri::NamespaceMode::Node as i32);
            assert_eq!(ns.ipc, cri::NamespaceMode::Node as i32);
            assert_eq!(ns.network, cri::NamespaceMode::Pod as i32);
        }
    }

    #[test]
    fn capabilities_and_privilege_escalation_reach_the_container_config() {
        let p = pod("");
        let c = container_config(&p, "u1", 0, 0, &[], &paths(&p)).expect("config");
        let sc = c.linux.and_then(|l| l.security_context).expect("sc");
        assert!(sc.capabilities.is_none() && !sc.no_new_privs);
        let mut p = pod("");
        p.spec.containers[0].security_context = Some(
            serde_yaml_ng::from_str(
                "{allowPrivilegeEscalation: false, capabilities: {add: [NET_ADMIN, NET_RAW], drop: [KILL]}}",
            )
            .expect("securityContext"),
        );
        let c = container_config(&p, "u1", 0, 0, &[], &paths(&p)).expect("config");
        let sc = c.linux.and_then(|l| l.security_context).expect("sc");
        let caps = sc.capabilities.expect("capabilities");
        assert_eq!(caps.add_capabilities, ["NET_ADMIN", "NET_RAW"]);
        assert_eq!(caps.drop_capabilities, ["KILL"]);
        assert!(sc.no_new_privs);
    }

    #[test]
    fn share_process_namespace_asks_for_the_pods_pid_namespace() {
        for (manifest, pid) in [
            ("", cri::NamespaceMode::Container),
            ("  shareProcessNamespace: true\n", cri::NamespaceMode::Pod),
        ] {
            let p = pod(manifest);
            let c = container_config(&p, "u1", 0, 0, &[], &paths(&p)).expect("config");
            let ns = c
                .linux
                .and_then(|l| l.security_context)
                .and_then(|s| s.namespace_options)
                .expect("ns");
            assert_eq!(ns.pid, pid as i32, "{manifest:?}");
            assert_eq!(ns.ipc, cri::NamespaceMode::Pod as i32);
        }
    }

    #[test]
    fn containers_get_their_limits_shares_logs_and_termination_log() {
        let p = pod("");
        let c = container_config(&p, "u1", 0, 2, &[], &paths(&p)).expect("config");
        let r = c.linux.and_then(|l| l.resources).expect("resources");
        assert_eq!(r.cpu_quota, 150_000);
        assert_eq!(r.cpu_shares, 102);
        assert_eq!(r.memory_limit_in_bytes, 64 << 20);
        assert_eq!(c.log_path, "a/2.log");
        assert_eq!(c.metadata.map(|m| m.attempt), Some(2));
        let term = c.mounts.last().expect("termination log");
        assert_eq!(term.container_path, "/dev/termination-log");
        assert_eq!(
            term.host_path,
            "/var/lib/isola/pods/u1/containers/a/termination-log.2"
        );
        assert_eq!(
            c.labels.get(LABEL_CONTAINER_NAME).map(String::as_str),
            Some("a")
        );
    }
}
