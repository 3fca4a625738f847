//! The Pod manifest `isola pod` reads: a documented subset of Kubernetes'
//! `v1.Pod` in YAML (or JSON). Fields outside the subset are errors that
//! name the field, so a manifest never silently means less than it says.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The container runtime handler a pod without `runtimeClassName` gets:
/// containerd's default runtime (runc).
pub const DEFAULT_NAMESPACE: &str = "default";
/// kubelet's default grace period.
pub const DEFAULT_GRACE_SECS: i64 = 30;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pod {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: PodSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub containers: Vec<Container>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub runtime_class_name: Option<String>,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default, rename = "hostPID")]
    pub host_pid: bool,
    #[serde(default, rename = "hostIPC")]
    pub host_ipc: bool,
    /// One PID namespace for all the pod's containers (the pause's).
    #[serde(default)]
    pub share_process_namespace: bool,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub dns_config: Option<DnsConfig>,
    #[serde(default)]
    pub termination_grace_period_seconds: Option<i64>,
    #[serde(default)]
    pub restart_policy: Option<RestartPolicy>,
    /// What the RuntimeClass's `overhead.podFixed` adds (the API server
    /// copies it into the pod; here it may be written directly).
    #[serde(default)]
    pub overhead: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DnsConfig {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub searches: Vec<String>,
    #[serde(default)]
    pub options: Vec<DnsOption>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsOption {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub security_context: Option<SecurityContext>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
    #[serde(default)]
    pub ports: Vec<Port>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub stdin: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecurityContext {
    #[serde(default)]
    pub run_as_user: Option<i64>,
    #[serde(default)]
    pub run_as_group: Option<i64>,
    #[serde(default)]
    pub read_only_root_filesystem: bool,
    /// Capabilities added to or dropped from the runtime's default set,
    /// by name without `CAP_` (as kubelet passes them).
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// false sets no_new_privs (kubelet's mapping); default true.
    #[serde(default)]
    pub allow_privilege_escalation: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub drop: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub requests: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    /// Kubernetes' mount propagation: `None` (the default),
    /// `HostToContainer` or `Bidirectional` (privileged containers only,
    /// which `isola pod` does not run: refused, as the API server does).
    #[serde(default)]
    pub mount_propagation: Option<MountPropagation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MountPropagation {
    None,
    HostToContainer,
    Bidirectional,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Port {
    pub container_port: i32,
    #[serde(default)]
    pub host_port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub host_ip: Option<String>,
    /// Accepted (Services refer to it); CRI has no use for it.
    #[serde(default, rename = "name")]
    pub _name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    #[serde(default)]
    pub host_path: Option<HostPathSource>,
    #[serde(default)]
    pub empty_dir: Option<EmptyDirSource>,
    /// Inline files (not a reference to a ConfigMap object: there is no
    /// API server): written the way kubelet writes a configMap volume, and
    /// swapped atomically when `apply` runs again with new data.
    #[serde(default)]
    pub config_map: Option<ConfigMapSource>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPathSource {
    pub path: String,
    #[serde(default, rename = "type")]
    pub typ: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EmptyDirSource {
    #[serde(default)]
    pub medium: Option<String>,
    #[serde(default)]
    pub size_limit: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigMapSource {
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

/// What a volume is, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeKind {
    HostPath {
        path: String,
        typ: HostPathType,
    },
    EmptyDir {
        memory: bool,
        size_limit: Option<u64>,
    },
    ConfigMap {
        data: BTreeMap<String, String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPathType {
    /// `""`: no check.
    Any,
    Directory,
    DirectoryOrCreate,
    File,
    FileOrCreate,
}

impl Pod {
    /// Parses and checks a manifest; errors name the field.
    pub fn parse(text: &str) -> Result<Pod> {
        let pod: Pod = serde_yaml_ng::from_str(text).map_err(|e| {
            anyhow::anyhow!("{e} (isola pod supports a subset of v1.Pod: see docs/kubernetes.md)")
        })?;
        pod.validate()?;
        Ok(pod)
    }

    pub fn namespace(&self) -> &str {
        self.metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE)
    }

    fn validate(&self) -> Result<()> {
        if self.api_version != "v1" || self.kind != "Pod" {
            bail!(
                "apiVersion {:?} kind {:?}: only apiVersion v1, kind Pod",
                self.api_version,
                self.kind
            );
        }
        check_name("metadata.name", &self.metadata.name)?;
        check_name("metadata.namespace", self.namespace())?;
        if let Some(uid) = &self.metadata.uid {
            check_uid("metadata.uid", uid)?;
        }
        if self.spec.containers.is_empty() {
            bail!("spec.containers: a pod needs at least one container");
        }
        let mut names = std::collections::BTreeSet::new();
        for volume in &self.spec.volumes {
            check_name("spec.volumes[].name", &volume.name)?;
            if !names.insert(volume.name.as_str()) {
                bail!("spec.volumes: {:?} is named twice", volume.name);
            }
            volume.kind()?;
        }
        let mut containers = std::collections::BTreeSet::new();
        for (i, c) in self.spec.containers.iter().enumerate() {
            let at = format!("spec.containers[{i}]");
            check_name(&format!("{at}.name"), &c.name)?;
            if !containers.insert(c.name.as_str()) {
                bail!("{at}.name: {:?} is used twice", c.name);
            }
            if c.image.is_empty() {
                bail!("{at}.image: empty");
            }
            for m in &c.volume_mounts {
                if !names.contains(m.name.as_str()) {
                    bail!(
                        "{at}.volumeMounts: no volume named {:?} in spec.volumes",
                        m.name
                    );
                }
                if m.mount_propagation == Some(MountPropagation::Bidirectional) {
                    bail!(
                        "{at}.volumeMounts[{}].mountPropagation Bidirectional: only a privileged \
                         container may have it, and isola pod runs none",
                        m.name
                    );
                }
                if !m.mount_path.starts_with('/') {
                    bail!(
                        "{at}.volumeMounts[{}].mountPath {:?}: must be absolute",
                        m.name,
                        m.mount_path
                    );
                }
            }
            for p in &c.ports {
                if !(1..=65535).contains(&p.container_port) {
                    bail!(
                        "{at}.ports: containerPort {} is not 1-65535",
                        p.container_port
                    );
                }
                if let Some(h) = p.host_port {
                    if !(1..=65535).contains(&h) {
                        bail!("{at}.ports: hostPort {h} is not 1-65535");
                    }
                }
                match p.protocol.as_deref() {
                    None | Some("TCP") | Some("UDP") | Some("SCTP") => {}
                    Some(other) => bail!("{at}.ports: protocol {other:?} is not TCP, UDP or SCTP"),
                }
            }
            c.limits(&at)?;
            c.requests(&at)?;
        }
        for (k, v) in &self.spec.overhead {
            parse_resource(k, v).with_context(|| format!("spec.overhead.{k}"))?;
        }
        if let Some(g) = self.spec.termination_grace_period_seconds {
            if g < 0 {
                bail!("spec.terminationGracePeriodSeconds {g}: must not be negative");
            }
        }
        Ok(())
    }

    pub fn grace_secs(&self) -> i64 {
        self.spec
            .termination_grace_period_seconds
            .unwrap_or(DEFAULT_GRACE_SECS)
    }

    /// The pod's resources as kubelet gives them to the sandbox: the sum of
    /// its containers' limits (a container without a limit makes that sum
    /// unbounded, so it is left out: 0).
    pub fn sandbox_limits(&self) -> Result<Limits> {
        let mut total = Limits::default();
        let mut cpu_unbounded = false;
        let mut mem_unbounded = false;
        for (i, c) in self.spec.containers.iter().enumerate() {
            let l = c.limits(&format!("spec.containers[{i}]"))?;
            match l.milli_cpu {
                Some(m) => total.milli_cpu = Some(total.milli_cpu.unwrap_or(0) + m),
                None => cpu_unbounded = true,
            }
            match l.memory {
                Some(m) => total.memory = Some(total.memory.unwrap_or(0) + m),
                None => mem_unbounded = true,
            }
        }
        if cpu_unbounded {
            total.milli_cpu = None;
        }
        if mem_unbounded {
            total.memory = None;
        }
        Ok(total)
    }

    /// Whether kubelet would start a container again after it exited with
    /// `exit_code`.
    pub fn restarts(&self, exit_code: i32) -> bool {
        match self.spec.restart_policy.unwrap_or(RestartPolicy::Always) {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }

    pub fn overhead(&self) -> Result<Limits> {
        limits_of(&self.spec.overhead, "spec.overhead")
    }
}

impl Volume {
    pub fn kind(&self) -> Result<VolumeKind> {
        let at = format!("spec.volumes[{}]", self.name);
        let kinds = [
            self.host_path.is_some(),
            self.empty_dir.is_some(),
            self.config_map.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            bail!("{at}: exactly one of hostPath, emptyDir, configMap");
        }
        if let Some(h) = &self.host_path {
            if !h.path.starts_with('/') {
                bail!("{at}.hostPath.path {:?}: must be absolute", h.path);
            }
            let typ = match h.typ.as_deref().unwrap_or("") {
                "" => HostPathType::Any,
                "Directory" => HostPathType::Directory,
                "DirectoryOrCreate" => HostPathType::DirectoryOrCreate,
                "File" => HostPathType::File,
                "FileOrCreate" => HostPathType::FileOrCreate,
                other => bail!(
                    "{at}.hostPath.type {other:?}: supported are \"\", Directory, DirectoryOrCreate, File, FileOrCreate"
                ),
            };
            return Ok(VolumeKind::HostPath {
                path: h.path.clone(),
                typ,
            });
        }
        if let Some(e) = &self.empty_dir {
            let memory = match e.medium.as_deref().unwrap_or("") {
                "" => false,
                "Memory" => true,
                other => bail!("{at}.emptyDir.medium {other:?}: \"\" or Memory"),
            };
            let size_limit = e
                .size_limit
                .as_deref()
                .map(|s| parse_bytes(s).with_context(|| format!("{at}.emptyDir.sizeLimit")))
                .transpose()?;
            return Ok(VolumeKind::EmptyDir { memory, size_limit });
        }
        let data = self.config_map.clone().unwrap_or_default().data;
        for key in data.keys() {
            if key.is_empty() || key.starts_with("..") || key.contains('/') || key.len() > 253 {
                bail!("{at}.configMap.data: key {key:?} must be a file name (no '/', not starting with '..')");
            }
        }
        Ok(VolumeKind::ConfigMap { data })
    }
}

/// CPU (millicores) and memory (bytes); `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub milli_cpu: Option<u64>,
    pub memory: Option<u64>,
}

impl Container {
    pub fn limits(&self, at: &str) -> Result<Limits> {
        limits_of(&self.resources.limits, &format!("{at}.resources.limits"))
    }

    pub fn requests(&self, at: &str) -> Result<Limits> {
        limits_of(
            &self.resources.requests,
            &format!("{at}.resources.requests"),
        )
    }
}

fn limits_of(map: &BTreeMap<String, String>, at: &str) -> Result<Limits> {
    let mut l = Limits::default();
    for (k, v) in map {
        match k.as_str() {
            "cpu" => l.milli_cpu = Some(parse_resource(k, v).with_context(|| format!("{at}.cpu"))?),
            "memory" => {
                l.memory = Some(parse_resource(k, v).with_context(|| format!("{at}.memory"))?)
            }
            other => bail!("{at}.{other}: only cpu and memory are supported"),
        }
    }
    Ok(l)
}

fn parse_resource(key: &str, value: &str) -> Result<u64> {
    match key {
        "cpu" => parse_milli_cpu(value),
        "memory" => parse_bytes(value),
        other => bail!("{other}: only cpu and memory are supported"),
    }
}

/// A CPU quantity in millicores: `500m`, `1`, `1.5`.
pub fn parse_milli_cpu(text: &str) -> Result<u64> {
    let bad = || anyhow::anyhow!("{text:?} is not a CPU quantity (like 500m, 1 or 1.5)");
    if let Some(m) = text.strip_suffix('m') {
        return m.parse::<u64>().map_err(|_| bad());
    }
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if int.is_empty() && frac.is_empty() || frac.len() > 3 {
        return Err(bad());
    }
    let int: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let frac_milli: u64 = if frac.is_empty() {
        0
    } else {
        let digits: u64 = frac.parse().map_err(|_| bad())?;
        digits * 10u64.pow(3 - frac.len() as u32)
    };
    int.checked_mul(1000)
        .and_then(|v| v.checked_add(frac_milli))
        .filter(|v| *v <= 1_000_000_000)
        .ok_or_else(bad)
}

/// A memory quantity in bytes: `128Mi`, `1G`, `1000`.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let bad = || anyhow::anyhow!("{text:?} is not a memory quantity (like 128Mi, 1Gi or 1000)");
    let suffixes: [(&str, u64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("K", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("", 1),
    ];
    for (suffix, mult) in suffixes {
        if let Some(number) = text.strip_suffix(suffix) {
            if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
                if suffix.is_empty() {
                    return Err(bad());
                }
                continue;
            }
            return number
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(mult))
                .ok_or_else(bad);
        }
    }
    Err(bad())
}

/// A pod uid (a UUID in Kubernetes): it names the pod's directories and
/// cgroup, so it must be one plain path component: 1 to 64 of
/// `[A-Za-z0-9-]`.
pub fn check_uid(what: &str, uid: &str) -> Result<()> {
    if uid.is_empty()
        || uid.len() > 64
        || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        bail!("{what} {uid:?}: must be 1 to 64 of A-Z, a-z, 0-9 and '-' (a UUID)");
    }
    Ok(())
}

/// Kubernetes object names: DNS labels (lower case alphanumerics and '-',
/// at most 63).
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!("{what} {name:?}: must be a DNS label (a-z, 0-9, '-', at most 63)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  runtimeClassName: isola
  terminationGracePeriodSeconds: 5
  hostname: web-0
  dnsConfig:
    nameservers: [198.18.0.53]
    searches: [svc.test]
    options: [{name: ndots, value: "2"}]
  volumes:
    - name: data
      emptyDir: {}
    - name: cache
      emptyDir: {medium: Memory, sizeLimit: 16Mi}
    - name: cfg
      configMap: {data: {greeting: hello}}
    - name: host
      hostPath: {path: /srv/x, type: Directory}
  containers:
    - name: app
      image: isola.test/busybox:latest
      command: [sh, -c]
      args: ["echo hi"]
      env: [{name: A, value: b}]
      workingDir: /tmp
      securityContext: {runAsUser: 1000, runAsGroup: 1000, readOnlyRootFilesystem: true}
      resources:
        requests: {cpu: 250m, memory: 64Mi}
        limits: {cpu: "1.5", memory: 128Mi}
      volumeMounts:
        - {name: data, mountPath: /data}
        - {name: cfg, mountPath: /cfg, readOnly: true}
      ports: [{containerPort: 80, hostPort: 8080}]
    - name: side
      image: isola.test/busybox:latest
      resources: {limits: {cpu: 500m, memory: 64Mi}}
"#;

    #[test]
    fn the_documented_subset_parses() {
        let pod = Pod::parse(POD).expect("parse");
        assert_eq!(pod.namespace(), "default");
        assert_eq!(pod.grace_secs(), 5);
        assert_eq!(
            pod.sandbox_limits().expect("limits"),
            Limits {
                milli_cpu: Some(2000),
                memory: Some(192 << 20)
            }
        );
        let kinds: Vec<_> = pod
            .spec
            .volumes
            .iter()
            .map(|v| v.kind().expect("kind"))
            .collect();
        assert_eq!(
            kinds[1],
            VolumeKind::EmptyDir {
                memory: true,
                size_limit: Some(16 << 20)
            }
        );
        assert_eq!(
            kinds[3],
            VolumeKind::HostPath {
                path: "/srv/x".into(),
                typ: HostPathType::Directory
            }
        );
    }

    #[test]
    fn host_to_container_propagation_parses() {
        let pod = Pod::parse(&POD.replace(
            "{name: cfg, mountPath: /cfg, readOnly: true}",
            "{name: cfg, mountPath: /cfg, readOnly: true, mountPropagation: HostToContainer}",
        ))
        .expect("parse");
        let mounts = &pod.spec.containers[0].volume_mounts;
        assert_eq!(mounts[0].mount_propagation, None);
        assert_eq!(
            mounts[1].mount_propagation,
            Some(MountPropagation::HostToContainer)
        );
    }

    #[test]
    fn a_container_without_limits_leaves_the_pod_unbounded() {
        let pod = Pod::parse(&POD.replace("resources: {limits: {cpu: 500m, memory: 64Mi}}", ""))
            .expect("parse");
        assert_eq!(pod.sandbox_limits().expect("limits"), Limits::default());
    }

    #[test]
    fn unknown_and_bad_fields_are_named() {
        for (from, to, needle) in [
            (
                "hostname: web-0",
                "hostname: web-0\n  nodeName: n1",
                "nodeName",
            ),
            (
                "workingDir: /tmp",
                "workingDir: /tmp\n      livenessProbe: {}",
                "livenessProbe",
            ),
            (
                "cpu: \"1.5\"",
                "cpu: lots",
                "spec.containers[0].resources.limits.cpu",
            ),
            (
                "memory: 128Mi",
                "memory: 128Qi",
                "spec.containers[0].resources.limits.memory",
            ),
            ("name: web\n", "name: Web\n", "metadata.name"),
            (
                "{name: data, mountPath: /data}",
                "{name: nope, mountPath: /data}",
                "no volume named \"nope\"",
            ),
            ("sizeLimit: 16Mi", "sizeLimit: lots", "sizeLimit"),
            (
                "{name: data, mountPath: /data}",
                "{name: data, mountPath: /data, mountPropagation: Bidirectional}",
                "volumeMounts[data].mountPropagation Bidirectional: only a privileged",
            ),
            (
                "{name: data, mountPath: /data}",
                "{name: data, mountPath: /data, mountPropagation: rslave}",
                "mountPropagation",
            ),
            ("type: Directory", "type: Socket", "hostPath.type"),
            ("greeting: hello", "../x: hello", "configMap.data"),
            ("kind: Pod", "kind: Deployment", "kind"),
            ("containerPort: 80", "containerPort: 0", "containerPort"),
            (
                "  name: web\n",
                "  name: web\n  uid: ../..\n",
                "metadata.uid",
            ),
        ] {
            let text = POD.replacen(from, to, 1);
            assert_ne!(text, POD, "{from}");
            let err = format!("{:#}", Pod::parse(&text).expect_err(from));
            assert!(err.contains(needle), "{from}: {err}");
        }
    }

    #[test]
    fn the_shipped_example_parses() {
        let pod =
            Pod::parse(include_str!("../../../configs/k8s/pod-example.yaml")).expect("example");
        assert_eq!(pod.spec.runtime_class_name.as_deref(), Some("isola"));
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_milli_cpu("500m").ok(), Some(500));
        assert_eq!(parse_milli_cpu("2").ok(), Some(2000));
        assert_eq!(parse_milli_cpu("0.25").ok(), Some(250));
        assert!(parse_milli_cpu("1.2345").is_err());
        assert!(parse_milli_cpu("").is_err());
        assert!(parse_milli_cpu("x").is_err());
        assert_eq!(parse_bytes("128Mi").ok(), Some(128 << 20));
        assert_eq!(parse_bytes("1G").ok(), Some(1_000_000_000));
        assert_eq!(parse_bytes("4096").ok(), Some(4096));
        assert!(parse_bytes("Mi").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("99999999999Ti").is_err());
    }
}
