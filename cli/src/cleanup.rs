//! `isola cleanup ID`: what containerd's `delete` action does after a dead
//! shim, by hand, for a sandbox whose runner (the shim, `isola run`) is
//! gone and left things behind (`isola ps` says `dead (leftovers)`): the
//! helpers that still name its run directory are killed (the same code as
//! the shim's action, `isola_sandbox::child::kill_helpers`), every mount
//! under the directory undone, the directory removed, and its host cgroup
//! removed if empty. A sandbox whose runner still runs is refused.

use std::path::Path;

use anyhow::{bail, Context, Result};
use isola_sandbox::child::kill_helpers;
use isola_sandbox::share;

use crate::ps::{self, Entry};

/// Cleans up sandbox `id` (in `namespace`, if given) under `roots`;
/// `helpers` are the file names of isola-vmm and virtiofsd.
pub fn run(
    roots: &[std::path::PathBuf],
    id: &str,
    namespace: Option<&str>,
    helpers: &[String],
) -> Result<()> {
    let found: Vec<Entry> = ps::collect(roots)
        .into_iter()
        .filter(|e| e.id == id && namespace.map_or(true, |n| e.namespace == n))
        .collect();
    let entry = match found.as_slice() {
        [] => bail!(crate::lookup::missing(id, namespace, roots)),
        [one] => one,
        many => bail!(crate::lookup::ambiguous(
            id,
            many.iter().map(|e| e.namespace.as_str())
        )),
    };
    if entry.runner.alive {
        bail!(
            "sandbox {id}'s runner (pid {}) still runs it: stop it through its runner \
             (`ctr task delete`, `crictl stopp`, or the `isola run` itself)",
            entry.runner.pid
        );
    }
    let dir = &entry.dir;
    let killed = kill_helpers(dir, helpers);
    let errors = share::unmount_all(dir);
    for err in &errors {
        eprintln!("isola: cleanup {id}: unmounting: {err}");
    }
    share::remove_dir_safely(dir).with_context(|| format!("removing {}", dir.display()))?;
    let cgroup = status_cgroup(entry);
    if let Some(cg) = &cgroup {
        // Only an empty cgroup can go; one with processes stays.
        if cg.exists() {
            if let Err(err) = std::fs::remove_dir(cg) {
                eprintln!(
                    "isola: cleanup {id}: host cgroup {} not removed: {err}",
                    cg.display()
                );
            }
        }
    }
    println!(
        "cleaned up sandbox {id} ({}): killed {}, removed {}{}",
        entry.namespace,
        if killed.is_empty() {
            "nothing".to_string()
        } else {
            format!(
                "pids {}",
                killed
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        dir.display(),
        cgroup.map_or(String::new(), |c| format!(" and {}", c.display()))
    );
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{} mounts could not be undone", errors.len())
    }
}

/// The host cgroup the status file records, if it is under the cgroup
/// root (never a path elsewhere).
fn status_cgroup(entry: &Entry) -> Option<std::path::PathBuf> {
    let cg = entry.host_cgroup.as_ref()?;
    let root = Path::new("/sys/fs/cgroup");
    let inside = cg.starts_with(root)
        && cg != root
        && cg.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
    inside.then(|| cg.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_sandbox::status::{self, Status};

    #[test]
    fn a_dead_sandbox_goes_and_a_missing_one_is_named() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("default").join("gone");
        std::fs::create_dir_all(dir.join("rw")).unwrap();
        std::fs::write(dir.join("rw/file"), "x").unwrap();
        status::write(
            &dir,
            &Status {
                id: "gone".into(),
                namespace: "default".into(),
                runner_pid: u32::MAX - 1,
                ..Default::default()
            },
        )
        .unwrap();
        let roots = [root.path().to_path_buf()];
        let helpers = ["isola-vmm".to_string(), "virtiofsd".to_string()];
        let err = run(&roots, "other", None, &helpers)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no sandbox other"), "{err}");
        let err = run(&roots, "gone", Some("k8s.io"), &helpers)
            .unwrap_err()
            .to_string();
        assert!(err.contains("in namespace k8s.io"), "{err}");
        if nix::unistd::geteuid().is_root() {
            run(&roots, "gone", None, &helpers).unwrap();
            assert!(!dir.exists());
        }
    }

    #[test]
    fn a_live_runner_keeps_its_sandbox() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("_direct").join("mine");
        std::fs::create_dir_all(&dir).unwrap();
        // This test binary is not a runner; its parent cargo neither: use
        // a copy of this binary named `isola`.
        let isola = root.path().join("isola");
        std::fs::copy("/bin/sleep", &isola).unwrap();
        let mut child = std::process::Command::new(&isola)
            .arg("30")
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{}/exe", child.id()))
            .map(|e| !e.ends_with("isola"))
            .unwrap_or(true)
        {
            assert!(std::time::Instant::now() < deadline, "never started");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        status::write(
            &dir,
            &Status {
                id: "mine".into(),
                runner_pid: child.id(),
                ..Default::default()
            },
        )
        .unwrap();
        let err = run(&[root.path().to_path_buf()], "mine", None, &[])
            .unwrap_err()
            .to_string();
        let _ = child.kill();
        let _ = child.wait();
        assert!(err.contains("still runs it"), "{err}");
        assert!(dir.exists());
    }

    #[test]
    fn only_a_cgroup_under_the_cgroup_root_is_touched() {
        let entry = |p: &str| Entry {
            host_cgroup: Some(p.into()),
            ..Default::default()
        };
        assert!(status_cgroup(&entry("/sys/fs/cgroup/k8s.io/pod")).is_some());
        assert!(status_cgroup(&entry("/sys/fs/cgroup")).is_none());
        assert!(status_cgroup(&entry("/sys/fs/cgroup/../../etc")).is_none());
        assert!(status_cgroup(&entry("/etc")).is_none());
    }
}
