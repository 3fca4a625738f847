//! The jail (`--jail uid=U,gid=G,root=DIR`): isola-vmm confines itself
//! before the guest can reach it.
//!
//! Firecracker's jailer is a separate program that prepares a chroot and
//! execs the VMM in it; isola-vmm does the same work itself, in phases,
//! so that nothing the jailed VMM needs has to exist inside its root:
//!
//! 1. [`enter_pid_namespace`], first thing: isola-vmm forks into a new pid
//!    namespace. The parent stays outside as a small supervisor (the pid
//!    its caller knows, in the caller's network namespace): it forwards
//!    SIGTERM/SIGINT/SIGHUP, and ends as the VMM ended. The child, pid 1 of
//!    its namespace, dies with the supervisor (`PR_SET_PDEATHSIG`).
//! 2. [`isolate`]: new mount, IPC, UTS and network namespaces (the taps
//!    are descriptors; nothing else of the network is needed), every mount
//!    private, an empty tmpfs over `DIR` (in this namespace only).
//! 3. The caller then opens what the VM needs, as root: `/dev/kvm`, the
//!    kernel and initrd, the console file; it binds the vsock and API
//!    sockets and connects to the virtio-fs back ends.
//! 4. [`lock_down`], while the process still has one thread: pivot into
//!    the tmpfs (read-only, nothing in it), drop the old root, drop every
//!    capability from every set including the bounding set, become `U:G`
//!    with no supplementary groups, `no_new_privs`, not dumpable.
//!
//! Then the VM is built and run with the jailed seccomp filters (no
//! `socket`, `connect` or `unlink`: the vsock device refuses the guest's
//! connections to host ports, there being no host path it could reach).
//!
//! A jailed template VM (`--template DIR --jail …`) writes its state
//! through the file it created before the jail, but cannot rename it into
//! place: `DIR` is neither in its root nor writable by its user. The
//! supervisor does that last step ([`Publish`]), once the VMM exited
//! successfully, so a template appears whole or not at all, and only the
//! supervisor, which never runs guest-facing code, keeps root.

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{
    chdir, fork, getresgid, getresuid, pivot_root, setgroups, setresgid, setresuid, ForkResult,
    Gid, Pid, Uid,
};

/// Where and as whom the VMM is jailed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The unprivileged user the VMM becomes (not 0).
    pub uid: u32,
    /// Its group (not 0).
    pub gid: u32,
    /// An existing, empty directory: the VMM's root is a tmpfs mounted
    /// over it in the VMM's own mount namespace.
    pub root: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JailConfigError {
    #[error("--jail: expected uid=U,gid=G,root=DIR, got {0:?}")]
    Shape(String),
    #[error("--jail: {0} must be a number from 1 to 4294967294 (the jail never runs as root)")]
    Id(String),
    #[error("--jail: root {0:?} must be an absolute path")]
    Root(String),
}

impl FromStr for JailConfig {
    type Err = JailConfigError;
    fn from_str(s: &str) -> Result<Self, JailConfigError> {
        let (mut uid, mut gid, mut root) = (None, None, None);
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| JailConfigError::Shape(s.to_string()))?;
            let id = || {
                value
                    .parse::<u32>()
                    .ok()
                    .filter(|v| *v != 0 && *v != u32::MAX)
                    .ok_or_else(|| JailConfigError::Id(part.to_string()))
            };
            match key {
                "uid" if uid.is_none() => uid = Some(id()?),
                "gid" if gid.is_none() => gid = Some(id()?),
                "root" if root.is_none() => {
                    if !value.starts_with('/') {
                        return Err(JailConfigError::Root(value.to_string()));
                    }
                    root = Some(PathBuf::from(value));
                }
                _ => return Err(JailConfigError::Shape(s.to_string())),
            }
        }
        match (uid, gid, root) {
            (Some(uid), Some(gid), Some(root)) => Ok(JailConfig { uid, gid, root }),
            _ => Err(JailConfigError::Shape(s.to_string())),
        }
    }
}

impl fmt::Display for JailConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "uid={},gid={},root={}",
            self.uid,
            self.gid,
            self.root.display()
        )
    }
}

/// A rename the supervisor makes in a directory (opened before the jail)
/// once the jailed VMM exited with status 0: a template's state file into
/// place. `from` must then be a regular, non-empty file (not a link).
#[derive(Debug)]
pub struct Publish {
    dir: OwnedFd,
    dir_path: PathBuf,
    from: String,
    to: String,
}

