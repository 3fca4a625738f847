//! Which sandbox a container belongs to: the CRI plugin annotates a pod's
//! containers with their sandbox's id; anything else is a sandbox of its own.

use std::collections::HashMap;

/// CRI's annotation naming the container's kind: `sandbox` or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod sandbox a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The id of the sandbox (and so of the shim and VM) that container `id`
/// with `annotations` runs in: the CRI sandbox's for a pod's container,
/// else its own.
pub fn sandbox_id(id: &str, annotations: Option<&HashMap<String, String>>) -> String {
    if let Some(annotations) = annotations {
        let kind = annotations.get(CONTAINER_TYPE).map(String::as_str);
        if kind == Some("container") {
            if let Some(sandbox) = annotations.get(SANDBOX_ID).filter(|s| !s.is_empty()) {
                return sandbox.clone();
            }
        }
    }
    id.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_plain_container_is_its_own_sandbox() {
        assert_eq!(sandbox_id("c1", None), "c1");
        assert_eq!(sandbox_id("c1", Some(&annotations(&[]))), "c1");
    }

    #[test]
    fn a_pod_container_joins_its_sandbox() {
        let a = annotations(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "pod1")]);
        assert_eq!(sandbox_id("c1", Some(&a)), "pod1");
    }

    #[test]
    fn the_sandbox_container_and_incomplete_annotations_stand_alone() {
        let sandbox = annotations(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "pod1")]);
        assert_eq!(sandbox_id("pod1", Some(&sandbox)), "pod1");
        let no_id = annotations(&[(CONTAINER_TYPE, "container")]);
        assert_eq!(sandbox_id("c1", Some(&no_id)), "c1");
        let empty = annotations(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "")]);
        assert_eq!(sandbox_id("c1", Some(&empty)), "c1");
    }
}
