//! The guest side of a sandbox: DNS, the virtio-fs share, the network
//! namespace every container joins, and the sandbox cgroup.
//!
//! Layout in the guest:
//!
//! ```text
//! /run/isola/sandbox/resolv.conf   DNS, a bind-mount source for containers
//! /run/isola/sandbox/netns         the sandbox's network namespace (nsfs)
//! /run/isola/sandbox/ephemeral/<key>  an ephemeral volume (Memory emptyDir):
//!                                  a tmpfs, bound into the containers that
//!                                  mount it
//! /run/isola/share                 the virtio-fs share (default mount point)
//! /run/isola/containers/<id>/      bundles: config.json, exec-<id>.json
//! /run/isola/consoles/<n>.sock     console sockets, while a terminal's pty
//!                                  is handed over (short: a bundle path
//!                                  with two 64-character ids is longer
//!                                  than a Unix socket address)
//! /run/isola/namespaces/{ipc,uts,pid}  the sandbox container's (a pod's
//!                                  pause) namespaces, kept (nsfs binds)
//!                                  for the containers that share them
//! /run/isola/state/<id>/           libcontainer's state
//! /sys/fs/cgroup/isola/<id>/       each container's cgroup
//! ```

use std::fmt::Write as _;
use std::fs;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use isola_protocol::SHAREABLE_NAMESPACES;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::LinuxNamespaceType;

use crate::spec::SpecError;

pub const SANDBOX_DIR: &str = "/run/isola/sandbox";
pub const RESOLV_CONF: &str = "/run/isola/sandbox/resolv.conf";
pub const NETNS: &str = "/run/isola/sandbox/netns";
pub const EPHEMERAL_DIR: &str = "/run/isola/sandbox/ephemeral";
pub const DEFAULT_SHARE: &str = "/run/isola/share";
pub const BUNDLES: &str = "/run/isola/containers";
pub const STATE: &str = "/run/isola/state";
pub const CONSOLES: &str = "/run/isola/consoles";
/// Where the sandbox container's namespaces are kept ([`pin_namespaces`]).
pub const POD_NAMESPACES: &str = "/run/isola/namespaces";
/// The sandbox cgroup, relative to the cgroup root.
pub const CGROUP_PARENT: &str = "/isola";
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A new console socket path in `dir` ([`CONSOLES`]): a number from a
/// counter, so its length does not grow with the container or exec id.
pub fn console_socket(dir: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Path::new(dir).join(format!("{n}.sock"))
}

/// Most nameservers, search domains and options (glibc reads 3, 6, ...;
/// the bound keeps the file small).
const MAX_DNS_ENTRIES: usize = 32;

fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

fn dns_word(field: &str, i: usize, word: &str) -> Result<(), SpecError> {
    if word.is_empty()
        || word.len() > 253
        || word.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(err(
            format!("{field}[{i}]"),
            format!("{word:?} is not a single word of at most 253 characters"),
        ));
    }
    Ok(())
}

/// The text of resolv.conf for the request's DNS settings.
pub fn resolv_conf(
    nameservers: &[String],
    searches: &[String],
    options: &[String],
) -> Result<String, SpecError> {
    for (field, list) in [
        ("dns.nameservers", nameservers),
        ("dns.searches", searches),
        ("dns.options", options),
    ] {
        if list.len() > MAX_DNS_ENTRIES {
            return Err(err(field, format!("more than {MAX_DNS_ENTRIES} entries")));
        }
    }
    let mut text = String::new();
    for (i, ns) in nameservers.iter().enumerate() {
        let ip: IpAddr = ns.parse().map_err(|_| {
            err(
                format!("dns.nameservers[{i}]"),
                format!("{ns:?} is not an IP address"),
            )
        })?;
        let _ = writeln!(text, "nameserver {ip}");
    }
    for (i, s) in searches.iter().enumerate() {
        dns_word("dns.searches", i, s)?;
    }
    if !searches.is_empty() {
        let _ = writeln!(text, "search {}", searches.join(" "));
    }
    for (i, o) in options.iter().enumerate() {
        dns_word("dns.options", i, o)?;
    }
    if !options.is_empty() {
        let _ = writeln!(text, "options {}", options.join(" "));
    }
    Ok(text)
}

