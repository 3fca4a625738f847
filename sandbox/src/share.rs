//! The Share: the directory tree virtiofsd serves to the guest.
//!
//! ```text
//! <dir>/             private bind of itself: nothing below leaks to the host's other mounts
//!   rw/              shared bind of itself: where the host mounts things
//!     containers/<cid>/rootfs        the container's rootfs (bind)
//!     containers/<cid>/volumes/<n>   bind mounts of the spec (bind, read-only ones made so before they appear)
//!   ro/              recursive bind of rw, slave (mounts made later under rw appear here),
//!                    read-only at the top only: virtiofsd serves this
//!   staging/<n>      where a read-only bind is made read-only before it is moved under rw
//!   fs.sock, vsock.sock, api.sock, console.log
//! ```
//!
//! The guest can write nothing into the share's own directories (the top of
//! `ro` is read-only), only inside a container's rootfs, and not into a
//! read-only volume: a remount to read-only does not propagate, so every
//! bind is made at `staging/` first, given its flags there and then bound
//! under `rw`, and every propagated copy (under `ro` and in virtiofsd's
//! mount namespace) has them from its birth.
//!
//! The share is a tenant's files on the host: every mount of it, the
//! skeleton's and each container's (with their submounts), is `nosuid`
//! and `nodev` on the host, so a setuid binary or a device node of an
//! image or planted by the guest is inert there (containerd
//! CVE-2021-41103, moby CVE-2021-41091). Flags are set with
//! `mount_setattr(2)`, which changes only the flags named: a read-only
//! volume keeps its source's `noexec`; on kernels before 5.12 a remount
//! carries the source's flags over from `statvfs`. The sandbox directory
//! is 0700, so no other host user reaches any of it
//! ([`create_private_dir`]).
//!
//! Mount work is planned as data ([`MountOp`]) by pure functions and done by
//! [`apply`]; teardown reads `/proc/self/mountinfo` and unmounts deepest
//! first ([`unmount_order`]).

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// The virtio-fs tag the VMM gives the share.
pub const SHARE_TAG: &str = "isola-share";

/// Where the agent mounts the share in the guest.
pub const GUEST_SHARE_DIR: &str = "/run/isola/share";

/// Paths of one sandbox's directory (pure: nothing is touched).
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    pub fn new(dir: impl Into<PathBuf>) -> Layout {
        Layout { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn rw(&self) -> PathBuf {
        self.dir.join("rw")
    }
    pub fn ro(&self) -> PathBuf {
        self.dir.join("ro")
    }
    pub fn staging(&self) -> PathBuf {
        self.dir.join("staging")
    }
    pub fn fs_socket(&self) -> PathBuf {
        self.dir.join("fs.sock")
    }
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    /// The sockets made in the directory.
    pub fn sockets(&self) -> [PathBuf; 3] {
        [self.fs_socket(), self.vsock_socket(), self.api_socket()]
    }
    /// The length of the longest socket path in the directory.
    pub fn longest_socket_len(&self) -> usize {
        self.sockets()
            .iter()
            .map(|p| p.as_os_str().len())
            .max()
            .unwrap_or(0)
    }
    /// An empty directory the jailed isola-vmm mounts its root over (in
    /// its own mount namespace: on the host it stays empty).
    pub fn jail_root(&self) -> PathBuf {
        self.dir.join("jail")
    }
    /// Who made the sandbox ([`write_owner`]).
    pub fn owner_file(&self) -> PathBuf {
        self.dir.join("owner")
    }
    /// The guest's console, when kept ([`crate::logfile`]).
    pub fn console_file(&self) -> PathBuf {
        self.dir.join(crate::logfile::CONSOLE_LOG)
    }
    /// The agent's log ([`crate::logfile`]).
    pub fn agent_log_file(&self) -> PathBuf {
        self.dir.join(crate::logfile::AGENT_LOG)
    }
    /// `rw/containers/<cid>`: everything of one container.
    pub fn container(&self, cid: &str) -> PathBuf {
        self.rw().join("containers").join(cid)
    }
    pub fn rootfs(&self, cid: &str) -> PathBuf {
        self.container(cid).join("rootfs")
    }
    pub fn volume(&self, cid: &str, n: usize) -> PathBuf {
        self.container(cid).join("volumes").join(n.to_string())
    }
    /// Where a read-only bind of a container (`what`: "rootfs" or a
    /// volume's number) is prepared: `staging/<cid>+<what>` (`+` is not in
    /// ids, so one container's prefix never matches another's).
    pub fn staging_for(&self, cid: &str, what: &str) -> PathBuf {
        self.staging().join(format!("{cid}+{what}"))
    }

    /// Whether a `staging/` entry name belongs to container `cid`.
    pub fn is_staging_of(name: &str, cid: &str) -> bool {
        name.strip_prefix(cid)
            .is_some_and(|rest| rest.starts_with('+'))
    }
}

/// The container's rootfs relative to the share's root, as
/// `CreateContainer.rootfs` wants it.
pub fn guest_rootfs_rel(cid: &str) -> String {
    format!("containers/{cid}/rootfs")
}

/// The guest path of a container's volume `n`.
pub fn guest_volume(cid: &str, n: usize) -> String {
    format!("{GUEST_SHARE_DIR}/containers/{cid}/volumes/{n}")
}

/// One mount system call (or a directory/file it needs), as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOp {
    /// Bind `source` on `target` (creating `target` as a directory, or as
    /// an empty file when `source` is not a directory); `recursive` takes
    /// the mounts below `source` along.
    Bind {
        source: PathBuf,
        target: PathBuf,
        recursive: bool,
    },
    MakePrivate(PathBuf),
    /// Makes the mount at the path and every mount below it private: the
    /// host's later mounts under their sources no longer arrive.
    MakePrivateRecursive(PathBuf),
    MakeShared(PathBuf),
    MakeSlave(PathBuf),
    /// Makes the mount at the path `nosuid` and `nodev` (and every mount
    /// below it when `recursive`), its other flags kept.
    NoSuidNoDev {
        path: PathBuf,
        recursive: bool,
    },
    /// Makes the mount at the path read-only (that mount only), its other
    /// flags kept.
    RemountReadOnly(PathBuf),
    /// Unmounts the path, lazily if it is busy.
    Unmount(PathBuf),
}

