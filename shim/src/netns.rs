//! The pod's network, as the sandbox container's OCI spec names it.
//!
//! containerd's CRI plugin makes the pod's network namespace and runs CNI
//! in it before it creates the sandbox container, whose spec then joins it
//! by path (`linux.namespaces`: `{"type": "network", "path":
//! "/var/run/netns/cni-…"}`). isola moves what CNI made there into the VM
//! (isola_sandbox::network). A spec without a network namespace asks for
//! the host's network (a `hostNetwork` pod, `ctr run --net-host`), which a
//! VM cannot share: refused, saying why.

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