impl Publish {
    /// Opens `dir` (a directory, not a link to one) for the rename
    /// `from` -> `to` inside it.
    pub fn open(dir: &Path, from: &str, to: &str) -> Result<Publish> {
        let fd = nix::fcntl::open(
            dir,
            nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC
                | nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .with_context(|| format!("opening {}", dir.display()))?;
        Ok(Publish {
            dir: fd,
            dir_path: dir.to_path_buf(),
            from: from.to_string(),
            to: to.to_string(),
        })
    }

    /// The rename, if `from` is a regular file with something in it.
    pub fn run(&self) -> Result<()> {
        let what = || format!("{}/{}", self.dir_path.display(), self.from);
        let st = nix::sys::stat::fstatat(
            self.dir.as_fd(),
            self.from.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .with_context(|| format!("{} (the saved state)", what()))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            bail!("{} is not a regular file", what());
        }
        if st.st_size == 0 {
            bail!("{} is empty: the VM saved nothing", what());
        }
        nix::fcntl::renameat(
            self.dir.as_fd(),
            self.from.as_str(),
            self.dir.as_fd(),
            self.to.as_str(),
        )
        .with_context(|| format!("renaming {} to {}", what(), self.to))
    }
}

/// The signals the supervisor forwards to the jailed VMM.
const FORWARDED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// Forks into a new pid namespace. Returns in the child (pid 1 there);
/// the parent supervises it and never returns. `child_fds` are
/// descriptors the child owns (the taps): the supervisor closes its
/// copies. The child closes every other inherited descriptor above 2.
/// `publish`: what the supervisor renames once the VMM exited with 0
/// (a template's state); if that fails, the supervisor exits with 1.
///
/// Call it while the process has one thread, with SIGTERM, SIGINT and
/// SIGHUP blocked (`vm::block_exit_signals`).
pub fn enter_pid_namespace(child_fds: &[RawFd], publish: Option<Publish>) -> Result<()> {
    ensure_single_threaded("entering the jail's pid namespace")?;
    // SIGCHLD blocked before the fork: one the supervisor has not asked
    // for yet is kept pending, not discarded.
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    chld.thread_block().context("blocking SIGCHLD")?;
    unshare(CloneFlags::CLONE_NEWPID).context("unshare(CLONE_NEWPID)")?;
    // The child learns that the supervisor died before it could ask for
    // PR_SET_PDEATHSIG from this pipe's other end closing.
    let (alive_r, alive_w) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: the process has one thread (checked above), so the child
    // may run any code, not only async-signal-safe functions.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Parent { child } => {
            drop(alive_r);
            for fd in child_fds {
                // SAFETY: the descriptor is the child's to use; the
                // supervisor never touches it again.
                unsafe { libc::close(*fd) };
            }
            supervise(child, alive_w, publish)
        }
        ForkResult::Child => {
            drop(alive_w);
            drop(publish);
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
                bail!("PR_SET_PDEATHSIG: {}", std::io::Error::last_os_error());
            }
            if supervisor_gone(&alive_r) {
                std::process::exit(1);
            }
            drop(alive_r);
            chld.thread_unblock().context("unblocking SIGCHLD")?;
            close_inherited(child_fds).context("closing inherited descriptors")?;
            Ok(())
        }
    }
}

/// Whether the pipe's write end (held by the supervisor) is closed.
fn supervisor_gone(read_end: &OwnedFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: read_end.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    n != 0 && fds[0].revents & (libc::POLLHUP | libc::POLLIN) != 0
}

/// Closes every descriptor above 2 but `keep`.
fn close_inherited(keep: &[RawFd]) -> Result<()> {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .context("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: an inherited descriptor nothing in this process owns
            // (the listing's own was closed when the iterator ended, and
            // closing it again fails harmlessly).
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// The supervisor: forwards the exit signals to the VMM, and ends as it
/// ended (its exit status, or killed by its signal), after `publish` if
/// it ended well.
fn supervise(child: Pid, _alive: OwnedFd, publish: Option<Publish>) -> ! {
    let mut wait_for = SigSet::empty();
    wait_for.add(Signal::SIGCHLD);
    for s in FORWARDED {
        wait_for.add(s);
    }
    // They are all blocked: SIGCHLD above, the others by the caller.
    let _ = wait_for.thread_block();
    loop {
        match wait_for.wait() {
            Ok(Signal::SIGCHLD) => loop {
                match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, 0)) => match publish.as_ref().map(Publish::run) {
                        Some(Err(err)) => {
                            eprintln!("isola-vmm: error: the template was not published: {err:#}");
                            std::process::exit(1);
                        }
                        Some(Ok(())) | None => std::process::exit(0),
                    },
                    Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
                    Ok(WaitStatus::Signaled(_, signal, _)) => die_by(signal),
                    Ok(WaitStatus::StillAlive) => break,
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(err) => {
                        eprintln!("isola-vmm: error: waiting for the jailed VMM: {err}");
                        std::process::exit(1);
                    }
                }
            },
            Ok(signal) => {
                let _ = kill(child, signal);
            }
            Err(_) => continue,
        }
    }
}