/// The share's skeleton: `<dir>` private, `rw` shared, `ro` its read-only
/// slave, all `nosuid,nodev`. `rw/containers` and `staging` must exist
/// first.
pub fn plan_share(layout: &Layout) -> Vec<MountOp> {
    let dir = layout.dir().to_path_buf();
    let harden = |path: PathBuf| MountOp::NoSuidNoDev {
        path,
        recursive: false,
    };
    vec![
        MountOp::Bind {
            source: dir.clone(),
            target: dir.clone(),
            recursive: false,
        },
        harden(dir.clone()),
        MountOp::MakePrivate(dir),
        MountOp::Bind {
            source: layout.rw(),
            target: layout.rw(),
            recursive: false,
        },
        harden(layout.rw()),
        MountOp::MakeShared(layout.rw()),
        MountOp::Bind {
            source: layout.rw(),
            target: layout.ro(),
            recursive: true,
        },
        MountOp::MakeSlave(layout.ro()),
        MountOp::RemountReadOnly(layout.ro()),
    ]
}

/// How a bind reaches the share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BindMode {
    /// The bind's own mount read-only (not its submounts: runc's
    /// non-recursive read-only).
    pub readonly: bool,
    /// The spec asked for private propagation (`private`, `rprivate`,
    /// `unbindable`): mounts the host makes under the source after the
    /// container's creation do not reach it. Otherwise the bind keeps
    /// receiving them, as runc's container mounts are slaves of the host's
    /// (host-to-container propagation, where the source is shared).
    pub private: bool,
}

/// Binds `source` (with its submounts) at `target` under `rw`: the bind
/// is made at `staging`, made `nosuid,nodev` there with everything below
/// it (read-only when `mode.readonly`, cut from the host's propagation
/// when `mode.private`), bound from there onto `target` (a bind copies
/// each mount's flags, and so does every propagated copy) and the staging
/// mount removed. Read-only is runc's: the volume's own mount, not its
/// submounts (a tmpfs inside a read-only hostPath stays writable), which
/// keep their own flags but for `nosuid,nodev`.
pub fn plan_bind(source: &Path, target: &Path, mode: BindMode, staging: &Path) -> Vec<MountOp> {
    let mut ops = vec![
        MountOp::Bind {
            source: source.to_path_buf(),
            target: staging.to_path_buf(),
            recursive: true,
        },
        MountOp::NoSuidNoDev {
            path: staging.to_path_buf(),
            recursive: true,
        },
    ];
    if mode.readonly {
        ops.push(MountOp::RemountReadOnly(staging.to_path_buf()));
    }
    if mode.private {
        ops.push(MountOp::MakePrivateRecursive(staging.to_path_buf()));
    }
    ops.extend([
        MountOp::Bind {
            source: staging.to_path_buf(),
            target: target.to_path_buf(),
            recursive: true,
        },
        MountOp::Unmount(staging.to_path_buf()),
    ]);
    ops
}

