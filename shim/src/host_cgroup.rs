//! The host cgroup containerd gives a sandbox (its spec's
//! `linux.cgroupsPath`): isola-vmm and virtiofsd run in it, so the host
//! charges the VM's memory and CPU to the sandbox. Inside the VM the same
//! path is the container's cgroup, which the agent makes.

use std::io;
use std::path::{Path, PathBuf};

/// Where cgroup v2 is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The directory under `root` that `cgroups_path` names: a path (cgroupfs
/// driver, `/default/c1`) or systemd's `slice:prefix:name`
/// (`kubepods-besteffort-pod1.slice:cri-containerd:c1` →
/// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-c1.scope`).
pub fn resolve(root: &Path, cgroups_path: &str) -> Result<PathBuf, String> {
    let rel = if cgroups_path.contains(':') {
        let parts: Vec<&str> = cgroups_path.split(':').collect();
        let [slice, prefix, name] = parts.as_slice() else {
            return Err(format!(
                "cgroupsPath {cgroups_path:?} is not systemd's slice:prefix:name"
            ));
        };
        let mut rel = expand_slice(slice)?;
        let unit = if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        check_component(&unit, cgroups_path)?;
        rel.push(unit);
        rel
    } else {
        let mut rel = PathBuf::new();
        for part in cgroups_path.split('/').filter(|p| !p.is_empty()) {
            check_component(part, cgroups_path)?;
            rel.push(part);
        }
        rel
    };
    if rel.as_os_str().is_empty() {
        return Err(format!(
            "cgroupsPath {cgroups_path:?} names the root cgroup"
        ));
    }
    Ok(root.join(rel))
}

fn check_component(part: &str, whole: &str) -> Result<(), String> {
    if part == "." || part == ".." || part.contains('/') || part.contains('\0') {
        return Err(format!(
            "cgroupsPath {whole:?} has a bad component {part:?}"
        ));
    }
    Ok(())
}

/// systemd's slice nesting: `a-b-c.slice` lives in `a.slice/a-b.slice/`.
fn expand_slice(slice: &str) -> Result<PathBuf, String> {
    if slice.is_empty() || slice == "-.slice" {
        return Ok(PathBuf::new());
    }
    let Some(stem) = slice.strip_suffix(".slice") else {
        return Err(format!("{slice:?} is not a systemd slice (*.slice)"));
    };
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return Err(format!("{slice:?} is not a valid systemd slice name"));
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        let name = format!("{prefix}.slice");
        check_component(&name, slice)?;
        path.push(name);
    }
    Ok(path)
}

/// A sandbox's host cgroup, created (with its missing parents) by us and
/// removed by us once the VM is gone.
/// The host cgroup of a sandbox whose spec names `cgroups_path`, made
/// under `root`. When it cannot be made: an error when `required` (the
/// default: a VM outside its pod's cgroup escapes the pod's limits), else
/// `None` with a warning (the VM then runs in the shim's cgroup).
pub fn for_sandbox(
    root: &Path,
    cgroups_path: &str,
    required: bool,
    sandbox: &str,
) -> Result<Option<HostCgroup>, String> {
    let dir = resolve(root, cgroups_path)?;
    match HostCgroup::create(root, &dir) {
        Ok(cg) => Ok(Some(cg)),
        Err(err) if required => Err(format!(
            "its host cgroup cannot be made: {err} (runtime.host_cgroup_required = false in the isola config runs VMs outside it)"
        )),
        Err(err) => {
            tracing::warn!(sandbox, %err, "the VM runs outside the sandbox's host cgroup (runtime.host_cgroup_required = false)");
            Ok(None)
        }
    }
}

#[derive(Debug)]
pub struct HostCgroup {
    dir: PathBuf,
    /// The directories we created, outermost first.
    created: Vec<PathBuf>,
}