/// Ends the supervisor by `signal`, as the VMM ended.
fn die_by(signal: Signal) -> ! {
    // SAFETY: resets one signal's disposition to its default.
    unsafe { libc::signal(signal as libc::c_int, libc::SIG_DFL) };
    let mut set = SigSet::empty();
    set.add(signal);
    let _ = set.thread_unblock();
    let _ = nix::sys::signal::raise(signal);
    // A signal whose default is not to end the process.
    std::process::exit(128 + signal as i32);
}

/// Fails unless the calling process has exactly one thread: namespaces
/// cannot be unshared, nor privileges dropped for every thread, after
/// threads start.
pub fn ensure_single_threaded(what: &str) -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").context("/proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    match threads {
        Some(1) => Ok(()),
        Some(n) => bail!("{what}: the process already has {n} threads"),
        None => bail!("{what}: /proc/self/status has no thread count"),
    }
}

/// New mount, IPC, UTS and network namespaces; every mount private; an
/// empty tmpfs over the jail's root directory.
pub fn isolate(config: &JailConfig) -> Result<()> {
    ensure_single_threaded("isolating the VMM")?;
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET,
    )
    .context("unshare(mount, IPC, UTS, network)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making every mount private")?;
    let meta = std::fs::symlink_metadata(&config.root)
        .with_context(|| format!("jail root {}", config.root.display()))?;
    if !meta.is_dir() {
        bail!("jail root {} is not a directory", config.root.display());
    }
    mount(
        Some("isola-jail"),
        &config.root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k,nr_inodes=16,mode=0555"),
    )
    .with_context(|| format!("mounting the jail's tmpfs on {}", config.root.display()))?;
    nix::unistd::sethostname("isola-vmm").context("sethostname")?;
    Ok(())
}

/// Pivots into the jail's root and drops every privilege; the process
/// must still have one thread.
pub fn lock_down(config: &JailConfig) -> Result<()> {
    ensure_single_threaded("locking the VMM down")?;
    chdir(&config.root).with_context(|| format!("chdir {}", config.root.display()))?;
    pivot_root(".", ".").context("pivot_root into the jail")?;
    umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?;
    chdir("/").context("chdir /")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .context("making the jail's root read-only")?;
    drop_privileges(config.uid, config.gid)
}

/// Every capability out of every set (bounding and ambient too), then
/// `uid:gid` with no supplementary groups, `no_new_privs`, not dumpable;
/// checked afterwards.
fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    use caps::CapSet;
    caps::clear(None, CapSet::Ambient).context("clearing the ambient capabilities")?;
    for cap in caps::runtime::thread_all_supported() {
        caps::drop(None, CapSet::Bounding, cap)
            .with_context(|| format!("dropping {cap} from the bounding set"))?;
    }
    caps::clear(None, CapSet::Inheritable).context("clearing the inheritable capabilities")?;
    setgroups(&[]).context("setgroups([])")?;
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setresgid(gid, gid, gid).with_context(|| format!("setresgid({gid})"))?;
    setresuid(uid, uid, uid).with_context(|| format!("setresuid({uid})"))?;
    // Leaving uid 0 emptied the permitted and effective sets already.
    caps::clear(None, CapSet::Effective).context("clearing the effective capabilities")?;
    caps::clear(None, CapSet::Permitted).context("clearing the permitted capabilities")?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        bail!("PR_SET_NO_NEW_PRIVS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        bail!("PR_SET_DUMPABLE: {}", std::io::Error::last_os_error());
    }
    verify(uid, gid)
}

