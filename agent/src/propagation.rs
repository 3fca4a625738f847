//! A container's per-mount propagation, as runc makes it.
//!
//! A mount's options may name propagation flags (`rshared`, `rslave`,
//! `rprivate`, ...: containerd writes `rshared` for Kubernetes'
//! Bidirectional volumes, `rslave` for HostToContainer, `rprivate` for the
//! rest; Docker's `-v` takes them too). runc applies them, in order, to
//! the mount's destination once the mount is made. libcontainer 0.7 parses
//! them and applies none (its mount flow is open_tree, mount_setattr,
//! move_mount, with no propagation), so an `rshared` volume stayed private
//! in the container. The agent applies them after libcontainer created the
//! container and before it starts: in a child process that enters the
//! container's mount namespace and root ([`apply`]).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};
use oci_spec::runtime::Spec;

/// A propagation option's flags, or None for any other option.
pub fn flags_of(option: &str) -> Option<MsFlags> {
    use isola_protocol::propagation::{parse, Propagation};
    let (p, recursive) = parse(option)?;
    let flags = match p {
        Propagation::Shared => MsFlags::MS_SHARED,
        Propagation::Slave => MsFlags::MS_SLAVE,
        Propagation::Private => MsFlags::MS_PRIVATE,
        Propagation::Unbindable => MsFlags::MS_UNBINDABLE,
    };
    Some(if recursive {
        flags | MsFlags::MS_REC
    } else {
        flags
    })
}

/// The propagation changes of `spec`'s mounts, in mount order and, per
/// mount, in the order its options give them: (destination, flags).
pub fn plan(spec: &Spec) -> Vec<(PathBuf, MsFlags)> {
    spec.mounts()
        .iter()
        .flatten()
        .flat_map(|m| {
            m.options()
                .iter()
                .flatten()
                .filter_map(|o| flags_of(o))
                .map(move |f| (m.destination().clone(), f))
        })
        .collect()
}

/// Makes the propagation changes of `plan` in the mount namespace of `pid`
/// (a created container's init, not started yet), each destination taken
/// inside the container's root. The agent must be single-threaded: it
/// forks.
pub fn apply(pid: u32, plan: &[(PathBuf, MsFlags)]) -> Result<()> {
    if plan.is_empty() {
        return Ok(());
    }
    let open = |what: &str, flags: nix::fcntl::OFlag| -> Result<OwnedFd> {
        let path = format!("/proc/{pid}/{what}");
        nix::fcntl::open(
            path.as_str(),
            flags | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .with_context(|| format!("opening {path}"))
    };
    let mnt_ns = open("ns/mnt", nix::fcntl::OFlag::O_RDONLY)?;
    let root = open(
        "root",
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
    )?;
    // Paths as C strings before the fork: the child only makes syscalls.
    let targets: Vec<std::ffi::CString> = plan
        .iter()
        .map(|(dest, _)| {
            use std::os::unix::ffi::OsStrExt;
            std::ffi::CString::new(dest.as_os_str().as_bytes())
                .with_context(|| format!("{}: a NUL in the path", dest.display()))
        })
        .collect::<Result<_>>()?;
    let (read_end, write_end) = nix::unistd::pipe().context("a pipe for the child's answer")?;
    // SAFETY: the agent is single-threaded when it creates a container
    // (checked before libcontainer forks), so the child is a whole copy;
    // it only makes syscalls and leaves with _exit.
    match unsafe { nix::unistd::fork() }.context("forking")? {
        nix::unistd::ForkResult::Child => {
            drop(read_end);
            // The answer: the step that failed (0: none, 1: entering the
            // container, 2 + i: change i) and its errno.
            let (step, errno) = match child(&mnt_ns, &root, &targets, plan) {
                Ok(()) => (0u32, 0i32),
                Err((None, e)) => (1, e as i32),
                Err((Some(i), e)) => (2u32.saturating_add(i as u32), e as i32),
            };
            let mut code = [0u8; 8];
            code[..4].copy_from_slice(&step.to_le_bytes());
            code[4..].copy_from_slice(&errno.to_le_bytes());
            let _ = nix::unistd::write(&write_end, &code);
            // SAFETY: _exit ends the child without running the parent's
            // atexit handlers or destructors.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(write_end);
            let mut answer = [0u8; 8];
            let got = read_full(&read_end, &mut answer);
            let _ = nix::sys::wait::waitpid(child, None);
            if got != answer.len() {
                bail!("the child that sets mount propagation died without an answer");
            }
            let step = u32::from_le_bytes([answer[0], answer[1], answer[2], answer[3]]);
            let errno = nix::errno::Errno::from_raw(i32::from_le_bytes([
                answer[4], answer[5], answer[6], answer[7],
            ]));
            match step {
                0 => Ok(()),
                1 => bail!(
                    "entering the container's mount namespace and root: {}",
                    errno.desc()
                ),
                n => {
                    let (dest, flags) = plan
                        .get(n as usize - 2)
                        .map(|(d, f)| (d.as_path(), *f))
                        .unwrap_or((Path::new("?"), MsFlags::empty()));
                    bail!("{} ({flags:?}): {}", dest.display(), errno.desc())
                }
            }
        }
    }
}

/// In the forked child: into the container's mount namespace and root,
/// then each change. The first failure: the change's index (None while
/// entering) and the errno.
fn child(
    mnt_ns: &OwnedFd,
    root: &OwnedFd,
    targets: &[std::ffi::CString],
    plan: &[(PathBuf, MsFlags)],
) -> Result<(), (Option<usize>, nix::errno::Errno)> {
    nix::sched::setns(mnt_ns, nix::sched::CloneFlags::CLONE_NEWNS)
        .and_then(|()| nix::unistd::fchdir(root))
        .and_then(|()| nix::unistd::chroot("."))
        .map_err(|e| (None, e))?;
    for (i, (target, (_, flags))) in targets.iter().zip(plan).enumerate() {
        mount(
            None::<&str>,
            target.as_c_str(),
            None::<&str>,
            *flags,
            None::<&str>,
        )
        .map_err(|e| (Some(i), e))?;
    }
    Ok(())
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_is_runcs_propagation_options_in_order() {
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","mounts":[
                {"destination":"/proc","type":"proc","source":"proc"},
                {"destination":"/vol","type":"bind","source":"/s","options":["rbind","rprivate","rshared","rw"]},
                {"destination":"/etc/hosts","type":"bind","source":"/h","options":["bind","ro"]},
                {"destination":"/h2c","type":"bind","source":"/s2","options":["rbind","rslave"]}
            ]}"#,
        )
        .expect("spec");
        let rec = MsFlags::MS_REC;
        assert_eq!(
            plan(&spec),
            vec![
                (PathBuf::from("/vol"), MsFlags::MS_PRIVATE | rec),
                (PathBuf::from("/vol"), MsFlags::MS_SHARED | rec),
                (PathBuf::from("/h2c"), MsFlags::MS_SLAVE | rec),
            ]
        );
        assert_eq!(flags_of("runbindable"), Some(MsFlags::MS_UNBINDABLE | rec));
        assert_eq!(flags_of("rbind"), None);
    }
}