/// Does one [`MountOp`]; the error names the operation and the path.
pub fn apply(op: &MountOp) -> io::Result<()> {
    let none: Option<&str> = None;
    let fail = |what: String| {
        move |errno: nix::errno::Errno| {
            io::Error::new(
                io::Error::from(errno).kind(),
                format!("{what}: {}", errno.desc()),
            )
        }
    };
    match op {
        MountOp::Bind {
            source,
            target,
            recursive,
        } => {
            let meta = std::fs::metadata(source)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", source.display())))?;
            if meta.is_dir() {
                create_private_dir_all(target)
            } else {
                if let Some(parent) = target.parent() {
                    create_private_dir_all(parent)?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(target)
                    .map(drop)
            }
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", target.display())))?;
            let mut flags = MsFlags::MS_BIND;
            if *recursive {
                flags |= MsFlags::MS_REC;
            }
            mount(Some(source.as_path()), target.as_path(), none, flags, none).map_err(fail(
                format!("bind {} on {}", source.display(), target.display()),
            ))
        }
        MountOp::MakePrivate(path) => propagation(path, MsFlags::MS_PRIVATE, "private"),
        MountOp::MakePrivateRecursive(path) => propagation(
            path,
            MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            "recursively private",
        ),
        MountOp::MakeShared(path) => propagation(path, MsFlags::MS_SHARED, "shared"),
        MountOp::MakeSlave(path) => propagation(path, MsFlags::MS_SLAVE, "slave"),
        MountOp::NoSuidNoDev { path, recursive } => set_flags(
            path,
            libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
            *recursive,
        )
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("make {} nosuid,nodev: {e}", path.display()),
            )
        }),
        MountOp::RemountReadOnly(path) => {
            set_flags(path, libc::MOUNT_ATTR_RDONLY, false).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("remount {} read-only: {e}", path.display()),
                )
            })
        }
        MountOp::Unmount(path) => unmount(path),
    }
}

/// Adds the `MOUNT_ATTR_*` flags `set` to the mount at `path` (and every
/// mount below it when `recursive`), keeping its other flags:
/// `mount_setattr(2)`; before Linux 5.12, a remount of each mount that
/// carries its current flags over from `statvfs` (a bind remount sets all
/// flags at once and would drop `noexec`, `nosuid`, ... otherwise).
pub fn set_flags(path: &Path, set: u64, recursive: bool) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let mut flags = libc::AT_SYMLINK_NOFOLLOW;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: `c_path` is a NUL-terminated path and `attr` a mount_attr of
    // the size passed, both alive across the call; the kernel only reads
    // them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            flags as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    set_flags_by_remount(path, set, recursive)
}

/// [`set_flags`] for kernels without `mount_setattr(2)`: a bind remount
/// of each mount (parents first) with the flags it has (`statvfs`) and
/// `set`.
pub fn set_flags_by_remount(path: &Path, set: u64, recursive: bool) -> io::Result<()> {
    let points = if recursive {
        // Parents before what is under them.
        let mut points = mounts_under(path)?;
        points.reverse();
        points
    } else {
        vec![path.to_path_buf()]
    };
    for point in points {
        remount_keeping(&point, set)?;
    }
    Ok(())
}

/// The `MS_*` flags of the mount at `path` that a bind remount must carry
/// over (`statvfs`'s `ST_*`), plus the `MOUNT_ATTR_*` flags `set`.
pub fn remount_flags(current: nix::sys::statvfs::FsFlags, set: u64) -> MsFlags {
    use nix::sys::statvfs::FsFlags;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
    for (st, ms) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(st) {
            flags |= ms;
        }
    }
    for (attr, ms) in [
        (libc::MOUNT_ATTR_RDONLY, MsFlags::MS_RDONLY),
        (libc::MOUNT_ATTR_NOSUID, MsFlags::MS_NOSUID),
        (libc::MOUNT_ATTR_NODEV, MsFlags::MS_NODEV),
        (libc::MOUNT_ATTR_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if set & attr != 0 {
            flags |= ms;
        }
    }
    flags
}