/// The share's mount point: the request's (absolute, no `..`) or the
/// default.
pub fn share_mount_point(requested: &str) -> Result<PathBuf, SpecError> {
    if requested.is_empty() {
        return Ok(PathBuf::from(DEFAULT_SHARE));
    }
    let p = Path::new(requested);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) || p == Path::new("/")
    {
        return Err(err(
            "share_mount_point",
            format!("{requested:?} is not an absolute path below /"),
        ));
    }
    Ok(p.to_path_buf())
}

/// A hostname the kernel takes (1 to 64 bytes, no NUL or slash).
pub fn check_hostname(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(err(
            "hostname",
            format!("{name:?} is not a hostname (1 to 64 of [A-Za-z0-9.-])"),
        ))
    }
}

/// Mounts the virtio-fs `tag` on `mount_point`: nodev, not nosuid. The
/// containers' root file systems and volumes are in it, and a setuid
/// binary there (an image's `sudo`, `ping`) works as under runc: inside
/// the VM, runc's semantics hold; the VM is the boundary. (Device nodes
/// stay refused: the container's devices are those its spec gives.)
pub fn mount_share(tag: &str, mount_point: &Path) -> Result<()> {
    fs::create_dir_all(mount_point)
        .with_context(|| format!("creating {}", mount_point.display()))?;
    mount(
        Some(tag),
        mount_point,
        Some("virtiofs"),
        MsFlags::MS_NODEV,
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "mounting virtio-fs tag {tag:?} on {}",
            mount_point.display()
        )
    })
}

/// The tmpfs data of an ephemeral volume: mode 0777 as kubelet's emptyDir,
/// and its size if it has one.
pub fn ephemeral_tmpfs_data(size: Option<u64>) -> String {
    match size {
        Some(bytes) => format!("mode=0777,size={bytes}"),
        None => "mode=0777".to_string(),
    }
}

/// Mounts an ephemeral volume's tmpfs (nosuid, nodev) on `dir`, made if
/// missing. Never unmounted: it lives until the VM goes.
pub fn mount_ephemeral(dir: &Path, size: Option<u64>) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let data = ephemeral_tmpfs_data(size);
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .with_context(|| format!("mounting a tmpfs ({data}) on {}", dir.display()))
}

/// Unmounts `path`, lazily if it is busy.
pub fn unmount(path: &Path) -> Result<()> {
    match umount2(path, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => umount2(path, MntFlags::MNT_DETACH)
            .with_context(|| format!("unmounting {} (detached)", path.display())),
        Err(e) => Err(e).with_context(|| format!("unmounting {}", path.display())),
    }
}