impl HostCgroup {
    /// Creates `dir` (a cgroup v2 directory under `root`) and the parents it
    /// lacks, enabling the cpu, memory and pids controllers for their
    /// children where the parent allows it.
    pub fn create(root: &Path, dir: &Path) -> io::Result<HostCgroup> {
        if !root.join("cgroup.controllers").is_file() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{} is not a cgroup v2 mount", root.display()),
            ));
        }
        let rel = dir.strip_prefix(root).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not under {}", dir.display(), root.display()),
            )
        })?;
        let mut created = Vec::new();
        let mut current = root.to_path_buf();
        for part in rel.components() {
            enable_controllers(&current);
            current.push(part);
            match std::fs::create_dir(&current) {
                Ok(()) => created.push(current.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    let cgroup = HostCgroup {
                        dir: dir.to_path_buf(),
                        created,
                    };
                    cgroup.remove();
                    return Err(io::Error::new(
                        e.kind(),
                        format!("creating cgroup {}: {e}", current.display()),
                    ));
                }
            }
        }
        Ok(HostCgroup {
            dir: dir.to_path_buf(),
            created,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the directories we created, innermost first (a cgroup with
    /// processes left in it stays, and says so).
    pub fn remove(&self) {
        for dir in self.created.iter().rev() {
            if let Err(err) = std::fs::remove_dir(dir) {
                if err.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(cgroup = %dir.display(), %err, "host cgroup not removed");
                }
            }
        }
    }
}

/// Best effort: a parent without the controllers still accounts its
/// children's processes as a whole.
fn enable_controllers(dir: &Path) {
    let Ok(available) = std::fs::read_to_string(dir.join("cgroup.controllers")) else {
        return;
    };
    let wanted: Vec<String> = available
        .split_whitespace()
        .filter(|c| matches!(*c, "cpu" | "memory" | "pids"))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return;
    }
    if let Err(err) = std::fs::write(dir.join("cgroup.subtree_control"), wanted.join(" ")) {
        tracing::debug!(cgroup = %dir.display(), %err, "controllers not enabled for children");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_paths_are_under_the_root() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            resolve(root, "/default/c1"),
            Ok(PathBuf::from("/sys/fs/cgroup/default/c1"))
        );
        assert_eq!(
            resolve(root, "k8s/pod1/"),
            Ok(PathBuf::from("/sys/fs/cgroup/k8s/pod1"))
        );
        assert!(resolve(root, "/").is_err());
        assert!(resolve(root, "/a/../../etc").is_err());
    }

    #[test]
    fn systemd_paths_expand_their_slices() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            resolve(root, "kubepods-besteffort-pod1.slice:cri-containerd:c1"),
            Ok(PathBuf::from(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod1.slice/cri-containerd-c1.scope"
            ))
        );
        assert_eq!(
            resolve(root, "system.slice:isola:c1"),
            Ok(PathBuf::from("/sys/fs/cgroup/system.slice/isola-c1.scope"))
        );
        assert!(resolve(root, "nota:slice:c1").is_err());
        assert!(resolve(root, "a--b.slice:p:c1").is_err());
        assert!(resolve(root, "a.slice:p").is_err());
        assert!(resolve(root, "a.slice:p:../x").is_err());
    }

    #[test]
    fn create_makes_missing_parents_and_remove_undoes_only_them() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids io\n").expect("write");
        std::fs::create_dir(root.join("default")).expect("mkdir");
        let dir = root.join("default/pod/c1");
        let cg = HostCgroup::create(root, &dir).expect("create");
        assert!(dir.is_dir());
        assert_eq!(
            std::fs::read_to_string(root.join("cgroup.subtree_control")).expect("read"),
            "+cpu +memory +pids"
        );
        cg.remove();
        assert!(!root.join("default/pod").exists());
        assert!(
            root.join("default").is_dir(),
            "a parent we did not make stays"
        );
    }

    #[test]
    fn a_cgroup_that_cannot_be_made_fails_the_sandbox_unless_allowed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").expect("write");
        // A file where a parent directory must be: creation fails.
        std::fs::write(root.join("default"), "").expect("write");
        let err = for_sandbox(root, "/default/c1", true, "sb").expect_err("required");
        assert!(err.contains("host cgroup cannot be made"), "{err}");
        assert!(err.contains("runtime.host_cgroup_required"), "{err}");
        assert!(for_sandbox(root, "/default/c1", false, "sb")
            .expect("allowed")
            .is_none());
        let cg = for_sandbox(root, "/other/c1", true, "sb")
            .expect("made")
            .expect("a cgroup");
        assert!(cg.dir().ends_with("other/c1"));
        cg.remove();
        assert!(for_sandbox(root, "/../x", true, "sb").is_err());
    }

    #[test]
    fn create_refuses_a_root_that_is_not_cgroup2() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = HostCgroup::create(tmp.path(), &tmp.path().join("x")).expect_err("not v2");
        assert!(err.to_string().contains("not a cgroup v2 mount"), "{err}");
    }
}