fn remount_keeping(path: &Path, set: u64) -> io::Result<()> {
    let none: Option<&str> = None;
    let current = nix::sys::statvfs::statvfs(path).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("statvfs {}: {e}", path.display()),
        )
    })?;
    mount(none, path, none, remount_flags(current.flags(), set), none).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("remount {}: {}", path.display(), e.desc()),
        )
    })
}

/// Makes `dir` and every missing parent with mode 0700 (created so, never
/// wider for a moment). Parents that exist are left as they are.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The run root's subdirectory of sandboxes `isola run` starts (no
/// containerd namespace): not a valid containerd namespace name, so no
/// namespace's sandboxes share it.
pub const DIRECT_NAMESPACE: &str = "_direct";

/// The run root's subdirectory of sandboxes whose namespace and id do not
/// fit a socket path (or whose namespace is not a plain name).
const HASHED_DIR: &str = "_hashed";

/// Whether `name` is a containerd namespace name (an identifier:
/// alphanumeric runs joined by single `.`, `_` or `-`, at most 76 bytes),
/// and so a safe directory name.
fn is_namespace_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 76
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b))
        && !bytes
            .windows(2)
            .any(|w| !w[0].is_ascii_alphanumeric() && !w[1].is_ascii_alphanumeric())
}

/// The directory of sandbox `id` of containerd namespace `namespace`
/// ([`DIRECT_NAMESPACE`] for `isola run`'s): `<run_root>/<namespace>/<id>`,
/// so the same id in two namespaces never shares one. When that would
/// make a socket path too long for a Unix socket address (a long
/// namespace), or the namespace is not a plain name, it is
/// `<run_root>/_hashed/<sha256 of namespace and id, 32 hex digits>`; the
/// delete action computes the same.
pub fn sandbox_dir(run_root: &Path, namespace: &str, id: &str) -> PathBuf {
    use sha2::Digest;
    if is_namespace_name(namespace) || namespace == DIRECT_NAMESPACE {
        let dir = run_root.join(namespace).join(id);
        if Layout::new(&dir).longest_socket_len() <= crate::sandbox::MAX_SOCKET_PATH {
            return dir;
        }
    }
    let mut hash = sha2::Sha256::new();
    hash.update(namespace.as_bytes());
    hash.update([0u8]);
    hash.update(id.as_bytes());
    let digest = hash.finalize();
    let name: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    run_root.join(HASHED_DIR).join(name)
}

/// Makes the run root (every sandbox's directory is in it) if missing,
/// with mode 0700, and checks it: a directory, not a symlink, owned by
/// this user. One with group or other access (made by an older isola, or
/// by hand) is closed to 0700, with a warning: other users on the host
/// must not list the sandboxes, let alone reach their shares.
pub fn prepare_run_root(root: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    create_private_dir_all(root)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", root.display())))?;
    let meta = std::fs::symlink_metadata(root)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", root.display())))?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the run root {} is not a directory (a symlink?)",
                root.display()
            ),
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the run root {} belongs to uid {}, not to this user (uid {me}): another user may reach the sandboxes in it",
                root.display(),
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        tracing::warn!(run_root = %root.display(), mode = format!("{mode:o}"), "the run root was open to other users: closing it to 0700");
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io::Error::new(e.kind(), format!("chmod 0700 {}: {e}", root.display())))?;
    }
    Ok(())
}

/// Records who made the sandbox in its directory (mode 0600, a new file:
/// never through a link). [`owner`] reads it back.
pub fn write_owner(layout: &Layout, owner: &str) -> io::Result<()> {
    use std::io::Write;
    let path = layout.owner_file();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))?;
    file.write_all(owner.as_bytes())
        .map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

/// Who made the sandbox of `layout` ([`write_owner`]); `None` when no
/// owner was recorded (an older isola's, or `isola run`'s sandbox).
/// Bounded: at most 4 KiB are read.
pub fn owner(layout: &Layout) -> io::Result<Option<String>> {
    use std::io::Read;
    let path = layout.owner_file();
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    let mut text = String::new();
    file.take(4096)
        .read_to_string(&mut text)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))?;
    Ok(Some(text))
}