/// What the jail promises, read back from the kernel.
fn verify(uid: Uid, gid: Gid) -> Result<()> {
    use caps::CapSet;
    let ids = getresuid().context("getresuid")?;
    let gids = getresgid().context("getresgid")?;
    if [ids.real, ids.effective, ids.saved] != [uid; 3]
        || [gids.real, gids.effective, gids.saved] != [gid; 3]
    {
        bail!("the jail's user is not {uid}:{gid}");
    }
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
        CapSet::Bounding,
    ] {
        let held = caps::read(None, set).with_context(|| format!("reading {set:?}"))?;
        if !held.is_empty() {
            bail!("the jail still holds {set:?} capabilities {held:?}");
        }
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } != 1 {
        bail!("no_new_privs is not set");
    }
    let entries = std::fs::read_dir("/")
        .context("listing the jail's root")?
        .count();
    if entries != 0 {
        bail!("the jail's root is not empty ({entries} entries)");
    }
    Ok(())
}

/// The whole jail without a VM (`isola-vmm --check-jail`): enters it as
/// the VMM would and reports what it found; for `isola check`.
pub fn check(config: &JailConfig) -> Result<String> {
    isolate(config)?;
    lock_down(config)?;
    let ids = getresuid().context("getresuid")?;
    let cwd = CString::new("/").context("path")?;
    // SAFETY: a valid NUL-terminated path; access(2) only reads it.
    let writable = unsafe { libc::access(cwd.as_ptr(), libc::W_OK) } == 0;
    if writable {
        bail!("the jail's root is writable");
    }
    Ok(format!(
        "jail: ok (pid {} in its own pid, mount, IPC, UTS and network namespaces; uid {}; \
         no capabilities; no_new_privs; an empty read-only root)",
        std::process::id(),
        ids.effective
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_what_is_wrong() {
        let c: JailConfig = "uid=70000,gid=70001,root=/run/isola/x/jail"
            .parse()
            .unwrap();
        assert_eq!(
            c,
            JailConfig {
                uid: 70000,
                gid: 70001,
                root: "/run/isola/x/jail".into()
            }
        );
        assert_eq!(c.to_string().parse::<JailConfig>().unwrap(), c);
        for bad in [
            "",
            "uid=1,gid=1",
            "uid=1,gid=1,root=/j,uid=2",
            "uid=1,gid=1,root=/j,extra=1",
            "uid",
        ] {
            assert!(
                matches!(bad.parse::<JailConfig>(), Err(JailConfigError::Shape(_))),
                "{bad}"
            );
        }
        assert_eq!(
            "uid=0,gid=1,root=/j".parse::<JailConfig>(),
            Err(JailConfigError::Id("uid=0".into()))
        );
        assert_eq!(
            "uid=1,gid=4294967295,root=/j".parse::<JailConfig>(),
            Err(JailConfigError::Id("gid=4294967295".into()))
        );
        assert!("uid=1;gid=1;root=/j".parse::<JailConfig>().is_err());
        assert_eq!(
            "uid=1,gid=x,root=/j".parse::<JailConfig>(),
            Err(JailConfigError::Id("gid=x".into()))
        );
        assert_eq!(
            "uid=1,gid=1,root=rel".parse::<JailConfig>(),
            Err(JailConfigError::Root("rel".into()))
        );
    }

    #[test]
    fn publishes_only_a_saved_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let publish = Publish::open(dir.path(), "state.json.partial", "state.json").unwrap();
        // Nothing saved: no file, an empty one, a link, a directory.
        let err = publish.run().unwrap_err();
        assert!(format!("{err:#}").contains("state.json.partial"), "{err:#}");
        std::fs::write(dir.path().join("state.json.partial"), b"").unwrap();
        let err = publish.run().unwrap_err();
        assert!(format!("{err:#}").contains("empty"), "{err:#}");
        std::fs::remove_file(dir.path().join("state.json.partial")).unwrap();
        std::fs::write(dir.path().join("elsewhere"), b"{}").unwrap();
        std::os::unix::fs::symlink("elsewhere", dir.path().join("state.json.partial")).unwrap();
        let err = publish.run().unwrap_err();
        assert!(format!("{err:#}").contains("not a regular file"), "{err:#}");
        assert!(!dir.path().join("state.json").exists());
        std::fs::remove_file(dir.path().join("state.json.partial")).unwrap();
        // Saved: renamed into place.
        std::fs::write(dir.path().join("state.json.partial"), b"{}").unwrap();
        publish.run().unwrap();
        assert_eq!(std::fs::read(dir.path().join("state.json")).unwrap(), b"{}");
        assert!(!dir.path().join("state.json.partial").exists());
        // A directory given as a link is refused.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert!(Publish::open(&link, "a", "b").is_err());
    }
}