/// Keeps the shareable namespaces of process `pid` (the sandbox
/// container's init) by bind-mounting each nsfs file on `dir/<name>`,
/// replacing what was kept there before. On an error nothing stays kept.
pub fn pin_namespaces(pid: u32, dir: &Path) -> Result<()> {
    unpin_namespaces(dir);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in SHAREABLE_NAMESPACES {
        let target = dir.join(name);
        let source = format!("/proc/{pid}/ns/{name}");
        let pinned = fs::write(&target, b"")
            .with_context(|| format!("creating {}", target.display()))
            .and_then(|()| {
                mount(
                    Some(source.as_str()),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .with_context(|| format!("bind-mounting {source} on {}", target.display()))
            });
        if let Err(e) = pinned {
            unpin_namespaces(dir);
            return Err(e);
        }
    }
    Ok(())
}

/// Lets go of the namespaces [`pin_namespaces`] kept (those that are).
pub fn unpin_namespaces(dir: &Path) {
    for name in SHAREABLE_NAMESPACES {
        let target = dir.join(name);
        let _ = umount2(&target, MntFlags::MNT_DETACH);
        let _ = fs::remove_file(&target);
    }
}

/// The namespaces a CreateContainer request names to share, each once,
/// with where [`pin_namespaces`] keeps it in `dir`; an unknown or repeated
/// name is an error naming it.
pub fn shared_namespaces(
    names: &[String],
    dir: &Path,
) -> Result<Vec<(LinuxNamespaceType, PathBuf)>, SpecError> {
    let mut shared: Vec<(LinuxNamespaceType, PathBuf)> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let field = format!("sandbox_namespaces[{i}]");
        let typ = SHAREABLE_NAMESPACES
            .contains(&name.as_str())
            .then(|| LinuxNamespaceType::try_from(name.as_str()).ok())
            .flatten()
            .ok_or_else(|| {
                err(
                    &field,
                    format!("{name:?} is not a namespace a container can share (ipc, uts, pid)"),
                )
            })?;
        if shared.iter().any(|(t, _)| *t == typ) {
            return Err(err(field, format!("{name:?} is named twice")));
        }
        shared.push((typ, dir.join(name)));
    }
    Ok(shared)
}

/// Creates a network namespace with `lo` up and keeps it by bind-mounting
/// its nsfs file on `path`. Done on a short-lived thread (a namespace is a
/// property of a thread), which is joined before returning, so the agent
/// is single-threaded again afterwards.
pub fn create_netns(path: &Path) -> Result<()> {
    fs::write(path, b"").with_context(|| format!("creating {}", path.display()))?;
    let target = path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || -> Result<()> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .context("unshare(CLONE_NEWNET)")?;
            loopback_up().context("bringing lo up")?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("bind-mounting the namespace on {}", target.display()))
        })
        .context("starting the netns thread")?;
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("the netns thread panicked"))?
}

fn loopback_up() -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the result is checked and owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS lo");
    }
    // SAFETY: the flags member is the one SIOCGIFFLAGS filled.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCSIFFLAGS lo");
    }
    Ok(())
}

/// Creates the sandbox cgroup and enables every controller the root
/// enables, so each container's child can use them.
pub fn create_cgroup(root: &Path, parent: &str) -> Result<PathBuf> {
    let dir = root.join(parent.trim_start_matches('/'));
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let controllers = fs::read_to_string(dir.join("cgroup.controllers"))
        .with_context(|| format!("reading {}/cgroup.controllers", dir.display()))?;
    let request: Vec<String> = controllers
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    if !request.is_empty() {
        fs::write(dir.join("cgroup.subtree_control"), request.join(" ")).with_context(|| {
            format!(
                "enabling {} in {}/cgroup.subtree_control",
                request.join(" "),
                dir.display()
            )
        })?;
    }
    Ok(dir)
}

