//! A sandbox's host process in a mount namespace of its own.
//!
//! The shim (and whatever it starts: virtiofsd, isola-vmm) keeps the
//! sandbox's mounts, the Share's binds and the container rootfs it mounts,
//! out of the host's mount namespace, as runc keeps a container's in the
//! container's. Three things follow, each of which the host's namespace
//! got wrong:
//!
//! - a mount of a volume's source can be undone on the host while the
//!   sandbox runs: `rmdir` of a directory that is a mount point only in
//!   another namespace detaches those mounts (Linux 3.18 and later),
//!   while a mount point in the caller's own namespace is `EBUSY`
//!   (kubelet and critest remove their hostPath directories that way);
//! - the host's mount table does not grow by a dozen entries per pod
//!   (systemd and every tool that scans `/proc/self/mountinfo` pay for
//!   each);
//! - a shim killed with SIGKILL leaves no mount behind: the namespace goes
//!   with its last process.
//!
//! The namespace starts as a copy of the host's with every mount made a
//! slave (`MS_REC | MS_SLAVE`): mounts the host makes later under a shared
//! mount (systemd makes `/` shared on every node; kubelet makes its
//! directory `rshared`) still arrive, so a volume with host-to-container
//! propagation sees them, and nothing made here goes back.

use std::io;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Moves the calling process into a new mount namespace whose mounts are
/// slaves of the host's. Must run while the process has a single thread:
/// `unshare(CLONE_NEWNS)` moves only the calling thread, so it is refused
/// (with the thread count) otherwise.
pub fn enter_private() -> io::Result<()> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "a private mount namespace must be entered before any thread starts; this process has {threads}"
        )));
    }
    unshare(CloneFlags::CLONE_NEWNS).map_err(|errno| {
        io::Error::new(
            io::Error::from(errno).kind(),
            format!("unshare(CLONE_NEWNS): {}", errno.desc()),
        )
    })?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none).map_err(|errno| {
        io::Error::new(
            io::Error::from(errno).kind(),
            format!("making / a recursive slave: {}", errno.desc()),
        )
    })
}

fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")
        .map_err(|e| io::Error::new(e.kind(), format!("/proc/self/task: {e}")))?
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_with_threads_is_refused_before_anything_changes() {
        let ns_before = std::fs::read_link("/proc/thread-self/ns/mnt").ok();
        // The test harness runs this on a thread of its own; one more makes
        // sure of it.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        let err = enter_private().err().map(|e| e.to_string());
        drop(tx);
        let _ = other.join();
        let err = err.unwrap_or_default();
        assert!(err.contains("before any thread starts"), "{err}");
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/mnt").ok(),
            ns_before
        );
    }
}
