//! A pod's shared namespaces, from the host's OCI spec to the agent's
//! request.
//!
//! containerd's CRI plugin writes each of a pod's containers with the
//! pause container's IPC and UTS namespaces (and its PID namespace for a
//! `shareProcessNamespace` pod) by the path of its task pid:
//! `{"type": "ipc", "path": "/proc/<pid>/ns/ipc"}`. A sandbox reports its
//! VMM's pid as every task's (the guest's pids mean nothing on the host),
//! so a path naming the VMM's pid names this sandbox's own namespaces:
//! the container joins the sandbox container's in the guest
//! (`CreateContainerRequest.sandbox_namespaces`). Any other path names a
//! namespace of the host or of another VM (Docker's `--ipc=container:X`
//! with X in a VM of its own, a host process's), which no process of this
//! VM can be in: refused, saying so. A namespace without a path is new,
//! as runc makes it; one left out of the spec (the host's) is the shim's
//! to refuse.

use isola_protocol::SHAREABLE_NAMESPACES;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// The pid in a `/proc/<pid>/ns/<name>` path, if it is one.
fn proc_ns_pid(path: &str, name: &str) -> Option<u32> {
    let rest = path.strip_prefix("/proc/")?;
    let (pid, ns) = rest.split_once('/')?;
    if ns.strip_prefix("ns/") != Some(name)
        || pid.is_empty()
        || !pid.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    pid.parse().ok()
}

/// The names of the sandbox's namespaces the container joins ("ipc",
/// "uts", "pid"), given the pid the sandbox reports for its tasks; or why
/// a namespace path cannot be honoured.
pub fn shared(spec: &Spec, sandbox_pid: u32) -> Result<Vec<String>, String> {
    let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    let mut joined = Vec::new();
    for ns in namespaces.into_iter().flatten() {
        let Some(name) = SHAREABLE_NAMESPACES
            .into_iter()
            .find(|n| LinuxNamespaceType::try_from(*n).ok() == Some(ns.typ()))
        else {
            continue;
        };
        let Some(path) = ns.path().as_ref().filter(|p| !p.as_os_str().is_empty()) else {
            continue;
        };
        let text = path.to_string_lossy();
        match proc_ns_pid(&text, name) {
            // 0 is no process: a sandbox without a VMM shares nothing.
            Some(pid) if pid == sandbox_pid && pid != 0 => {
                if !joined.iter().any(|n| n == name) {
                    joined.push(name.to_string());
                }
            }
            _ => {
                return Err(format!(
                    "linux.namespaces: the {} namespace {text} is not this pod's \
                     (its tasks' pid is {sandbox_pid}, the VM's): a container in a VM can \
                     share namespaces only with the containers of its own pod, not with \
                     another VM's or a host process's",
                    name.to_uppercase()
                ))
            }
        }
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(namespaces: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": namespaces}
        }))
        .expect("spec")
    }

    #[test]
    fn a_cri_pod_container_joins_the_sandbox_by_its_pid() {
        // As containerd's CRI writes it: IPC and UTS always, PID for a
        // shareProcessNamespace pod, the network by the same pid.
        let s = spec(serde_json::json!([
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "uts", "path": "/proc/4242/ns/uts"},
            {"type": "pid", "path": "/proc/4242/ns/pid"},
            {"type": "network", "path": "/proc/4242/ns/net"},
            {"type": "mount"}
        ]));
        assert_eq!(
            shared(&s, 4242),
            Ok(vec!["ipc".to_string(), "uts".into(), "pid".into()])
        );
    }

    #[test]
    fn namespaces_without_a_path_are_new() {
        let s = spec(serde_json::json!([
            {"type": "ipc"}, {"type": "uts", "path": ""}, {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"}
        ]));
        assert_eq!(shared(&s, 4242), Ok(vec![]));
        assert_eq!(shared(&spec(serde_json::json!([])), 1), Ok(vec![]));
        // No VMM (pid 0): nothing names it.
        let s = spec(serde_json::json!([{"type": "ipc", "path": "/proc/0/ns/ipc"}]));
        assert!(shared(&s, 0).is_err());
    }

    #[test]
    fn another_processes_namespace_is_refused_naming_it() {
        // Docker's --ipc=container:X, X in a VM of its own.
        let s = spec(serde_json::json!([{"type": "ipc", "path": "/proc/99/ns/ipc"}]));
        let e = shared(&s, 4242).expect_err("another VM");
        assert!(
            e.contains("IPC namespace /proc/99/ns/ipc is not this pod's") && e.contains("4242"),
            "{e}"
        );
        for path in [
            "/var/run/netns/x",
            "/proc/4242/ns/net",
            "/proc/4242/ns/pid/../ipc",
            "/proc/self/ns/pid",
            "/proc//ns/pid",
            "/proc/+4242/ns/pid",
        ] {
            let s = spec(serde_json::json!([{"type": "pid", "path": path}]));
            let e = shared(&s, 4242).expect_err(path);
            assert!(e.contains("PID namespace"), "{path}: {e}");
        }
    }
}