/// The guest kernel's release (uname -r).
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_namespace_names_are_checked() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let dir = Path::new("/pins");
        assert_eq!(
            shared_namespaces(&names(&["pid", "ipc", "uts"]), dir),
            Ok(vec![
                (LinuxNamespaceType::Pid, dir.join("pid")),
                (LinuxNamespaceType::Ipc, dir.join("ipc")),
                (LinuxNamespaceType::Uts, dir.join("uts"))
            ])
        );
        assert_eq!(shared_namespaces(&[], dir), Ok(vec![]));
        let e = shared_namespaces(&names(&["ipc", "net"]), dir).expect_err("net");
        assert_eq!(e.field, "sandbox_namespaces[1]");
        assert!(e.message.contains("\"net\" is not"), "{e}");
        let e = shared_namespaces(&names(&["uts", "uts"]), dir).expect_err("twice");
        assert!(e.message.contains("twice"), "{e}");
    }

    #[test]
    fn console_sockets_are_short_distinct_and_bindable() {
        // sockaddr_un holds 108 bytes with the terminating NUL.
        const SUN_PATH: usize = 108;
        let a = console_socket(CONSOLES);
        let b = console_socket(CONSOLES);
        assert_ne!(a, b);
        assert!(a.starts_with(CONSOLES));
        let longest = Path::new(CONSOLES).join(format!("{}.sock", u64::MAX));
        assert!(longest.as_os_str().len() < SUN_PATH, "{longest:?}");
        // The bundle path it replaces, with CRI's 64-character container
        // and exec ids, did not fit.
        let old = format!(
            "{BUNDLES}/{}/console-{}.sock",
            "c".repeat(64),
            "e".repeat(64)
        );
        assert!(old.len() >= SUN_PATH);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = console_socket(dir.path().to_str().expect("utf-8"));
        std::os::unix::net::UnixListener::bind(&path).expect("bind");
    }

    #[test]
    fn resolv_conf_text_and_errors() {
        let text = resolv_conf(
            &["10.0.0.2".into(), "fd00::1".into()],
            &["svc.cluster.local".into(), "cluster.local".into()],
            &["ndots:5".into()],
        )
        .expect("valid");
        assert_eq!(
            text,
            "nameserver 10.0.0.2\nnameserver fd00::1\nsearch svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        assert_eq!(resolv_conf(&[], &[], &[]).expect("empty"), "");
        let e = resolv_conf(&["10.0.0.2".into(), "dns.example".into()], &[], &[])
            .expect_err("not an address");
        assert_eq!(e.field, "dns.nameservers[1]");
        let e = resolv_conf(&[], &["a b".into()], &[]).expect_err("two words");
        assert_eq!(e.field, "dns.searches[0]");
        let e = resolv_conf(&[], &[], &["x\nnameserver 1.2.3.4".into()]).expect_err("newline");
        assert_eq!(e.field, "dns.options[0]");
    }

    #[test]
    fn share_mount_points() {
        assert_eq!(
            share_mount_point("").expect("default"),
            PathBuf::from(DEFAULT_SHARE)
        );
        assert_eq!(
            share_mount_point("/mnt/share").expect("absolute"),
            PathBuf::from("/mnt/share")
        );
        for bad in ["relative", "/a/../b", "/"] {
            assert_eq!(
                share_mount_point(bad).expect_err(bad).field,
                "share_mount_point"
            );
        }
    }

    #[test]
    fn hostnames() {
        check_hostname("pod-1.example").expect("valid");
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert_eq!(check_hostname(bad).expect_err(bad).field, "hostname");
        }
    }

    #[test]
    fn sandbox_cgroup_enables_the_controllers() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("isola");
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join("cgroup.controllers"), "cpu memory pids\n").expect("write");
        let got = create_cgroup(root.path(), "/isola").expect("cgroup");
        assert_eq!(got, dir);
        assert_eq!(
            fs::read_to_string(dir.join("cgroup.subtree_control")).expect("read"),
            "+cpu +memory +pids"
        );
    }

    #[test]
    fn ephemeral_volumes_are_tmpfs_0777_of_their_size() {
        assert_eq!(ephemeral_tmpfs_data(None), "mode=0777");
        assert_eq!(
            ephemeral_tmpfs_data(Some(8 << 20)),
            "mode=0777,size=8388608"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let at = dir.path().join("ephemeral/mem-0123456789abcdef");
        if let Err(e) = mount_ephemeral(&at, Some(8 << 20)) {
            // Mounting needs root.
            eprintln!("skipped: {e:#}");
            return;
        }
        let fs = nix::sys::statfs::statfs(&at);
        let meta = fs::metadata(&at);
        let unmounted = umount2(&at, MntFlags::MNT_DETACH);
        let fs = fs.expect("statfs");
        assert_eq!(fs.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
        assert_eq!(
            fs.blocks() * u64::try_from(fs.block_size()).unwrap_or(0),
            8 << 20
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.expect("metadata").permissions().mode() & 0o7777, 0o777);
        unmounted.expect("unmount");
    }
}