/// Makes the share's directories in the sandbox directory (which must
/// exist): `rw/containers`, `ro`, `staging`, each 0700.
pub fn create_dirs(layout: &Layout) -> io::Result<()> {
    for dir in [
        layout.rw().join("containers"),
        layout.ro(),
        layout.staging(),
    ] {
        create_private_dir_all(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// Makes the directory `dir` with mode 0700; its parent must exist. An
/// existing `dir` is an `AlreadyExists` error.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

fn propagation(path: &Path, flag: MsFlags, name: &str) -> io::Result<()> {
    let none: Option<&str> = None;
    mount(none, path, none, flag, none).map_err(|errno| {
        io::Error::new(
            io::Error::from(errno).kind(),
            format!("make {} {name}: {}", path.display(), errno.desc()),
        )
    })
}

/// Unmounts `path`; lazily (detached now, freed when no longer used) if it
/// is busy.
pub fn unmount(path: &Path) -> io::Result<()> {
    match umount2(path, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => {
            tracing::debug!(path = %path.display(), "busy; unmounting lazily");
            umount2(path, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW).map_err(|errno| {
                io::Error::new(
                    io::Error::from(errno).kind(),
                    format!("unmount {} (lazily): {}", path.display(), errno.desc()),
                )
            })
        }
        Err(errno) => Err(io::Error::new(
            io::Error::from(errno).kind(),
            format!("unmount {}: {}", path.display(), errno.desc()),
        )),
    }
}

/// A mount point of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u64,
    pub mount_point: PathBuf,
}

/// Parses mountinfo text (lines that are not mountinfo are skipped).
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let id = fields.next()?.parse().ok()?;
            let mount_point = fields.nth(3)?;
            Some(MountEntry {
                id,
                mount_point: PathBuf::from(unescape_octal(mount_point)),
            })
        })
        .collect()
}

/// Undoes mountinfo's `\NNN` escapes (space, tab, newline, backslash).
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points at or below `under`, in the order to unmount them:
/// deepest first, and of mounts stacked on one point the newest first.
pub fn unmount_order(entries: &[MountEntry], under: &Path) -> Vec<PathBuf> {
    let mut below: Vec<&MountEntry> = entries
        .iter()
        .filter(|e| e.mount_point.starts_with(under))
        .collect();
    below.sort_by(|a, b| {
        depth(&b.mount_point)
            .cmp(&depth(&a.mount_point))
            .then(b.id.cmp(&a.id))
    });
    below.into_iter().map(|e| e.mount_point.clone()).collect()
}

fn depth(path: &Path) -> usize {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count()
}

/// The mount points strictly below each of `volumes` (a container's
/// volumes under the layout's `rw`: a tmpfs inside a hostPath), as the
/// guest names them relative to the share's root
/// (`containers/<id>/volumes/N/...`), sorted (a parent before what is
/// under it) and each once. One read of mountinfo for all. A path that is
/// not UTF-8 is left out.
pub fn submounts(layout: &Layout, volumes: &[PathBuf]) -> io::Result<Vec<String>> {
    if volumes.is_empty() {
        return Ok(Vec::new());
    }
    let entries = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo")?);
    let rw = layout.rw();
    let mut rels: Vec<String> = volumes
        .iter()
        .flat_map(|volume| {
            unmount_order(&entries, volume)
                .into_iter()
                .filter(move |p| p != volume)
        })
        .filter_map(|p| {
            p.strip_prefix(&rw)
                .ok()
                .and_then(Path::to_str)
                .map(str::to_string)
        })
        .collect();
    rels.sort();
    rels.dedup();
    Ok(rels)
}

/// The mount points at or below `under` in this mount namespace now.
pub fn mounts_under(under: &Path) -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(unmount_order(&parse_mountinfo(&text), under))
}

