//! The pod's network, as the sandbox container's OCI spec names it.
//!
//! containerd's CRI plugin makes the pod's network namespace and runs CNI
//! in it before it creates the sandbox container, whose spec then joins it
//! by path (`linux.namespaces`: `{"type": "network", "path":
//! "/var/run/netns/cni-…"}`). isola moves what CNI made there into the VM
//! (isola_sandbox::network). A spec without a network namespace asks for
//! the host's network (a `hostNetwork` pod, `ctr run --net-host`), which a
//! VM cannot share: refused, saying why. So are the host's PID, IPC and UTS
//! namespaces (`hostPID`, `hostIPC`, Docker's `--pid=host`, `--ipc=host`,
//! `--uts=host`): the spec leaves them out, and a process in the VM can
//! never be in them ([`host_namespaces`]).

use std::path::PathBuf;

use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// Where the sandbox's network comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// A namespace made for the pod (CNI's interfaces go into the VM).
    Pod(PathBuf),
    /// A new, empty namespace: the guest has loopback only.
    None,
}

/// The sandbox's network, or why isola cannot give it one.
pub fn of(spec: &Spec) -> Result<Network, String> {
    let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    let Some(network) = namespaces
        .into_iter()
        .flatten()
        .find(|n| n.typ() == LinuxNamespaceType::Network)
    else {
        return Err(
            "the spec joins the host's network namespace (a hostNetwork pod or --net-host): \
             isola runs each pod in its own VM, which cannot share the host's network; \
             run it with runc"
                .to_string(),
        );
    };
    Ok(match network.path() {
        Some(path) if !path.as_os_str().is_empty() => Network::Pod(path.clone()),
        _ => Network::None,
    })
}

/// Refuses a spec that asks for the host's PID, IPC or UTS namespace (it
/// leaves the namespace out, as runc reads it), naming each and why.
pub fn host_namespaces(spec: &Spec) -> Result<(), String> {
    let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    let has = |typ| namespaces.into_iter().flatten().any(|n| n.typ() == typ);
    let missing: Vec<&str> = [
        (LinuxNamespaceType::Pid, "PID (hostPID, --pid=host)"),
        (LinuxNamespaceType::Ipc, "IPC (hostIPC, --ipc=host)"),
        (LinuxNamespaceType::Uts, "UTS (--uts=host)"),
    ]
    .into_iter()
    .filter(|(typ, _)| !has(*typ))
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the spec joins the host's {} namespace{}: isola runs each pod in its own VM, \
         whose processes cannot be in the host's namespaces; run it with runc",
        missing.join(" and "),
        if missing.len() > 1 { "s" } else { "" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(linux: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "linux": linux}))
            .expect("spec")
    }

    #[test]
    fn a_cri_pod_namespace_is_found_by_path() {
        let s = spec(serde_json::json!({"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"}
        ]}));
        assert_eq!(of(&s), Ok(Network::Pod("/var/run/netns/cni-1234".into())));
    }

    #[test]
    fn host_pid_ipc_and_uts_are_refused_naming_each() {
        let all = spec(serde_json::json!({"namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
            {"type": "network", "path": "/var/run/netns/cni-1"}
        ]}));
        assert_eq!(host_namespaces(&all), Ok(()));
        // A pod's containers join the pause's namespaces by path: not the host's.
        let joined = spec(serde_json::json!({"namespaces": [
            {"type": "pid", "path": "/proc/42/ns/pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "uts", "path": "/proc/42/ns/uts"}, {"type": "mount"}
        ]}));
        assert_eq!(host_namespaces(&joined), Ok(()));
        let host_pid = spec(serde_json::json!({"namespaces": [
            {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}
        ]}));
        let err = host_namespaces(&host_pid).expect_err("hostPID");
        assert!(
            err.contains("host's PID (hostPID") && err.contains("own VM"),
            "{err}"
        );
        assert!(!err.contains("IPC"), "{err}");
        let host_ipc_uts = spec(serde_json::json!({"namespaces": [
            {"type": "pid"}, {"type": "mount"}, {"type": "network"}
        ]}));
        let err = host_namespaces(&host_ipc_uts).expect_err("hostIPC");
        assert!(
            err.contains("IPC (hostIPC, --ipc=host) and UTS (--uts=host) namespaces"),
            "{err}"
        );
    }

    #[test]
    fn a_new_namespace_is_loopback_only() {
        let s = spec(serde_json::json!({"namespaces": [{"type": "network"}]}));
        assert_eq!(of(&s), Ok(Network::None));
    }

    #[test]
    fn the_host_network_is_refused_saying_why() {
        for s in [
            spec(serde_json::json!({"namespaces": [{"type": "pid"}, {"type": "mount"}]})),
            spec(serde_json::json!({})),
        ] {
            let err = of(&s).expect_err("host network");
            assert!(
                err.contains("hostNetwork") && err.contains("own VM"),
                "{err}"
            );
        }
    }
}
