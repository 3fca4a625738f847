//! The binary's `delete` action: containerd runs it in the bundle of a
//! container whose shim is gone (killed, crashed) to clean up after it.
//! The VM and virtiofsd die with their shim (they get SIGKILL when it
//! dies); whatever is left of them, the sandbox's mounts, run directory,
//! host cgroup, the container's rootfs mount and the shim's socket is
//! removed here.

use std::path::{Path, PathBuf};

use isola_sandbox::child::kill_helpers;
use isola_sandbox::share;

use crate::grouping;
use crate::host_cgroup;
use crate::service::unmount_rootfs;

/// What the delete action did, for its log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub sandbox: String,
    pub killed: Vec<u32>,
    pub removed_run_dir: bool,
    /// A shim still served the sandbox: it was left to it.
    pub shim_alive: bool,
    /// The run directory with the sandbox's id was made for another bundle
    /// (the same id in another containerd namespace): left alone.
    pub other_owner: bool,
}

/// Whether `a` and `b` name one directory (a bundle path given with a
/// symlink in it, as `/var/run/...`, is the same bundle).
fn same_path(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// The owner recorded in `run_dir` when it is not `bundle` (as text for
/// the log; an unreadable record counts as another's). `None`: no record
/// (an older isola's directory), or this bundle's.
fn other_owner(run_dir: &Path, bundle: &Path) -> Option<String> {
    match share::owner(&share::Layout::new(run_dir)) {
        Ok(None) => None,
        Ok(Some(owner)) if same_path(Path::new(&owner), bundle) => None,
        Ok(Some(owner)) => Some(owner.chars().take(256).collect()),
        Err(err) => Some(format!("unreadable: {err}")),
    }
}

/// Cleans up container `id` of the bundle `bundle` in containerd
/// namespace `namespace`, whose sandboxes live under `run_root`; `helpers` are the file names of isola-vmm and
/// virtiofsd (only processes running those are killed). containerd runs
/// the action after every delete, also when the shim lives on (it then
/// stops its sandbox itself): with a shim answering on the bundle's
/// address, only the rootfs is unmounted.
pub fn delete(
    bundle: &Path,
    id: &str,
    namespace: &str,
    run_root: &Path,
    helpers: &[String],
) -> Report {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).ok();
    let annotations = spec.as_ref().and_then(|s| s.annotations().clone());
    let sandbox = grouping::sandbox_id(id, annotations.as_ref());
    let mut report = Report {
        sandbox: sandbox.clone(),
        ..Default::default()
    };
    unmount_rootfs(&bundle.join("rootfs"));
    if shim_answers(bundle) {
        report.shim_alive = true;
        return report;
    }
    if sandbox == id && isola_protocol_id_ok(&sandbox) {
        let run_dir = share::sandbox_dir(run_root, namespace, &sandbox);
        if let Some(other) = other_owner(&run_dir, bundle) {
            // Made for another bundle (run directories of an older isola
            // were named by id alone): its sandbox, not this container's,
            // lives there.
            tracing::warn!(sandbox = %sandbox, dir = %run_dir.display(), owner = %other, "the run directory belongs to another bundle: left alone");
            report.other_owner = true;
            remove_stale_socket(bundle);
            return report;
        }
        report.killed = kill_helpers(&run_dir, helpers);
        if run_dir.exists() {
            let errors = share::unmount_all(&run_dir);
            for err in &errors {
                tracing::warn!(sandbox = %sandbox, %err, "unmounting");
            }
            match share::remove_dir_safely(&run_dir) {
                Ok(()) => report.removed_run_dir = true,
                Err(err) => {
                    tracing::warn!(sandbox = %sandbox, dir = %run_dir.display(), %err, "run directory not removed")
                }
            }
        }
        if let Some(path) = spec
            .as_ref()
            .and_then(|s| s.linux().as_ref())
            .and_then(|l| l.cgroups_path().clone())
        {
            let root = Path::new(host_cgroup::CGROUP_ROOT);
            if let Ok(dir) = host_cgroup::resolve(root, &path.to_string_lossy()) {
                // Only an empty cgroup can go; one with processes stays.
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
    remove_stale_socket(bundle);
    report
}

/// Sandbox ids come from containerd; one that could climb out of the run
/// root is never used as a path.
fn isola_protocol_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
        && id != "."
        && id != ".."
}

/// The shim's address (the bundle's `address` file) accepts connections.
fn shim_answers(bundle: &Path) -> bool {
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else {
        return false;
    };
    let path = address.trim().trim_start_matches("unix://");
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// The shim's socket (named in the bundle's `address` file) if nothing
/// listens on it any more.
fn remove_stale_socket(bundle: &Path) {
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else {
        return;
    };
    let path = PathBuf::from(address.trim().trim_start_matches("unix://"));
    if !path.is_absolute() {
        return;
    }
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(&path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false);
    if is_socket && std::os::unix::net::UnixStream::connect(&path).is_err() {
        let _ = std::fs::remove_file(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_sandbox::child::{processes_naming, runs_one_of};
    use std::time::{Duration, Instant};

    #[test]
    fn ids_that_are_not_single_path_components_are_refused() {
        assert!(isola_protocol_id_ok("c1"));
        assert!(isola_protocol_id_ok("a.b-c_d"));
        assert!(!isola_protocol_id_ok(".."));
        assert!(!isola_protocol_id_ok("a/b"));
        assert!(!isola_protocol_id_ok(""));
        assert!(!isola_protocol_id_ok(&"x".repeat(65)));
    }

    #[test]
    fn helpers_naming_the_run_dir_are_killed_and_the_dir_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let bundle = tempfile::tempdir().expect("tempdir");
        let run_dir = share::sandbox_dir(root.path(), "default", "sb1");
        std::fs::create_dir_all(run_dir.join("rw")).expect("mkdir");
        // Made for this bundle, named through a symlink.
        let link = root.path().join("bundle-link");
        std::os::unix::fs::symlink(bundle.path(), &link).expect("symlink");
        share::write_owner(&share::Layout::new(&run_dir), &link.display().to_string())
            .expect("owner");
        // A helper: its command line names the run directory.
        let sleep = run_dir.join("sleep");
        std::fs::copy("/usr/bin/sleep", &sleep).expect("copy sleep");
        let mut child = std::process::Command::new(&sleep)
            .arg("100")
            .spawn()
            .expect("spawn");
        // Until it has exec'd, its command line is this test's; and the
        // kernel shows the new executable a moment before the new command
        // line: wait for both.
        let deadline = Instant::now() + Duration::from_secs(10);
        let needle = format!("{}/", run_dir.display());
        while !runs_one_of(child.id(), &["sleep".to_string()])
            || !processes_naming(&needle)
                .iter()
                .any(|(pid, _)| *pid == child.id())
        {
            assert!(Instant::now() < deadline, "the helper never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let report = delete(
            bundle.path(),
            "sb1",
            "default",
            root.path(),
            &["sleep".to_string()],
        );
        assert!(report.killed.contains(&child.id()), "{:?}", report.killed);
        assert!(report.removed_run_dir);
        assert!(!run_dir.exists());
        let status = child.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }

    #[test]
    fn the_same_id_in_another_namespace_is_left_alone() {
        let root = tempfile::tempdir().expect("tempdir");
        let ours = tempfile::tempdir().expect("tempdir");
        let theirs = share::sandbox_dir(root.path(), "other", "sb1");
        std::fs::create_dir_all(theirs.join("rw")).expect("mkdir");
        share::write_owner(
            &share::Layout::new(&theirs),
            "/run/containerd/io.containerd.runtime.v2.task/other/sb1",
        )
        .expect("owner");
        // Our namespace's directory of the id, made for another bundle.
        let foreign = share::sandbox_dir(root.path(), "default", "sb1");
        std::fs::create_dir_all(foreign.join("rw")).expect("mkdir");
        share::write_owner(&share::Layout::new(&foreign), "/elsewhere/sb1").expect("owner");
        let report = delete(
            ours.path(),
            "sb1",
            "default",
            root.path(),
            &["sleep".to_string()],
        );
        assert!(report.other_owner, "{report:?}");
        assert!(!report.removed_run_dir && report.killed.is_empty());
        assert!(
            foreign.join("rw").exists(),
            "another bundle's sandbox was removed"
        );
        assert!(
            theirs.join("rw").exists(),
            "another namespace's sandbox was removed"
        );
        // With no directory of ours, the other namespace's is not looked at.
        std::fs::remove_dir_all(&foreign).expect("rm");
        let report = delete(ours.path(), "sb1", "default", root.path(), &[]);
        assert!(!report.other_owner && !report.removed_run_dir, "{report:?}");
        assert!(
            theirs.join("rw").exists(),
            "another namespace's sandbox was removed"
        );
    }

    #[test]
    fn a_pod_container_leaves_its_sandbox_alone() {
        let root = tempfile::tempdir().expect("tempdir");
        let bundle = tempfile::tempdir().expect("tempdir");
        let pod = share::sandbox_dir(root.path(), "k8s.io", "pod1");
        std::fs::create_dir_all(&pod).expect("mkdir");
        std::fs::write(
            bundle.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"pod1"}}"#,
        )
        .expect("write");
        let report = delete(bundle.path(), "c1", "k8s.io", root.path(), &[]);
        assert_eq!(report.sandbox, "pod1");
        assert!(!report.removed_run_dir);
        assert!(pod.exists());
    }

    #[test]
    fn a_stale_socket_is_removed() {
        let bundle = tempfile::tempdir().expect("tempdir");
        let sock = bundle.path().join("shim.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
        std::fs::write(
            bundle.path().join("address"),
            format!("unix://{}", sock.display()),
        )
        .expect("write");
        remove_stale_socket(bundle.path());
        assert!(!sock.exists());
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;
    use isola_sandbox::child::{alive, runs_one_of};
    use std::time::{Duration, Instant};

    #[test]
    fn a_live_shim_keeps_its_sandbox() {
        let root = tempfile::tempdir().expect("tempdir");
        let bundle = tempfile::tempdir().expect("tempdir");
        let run_dir = share::sandbox_dir(root.path(), "default", "sb2");
        std::fs::create_dir_all(&run_dir).expect("mkdir");
        let sock = bundle.path().join("shim.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        std::fs::write(
            bundle.path().join("address"),
            format!("unix://{}", sock.display()),
        )
        .expect("write");
        let report = delete(bundle.path(), "sb2", "default", root.path(), &[]);
        assert!(report.shim_alive);
        assert!(run_dir.exists());
        assert!(sock.exists());
    }

    #[test]
    fn only_helper_executables_are_killed() {
        let root = tempfile::tempdir().expect("tempdir");
        let bundle = tempfile::tempdir().expect("tempdir");
        let run_dir = share::sandbox_dir(root.path(), "default", "sb3");
        std::fs::create_dir_all(&run_dir).expect("mkdir");
        let sleep = run_dir.join("sleep");
        std::fs::copy("/usr/bin/sleep", &sleep).expect("copy sleep");
        let mut bystander = std::process::Command::new(&sleep)
            .arg("100")
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !runs_one_of(bystander.id(), &["sleep".to_string()]) {
            assert!(Instant::now() < deadline, "never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let report = delete(
            bundle.path(),
            "sb3",
            "default",
            root.path(),
            &["isola-vmm".to_string()],
        );
        assert!(report.killed.is_empty(), "{:?}", report.killed);
        assert!(alive(bystander.id()));
        let _ = bystander.kill();
        let _ = bystander.wait();
    }
}