/// Unmounts every mount at or below `under`, deepest first (lazily where
/// busy). Returns the failures; the walk goes on past them.
pub fn unmount_all(under: &Path) -> Vec<io::Error> {
    let mut errors = Vec::new();
    // Each pass unmounts what it sees; a second pass catches mounts that
    // propagation or a stacked mount revealed. Bounded: a mount that will
    // not go is reported, not retried forever.
    for _ in 0..3 {
        let points = match mounts_under(under) {
            Ok(points) => points,
            Err(err) => {
                errors.push(err);
                return errors;
            }
        };
        if points.is_empty() {
            return Vec::new();
        }
        errors.clear();
        for point in points {
            match unmount(&point) {
                Ok(()) => {}
                // Gone already (a propagated unmount took it).
                Err(err) if err.kind() == io::ErrorKind::InvalidInput => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => errors.push(err),
            }
        }
    }
    match mounts_under(under) {
        Ok(left) if left.is_empty() => Vec::new(),
        Ok(left) => {
            errors.push(io::Error::other(format!(
                "still mounted under {}: {}",
                under.display(),
                left.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
            errors
        }
        Err(err) => {
            errors.push(err);
            errors
        }
    }
}

/// Removes `dir` and everything in it, but only once nothing is mounted at
/// or below it (a recursive removal through a bind mount would delete the
/// mounted tree: a container's rootfs or a user's volume). Never crosses
/// into another file system either.
pub fn remove_dir_safely(dir: &Path) -> io::Result<()> {
    let left = mounts_under(dir)?;
    if !left.is_empty() {
        return Err(io::Error::other(format!(
            "not removing {}: still mounted: {}",
            dir.display(),
            left.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta.dev(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    // The runner's log tasks may still write a last line or count into
    // the directory as its VM ends: a file made while the tree is removed
    // makes the last rmdir fail with ENOTEMPTY; the walk is done again.
    let mut tries = 0;
    loop {
        match remove_tree(dir, dev) {
            Err(err) if err.raw_os_error() == Some(libc::ENOTEMPTY) && tries < 3 => tries += 1,
            other => return other,
        }
    }
}

fn remove_tree(path: &Path, dev: u64) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // An entry gone since the directory was listed (a temporary file
    // renamed into place) is removed already.
    let gone = |r: io::Result<()>| match r {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    if !meta.is_dir() {
        return gone(std::fs::remove_file(path));
    }
    if meta.dev() != dev {
        return Err(io::Error::other(format!(
            "not removing {}: another file system",
            path.display()
        )));
    }
    for entry in std::fs::read_dir(path)? {
        remove_tree(&entry?.path(), dev)?;
    }
    std::fs::remove_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_dirs_are_keyed_by_namespace_and_id() {
        let root = Path::new("/run/isola/sandboxes");
        let id = "a".repeat(64);
        assert_eq!(
            sandbox_dir(root, "k8s.io", &id),
            root.join("k8s.io").join(&id)
        );
        assert_eq!(
            sandbox_dir(root, DIRECT_NAMESPACE, "c1"),
            root.join("_direct/c1")
        );
        assert_ne!(
            sandbox_dir(root, "default", "c1"),
            sandbox_dir(root, "moby", "c1")
        );
        // Too long for vsock.sock's address: hashed, stable, distinct, short.
        let long = "n".repeat(40);
        let hashed = sandbox_dir(root, &long, &id);
        assert!(hashed.starts_with(root.join("_hashed")), "{hashed:?}");
        assert_eq!(hashed, sandbox_dir(root, &long, &id));
        assert_ne!(hashed, sandbox_dir(root, &"m".repeat(40), &id));
        assert!(Layout::new(&hashed).longest_socket_len() <= crate::sandbox::MAX_SOCKET_PATH);
        // Not a plain name: never a path component.
        for bad in ["..", ".", "", "a/b", "_hashed", "a..b", "-a", "a-"] {
            let dir = sandbox_dir(root, bad, "c1");
            assert!(dir.starts_with(root.join("_hashed")), "{bad:?}: {dir:?}");
        }
        assert!(is_namespace_name("k8s.io") && is_namespace_name("a_b-c.d"));
        assert!(!is_namespace_name(&"x".repeat(77)));
    }

    #[test]
    fn layout_paths() {
        let l = Layout::new("/run/isola/sandboxes/pod1");
        assert_eq!(l.rw(), Path::new("/run/isola/sandboxes/pod1/rw"));
        assert_eq!(l.ro(), Path::new("/run/isola/sandboxes/pod1/ro"));
        assert_eq!(
            l.rootfs("web"),
            Path::new("/run/isola/sandboxes/pod1/rw/containers/web/rootfs")
        );
        assert_eq!(
            l.volume("web", 2),
            Path::new("/run/isola/sandboxes/pod1/rw/containers/web/volumes/2")
        );
        assert_eq!(
            l.staging_for("web", "2"),
            Path::new("/run/isola/sandboxes/pod1/staging/web+2")
        );
        assert!(Layout::is_staging_of("web+rootfs", "web"));
        assert!(!Layout::is_staging_of("web.1+rootfs", "web"));
        assert!(!Layout::is_staging_of("web", "web"));
        assert_eq!(guest_rootfs_rel("web"), "containers/web/rootfs");
        assert_eq!(
            guest_volume("web", 0),
            "/run/isola/share/containers/web/volumes/0"
        );
    }

    #[test]
    fn share_plan_is_private_dir_shared_rw_readonly_slave_ro_all_nosuid_nodev() {
        let l = Layout::new("/d");
        let plan = plan_share(&l);
        let p = PathBuf::from;
        let harden = |path: &str| MountOp::NoSuidNoDev {
            path: PathBuf::from(path),
            recursive: false,
        };
        assert_eq!(
            plan,
            vec![
                MountOp::Bind {
                    source: p("/d"),
                    target: p("/d"),
                    recursive: false
                },
                harden("/d"),
                MountOp::MakePrivate(p("/d")),
                MountOp::Bind {
                    source: p("/d/rw"),
                    target: p("/d/rw"),
                    recursive: false
                },
                harden("/d/rw"),
                MountOp::MakeShared(p("/d/rw")),
                // ro: a bind of rw copies its nosuid,nodev.
                MountOp::Bind {
                    source: p("/d/rw"),
                    target: p("/d/ro"),
                    recursive: true
                },
                MountOp::MakeSlave(p("/d/ro")),
                MountOp::RemountReadOnly(p("/d/ro")),
            ]
        );
    }

    #[test]
    fn binds_get_their_flags_before_they_reach_rw() {
        let (src, dst, stage) = (Path::new("/src"), Path::new("/d/rw/v"), Path::new("/d/st"));
        for (readonly, private) in [(false, false), (true, false), (false, true), (true, true)] {
            let plan = plan_bind(src, dst, BindMode { readonly, private }, stage);
            let at = |want: &MountOp| plan.iter().position(|op| op == want);
            let hardened = at(&MountOp::NoSuidNoDev {
                path: stage.into(),
                recursive: true,
            });
            let remount = at(&MountOp::RemountReadOnly(stage.into()));
            let cut = at(&MountOp::MakePrivateRecursive(stage.into()));
            let into_rw = plan.iter().position(
                |op| matches!(op, MountOp::Bind { target, .. } if target.starts_with("/d/rw")),
            );
            // The one mount under rw is the bind from the staging mount,
            // after its flags were set there.
            assert!(hardened.is_some() && hardened < into_rw, "{plan:?}");
            assert_eq!(remount.is_some(), readonly, "{plan:?}");
            assert!(remount < into_rw, "{plan:?}");
            // Cut from the host before anything under rw can receive.
            assert_eq!(cut.is_some(), private, "{plan:?}");
            assert!(cut < into_rw, "{plan:?}");
            assert_eq!(plan.last(), Some(&MountOp::Unmount(stage.into())));
            assert_eq!(
                plan.iter()
                    .filter(|op| matches!(op, MountOp::Bind { target, .. } if target.starts_with("/d/rw")))
                    .count(),
                1
            );
        }
    }

    #[test]
    fn a_remount_keeps_the_flags_the_mount_has() {
        use nix::sys::statvfs::FsFlags;
        let flags = remount_flags(
            FsFlags::ST_NOEXEC | FsFlags::ST_NOSUID | FsFlags::ST_RELATIME,
            libc::MOUNT_ATTR_RDONLY,
        );
        assert_eq!(
            flags,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOEXEC
                | MsFlags::MS_NOSUID
                | MsFlags::MS_RELATIME
        );
        let flags = remount_flags(
            FsFlags::empty(),
            libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
        );
        assert_eq!(
            flags,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV
        );
    }

    #[test]
    fn the_run_root_is_made_closed_and_an_open_one_closed() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("run/isola/sandboxes");
        prepare_run_root(&root).expect("new");
        for dir in [
            tmp.path().join("run"),
            tmp.path().join("run/isola"),
            root.clone(),
        ] {
            let mode = std::fs::metadata(&dir).expect("stat").mode() & 0o7777;
            assert_eq!(mode, 0o700, "{}", dir.display());
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        prepare_run_root(&root).expect("an older isola's");
        assert_eq!(
            std::fs::metadata(&root).expect("stat").mode() & 0o7777,
            0o700
        );
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&root, &link).expect("symlink");
        let err = prepare_run_root(&link).expect_err("a symlink");
        assert!(err.to_string().contains("not a directory"), "{err}");
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&root, Some(nix::unistd::Uid::from_raw(65534)), None)
                .expect("chown");
            let err = prepare_run_root(&root).expect_err("another user's");
            assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        }
        let sandbox = root.join("sb");
        create_private_dir(&sandbox).expect("sandbox dir");
        assert_eq!(
            std::fs::metadata(&sandbox).expect("stat").mode() & 0o7777,
            0o700
        );
        assert_eq!(
            create_private_dir(&sandbox).expect_err("exists").kind(),
            io::ErrorKind::AlreadyExists
        );
    }

    const MOUNTINFO: &str = "\
22 1 0:21 / /run rw,nosuid shared:5 - tmpfs tmpfs rw
42 22 0:21 /isola/sandboxes/a /run/isola/sandboxes/a rw - tmpfs tmpfs rw
43 42 0:21 /isola/sandboxes/a/rw /run/isola/sandboxes/a/rw rw shared:1 - tmpfs tmpfs rw
44 42 0:21 /isola/sandboxes/a/rw /run/isola/sandboxes/a/ro ro master:1 - tmpfs tmpfs rw
47 43 254:0 /srv/root /run/isola/sandboxes/a/rw/containers/c1/rootfs rw shared:2 - ext4 /dev/vda rw
50 44 254:0 /srv/root /run/isola/sandboxes/a/ro/containers/c1/rootfs rw master:2 - ext4 /dev/vda rw
51 43 254:0 /srv/my\\040dir /run/isola/sandboxes/a/rw/containers/c1/volumes/0\\040x rw - ext4 /dev/vda rw
60 47 0:5 / /run/isola/sandboxes/a/rw/containers/c1/rootfs rw - tmpfs tmpfs rw
61 22 0:21 /isola/sandboxes/ab /run/isola/sandboxes/ab rw - tmpfs tmpfs rw
garbage
";

    #[test]
    fn mountinfo_parses_and_unescapes() {
        let entries = parse_mountinfo(MOUNTINFO);
        assert_eq!(entries.len(), 9);
        assert_eq!(
            entries[6].mount_point,
            Path::new("/run/isola/sandboxes/a/rw/containers/c1/volumes/0 x")
        );
        assert_eq!(unescape_octal("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape_octal("trailing\\04"), "trailing\\04");
        assert_eq!(unescape_octal("\\999"), "\\999");
    }

    #[test]
    fn unmount_order_is_deepest_first_newest_first_and_stays_under_the_dir() {
        let order = unmount_order(
            &parse_mountinfo(MOUNTINFO),
            Path::new("/run/isola/sandboxes/a"),
        );
        let s: Vec<String> = order.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            s,
            [
                "/run/isola/sandboxes/a/rw/containers/c1/volumes/0 x",
                "/run/isola/sandboxes/a/rw/containers/c1/rootfs", // 60, stacked on 47
                "/run/isola/sandboxes/a/ro/containers/c1/rootfs",
                "/run/isola/sandboxes/a/rw/containers/c1/rootfs", // 47
                "/run/isola/sandboxes/a/ro",
                "/run/isola/sandboxes/a/rw",
                "/run/isola/sandboxes/a",
            ]
        );
        // A sibling whose name merely starts the same is not below.
        assert!(!s.iter().any(|p| p.starts_with("/run/isola/sandboxes/ab")));
    }

    #[test]
    fn remove_dir_safely_removes_plain_trees_and_refuses_mount_points() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("sb");
        std::fs::create_dir_all(dir.join("rw/containers/c/rootfs")).expect("mkdir");
        std::fs::write(dir.join("rw/containers/c/rootfs/f"), b"x").expect("write");
        std::os::unix::fs::symlink("/etc", dir.join("link")).expect("symlink");
        remove_dir_safely(&dir).expect("removed");
        assert!(!dir.exists());
        // Removing what is gone is fine.
        remove_dir_safely(&dir).expect("gone is fine");
        // A directory with a mount point below it is never removed.
        let proc_dir = Path::new("/proc");
        let err = remove_dir_safely(proc_dir).expect_err("refused");
        assert!(err.to_string().contains("still mounted"), "{err}");
    }
}
