//! cgroup v2 at /sys/fs/cgroup: every available controller is enabled for
//! children, so container cgroups can use them.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// Controllers that must be available for containers; a kernel without one
/// of them is misconfigured.
pub const REQUIRED: &[&str] = &["cpuset", "cpu", "io", "memory", "pids"];

/// Enables every controller listed in `cgroup.controllers` of `root` in its
/// `cgroup.subtree_control`, and returns the enabled set.
pub fn enable_controllers(root: &Path) -> Result<Vec<String>> {
    let available = fs::read_to_string(root.join("cgroup.controllers"))
        .with_context(|| format!("reading {}/cgroup.controllers", root.display()))?;
    let available: Vec<String> = available.split_whitespace().map(str::to_string).collect();
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|c| !available.iter().any(|a| a == c))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "the kernel lacks cgroup controllers {missing:?} (has {available:?}); check guest-kernel/isola.config"
        );
    }
    let request = subtree_request(&available);
    fs::write(root.join("cgroup.subtree_control"), &request)
        .with_context(|| format!("writing {request:?} to cgroup.subtree_control"))?;
    let enabled = fs::read_to_string(root.join("cgroup.subtree_control"))
        .context("reading back cgroup.subtree_control")?;
    Ok(enabled.split_whitespace().map(str::to_string).collect())
}

/// The `cgroup.subtree_control` write that enables `controllers`.
fn subtree_request(controllers: &[String]) -> String {
    controllers
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_enables_each_controller() {
        let c = vec!["cpu".to_string(), "memory".to_string()];
        assert_eq!(subtree_request(&c), "+cpu +memory");
    }

    #[test]
    fn missing_required_controller_is_named() {
        let dir = std::env::temp_dir().join(format!("isola-cg-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        fs::write(dir.join("cgroup.controllers"), "cpu memory\n").expect("write");
        let err = enable_controllers(&dir).expect_err("io, cpuset and pids are missing");
        let msg = format!("{err:#}");
        assert!(msg.contains("cpuset") && msg.contains("pids"), "{msg}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn enables_all_available() {
        let dir = std::env::temp_dir().join(format!("isola-cg-test2-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        fs::write(
            dir.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .expect("write");
        let enabled = enable_controllers(&dir).expect("enable");
        assert_eq!(enabled, vec!["+cpuset", "+cpu", "+io", "+memory", "+pids"]);
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
