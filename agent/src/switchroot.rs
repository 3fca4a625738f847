//! Moves PID 1 off the initramfs onto a tmpfs root at boot.
//!
//! The kernel starts the agent on the initramfs (`rootfs`), which
//! pivot_root(2) cannot leave: containers would have to be built with
//! `no_pivot` (MS_MOVE onto / and chroot), which leaves the guest's whole
//! tree, the share included, in every container's mount namespace under
//! its root. So, before anything else is mounted, the agent does what
//! busybox `switch_root` does: it mounts a size-bounded tmpfs at
//! [`NEW_ROOT`], copies the initramfs into it (the agent binary `/init`,
//! `/dev/console`, `/dev/null`, the mount-point directories), deletes the
//! initramfs files (never crossing into another file system), moves the
//! tmpfs onto `/` and chroots there. It then re-executes `/init` from the
//! new root, so the initramfs copy of its own binary, which its mapping
//! kept alive, is freed; [`REEXEC_ENV`] tells the new image that the switch
//! is done. Any failure before the move leaves the initramfs as it was
//! (the tmpfs is unmounted) and the agent boots on it, with `no_pivot`.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
use nix::unistd::{chdir, chroot, mkdir};

/// ramfs, the initramfs without CONFIG_TMPFS (linux/magic.h; neither nix
/// nor libc names it).
const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);

/// Where the new root is assembled; gone once it is moved onto `/`.
pub const NEW_ROOT: &str = "/newroot";

/// Set in the environment of the re-executed agent: a description of the
/// switch, logged once logging is up. Removed from the environment at once.
pub const REEXEC_ENV: &str = "ISOLA_AGENT_SWITCHED_ROOT";

/// Room in the new root beyond what the initramfs holds (mount points the
/// host may ask for, such as a `share_mount_point` outside /run).
const HEADROOM: u64 = 8 << 20;

/// What the boot did about the root file system, to be logged.
#[derive(Debug)]
pub enum Outcome {
    /// This image was re-executed on the tmpfs root; the description of
    /// the switch its predecessor made.
    Switched(String),
    /// The switch was made but the re-exec failed: the agent runs on the
    /// tmpfs root, its initramfs binary still mapped.
    SwitchedNoReexec(String, io::Error),
    /// The agent stays on the root it was started on.
    Stayed(anyhow::Error),
}

impl Outcome {
    /// Logs the outcome; `pivot` is whether containers will pivot_root.
    pub fn log(&self, pivot: bool) {
        let mode = if pivot {
            "containers use pivot_root"
        } else {
            "containers fall back to no_pivot (MS_MOVE and chroot)"
        };
        match self {
            Outcome::Switched(how) => tracing::info!("root: tmpfs ({how}); {mode}"),
            Outcome::SwitchedNoReexec(how, err) => tracing::warn!(
                "root: tmpfs ({how}), but re-executing /init failed ({err}): the initramfs \
                 copy of the agent stays in memory; {mode}"
            ),
            Outcome::Stayed(err) => {
                tracing::error!("root: switching off the initramfs failed: {err:#}; {mode}")
            }
        }
    }
}

/// Called first thing in PID 1. On a successful switch it re-executes
/// `/init` and does not return.
pub fn at_boot() -> Outcome {
    if let Some(how) = std::env::var_os(REEXEC_ENV) {
        // Single-threaded here: nothing else reads the environment.
        std::env::remove_var(REEXEC_ENV);
        return Outcome::Switched(how.to_string_lossy().into_owned());
    }
    let started = Instant::now();
    let copied = match switch() {
        Ok(copied) => copied,
        Err(err) => return Outcome::Stayed(err),
    };
    let how = format!(
        "{} bytes copied from the initramfs in {} ms",
        copied.bytes,
        started.elapsed().as_millis()
    );
    let how = if copied.left == 0 {
        how
    } else {
        format!("{how}, {} initramfs entries not deleted", copied.left)
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| OsString::from("/init"));
    let err = std::process::Command::new("/init")
        .arg0(arg0)
        .args(args)
        .env(REEXEC_ENV, &how)
        .exec();
    Outcome::SwitchedNoReexec(how, err)
}

/// What the copy moved.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Bytes of regular files.
    pub bytes: u64,
    /// Initramfs entries that could not be deleted.
    pub left: u64,
}

fn switch() -> Result<Copied> {
    let root = statfs("/").context("statfs /")?;
    let fstype = root.filesystem_type();
    if fstype != RAMFS_MAGIC && fstype != TMPFS_MAGIC {
        bail!("/ is not an initramfs (file system magic {:#x})", fstype.0);
    }
    let root_dev = fs::symlink_metadata("/").context("stat /")?.dev();
    let new_root = Path::new(NEW_ROOT);
    let size = tmpfs_size(tree_bytes(Path::new("/"), root_dev, new_root)?);
    match mkdir(new_root, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(err) => return Err(err).with_context(|| format!("creating {NEW_ROOT}")),
    }
    let data = format!("mode=0755,size={size}");
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        // Not nodev: the copied /dev/console and /dev/null must open.
        MsFlags::MS_NOSUID,
        Some(data.as_str()),
    )
    .with_context(|| format!("mounting a tmpfs on {NEW_ROOT}"))?;
    let prepared = check_initramfs(new_root)
        .and_then(|()| copy_tree(Path::new("/"), new_root, root_dev, new_root));
    let bytes = match prepared {
        Ok(bytes) => bytes,
        Err(err) => {
            // Back to the initramfs as it was.
            let _ = umount2(new_root, MntFlags::MNT_DETACH);
            let _ = fs::remove_dir(new_root);
            return Err(err);
        }
    };
    // From here on the initramfs is going: the only way is forward.
    let left = remove_tree(Path::new("/"), root_dev, new_root);
    chdir(new_root).with_context(|| format!("chdir {NEW_ROOT}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .with_context(|| format!("moving {NEW_ROOT} onto /"))?;
    chroot(".").context("chroot into the new root")?;
    chdir("/").context("chdir /")?;
    Ok(Copied { bytes, left })
}

/// The tmpfs size for a root holding `content` bytes: the content plus
/// [`HEADROOM`], rounded up to MiB.
pub fn tmpfs_size(content: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    content.saturating_add(HEADROOM + MIB - 1) / MIB * MIB
}

/// Whether `/proc/self/mountinfo` says the root is the initramfs: the
/// mount on `/` is the kernel's `rootfs`, which pivot_root(2) refuses.
pub fn root_is_initramfs(mountinfo: &str) -> bool {
    crate::mounts::parse_mountinfo(mountinfo)
        .iter()
        .any(|m| m.target == "/" && m.fstype == "rootfs")
}

/// Asks the kernel (a proc mounted under the new root for a moment)
/// whether `/` is really the initramfs before anything on it is deleted.
fn check_initramfs(new_root: &Path) -> Result<()> {
    let proc = new_root.join("proc");
    mkdir(&proc, Mode::from_bits_truncate(0o555)).context("creating a proc mount point")?;
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .context("mounting proc to check the root")?;
    let mountinfo = fs::read_to_string(proc.join("self/mountinfo"));
    umount2(&proc, MntFlags::empty()).context("unmounting the checking proc")?;
    fs::remove_dir(&proc).context("removing the proc mount point")?;
    if !root_is_initramfs(&mountinfo.context("reading mountinfo")?) {
        bail!("/ is not the kernel's rootfs");
    }
    Ok(())
}

/// Bytes of the regular files under `dir` on device `dev`, `skip` aside.
pub fn tree_bytes(dir: &Path, dev: u64, skip: &Path) -> Result<u64> {
    let mut total = 0u64;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path == skip {
            continue;
        }
        let meta = fs::symlink_metadata(&path)?;
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            total = total.saturating_add(tree_bytes(&path, dev, skip)?);
        } else if meta.is_file() {
            total = total.saturating_add(meta.len());
        }
    }
    Ok(total)
}

/// Copies the tree under `from` (the entries on device `dev`, `skip`
/// aside; other file systems' mount points as empty directories) into
/// `to`: directories, regular files, symlinks, device nodes and fifos,
/// with their modes and owners. Returns the bytes of regular files.
pub fn copy_tree(from: &Path, to: &Path, dev: u64, skip: &Path) -> Result<u64> {
    let mut bytes = 0u64;
    for entry in fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let entry = entry?;
        let src = entry.path();
        if src == skip {
            continue;
        }
        let dst = to.join(entry.file_name());
        let meta = fs::symlink_metadata(&src)?;
        let kind = meta.file_type();
        let what = || format!("copying {} to {}", src.display(), dst.display());
        if kind.is_dir() {
            fs::create_dir(&dst).with_context(what)?;
            if meta.dev() == dev {
                bytes = bytes.saturating_add(copy_tree(&src, &dst, dev, skip)?);
            }
        } else if kind.is_file() {
            bytes = bytes.saturating_add(fs::copy(&src, &dst).with_context(what)?);
        } else if kind.is_symlink() {
            symlink(fs::read_link(&src).with_context(what)?, &dst).with_context(what)?;
        } else {
            let sflag = if kind.is_char_device() {
                SFlag::S_IFCHR
            } else if kind.is_block_device() {
                SFlag::S_IFBLK
            } else if kind.is_fifo() {
                SFlag::S_IFIFO
            } else {
                // A socket in an initramfs has no one listening.
                continue;
            };
            mknod(
                &dst,
                sflag,
                Mode::from_bits_truncate(meta.mode()),
                meta.rdev(),
            )
            .with_context(what)?;
        }
        std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid())).with_context(what)?;
        if !kind.is_symlink() {
            // After the owner: chown clears the set-id bits.
            fs::set_permissions(&dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .with_context(what)?;
        }
    }
    Ok(bytes)
}

/// Deletes what is under `dir` on device `dev` (`skip` aside), never
/// descending into another file system, as switch_root does; directories
/// that are another file system's mount point stay. Returns how many
/// entries could not be deleted.
pub fn remove_tree(dir: &Path, dev: u64, skip: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 1;
    };
    let mut left = 0;
    for entry in entries {
        let Ok(entry) = entry else {
            left += 1;
            continue;
        };
        let path = entry.path();
        if path == skip {
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(&path) else {
            left += 1;
            continue;
        };
        if meta.dev() != dev {
            // A mount point: its contents are another file system's.
            continue;
        }
        let removed = if meta.is_dir() {
            left += remove_tree(&path, dev, skip);
            fs::remove_dir(&path)
        } else {
            fs::remove_file(&path)
        };
        if removed.is_err() {
            left += 1;
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "isola-switchroot-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// An initramfs-like tree: what rootfs-builder writes, minus the
    /// device nodes (a test may not run as root), plus a link and a nested
    /// directory.
    fn initramfs_like(root: &Path) {
        for (dir, mode) in [("dev", 0o755), ("proc", 0o555), ("tmp", 0o1777)] {
            fs::create_dir(root.join(dir)).unwrap();
            fs::set_permissions(root.join(dir), fs::Permissions::from_mode(mode)).unwrap();
        }
        fs::create_dir_all(root.join("etc/deep")).unwrap();
        fs::write(root.join("init"), vec![7u8; 3000]).unwrap();
        fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("etc/deep/file"), b"12345").unwrap();
        symlink("../init", root.join("etc/link")).unwrap();
    }

    /// A scratch dir holding an [`initramfs_like`] `root` with an empty
    /// `root/newroot`: (scratch dir, root, new root, root's device).
    fn root_with_new_root(
        name: &str,
    ) -> (
        std::path::PathBuf,
        std::path::PathBuf,
        std::path::PathBuf,
        u64,
    ) {
        let base = scratch(name);
        let root = base.join("root");
        fs::create_dir(&root).unwrap();
        initramfs_like(&root);
        let new_root = root.join("newroot");
        fs::create_dir(&new_root).unwrap();
        let dev = fs::symlink_metadata(&root).unwrap().dev();
        (base, root, new_root, dev)
    }

    #[test]
    fn copies_the_tree_with_modes_and_skips_the_new_root() {
        let (base, root, new_root, dev) = root_with_new_root("copy");

        assert_eq!(tree_bytes(&root, dev, &new_root).unwrap(), 3005);
        assert_eq!(copy_tree(&root, &new_root, dev, &new_root).unwrap(), 3005);
        assert_eq!(fs::read(new_root.join("init")).unwrap(), vec![7u8; 3000]);
        assert_eq!(fs::read(new_root.join("etc/deep/file")).unwrap(), b"12345");
        assert_eq!(
            fs::read_link(new_root.join("etc/link")).unwrap(),
            Path::new("../init")
        );
        let mode = |p: &str| fs::symlink_metadata(new_root.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("init"), 0o755);
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("proc"), 0o555);
        assert!(!new_root.join("newroot").exists(), "copied into itself");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn copies_device_nodes_when_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: device nodes cannot be made, skipped");
            return;
        }
        let base = scratch("nodes");
        let (from, to) = (base.join("from"), base.join("to"));
        fs::create_dir_all(from.join("dev")).unwrap();
        fs::create_dir(&to).unwrap();
        let null = nix::sys::stat::makedev(1, 3);
        mknod(
            &from.join("dev/null"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            null,
        )
        .unwrap();
        // mknod applied the umask; the initrd's node is 0666.
        fs::set_permissions(from.join("dev/null"), fs::Permissions::from_mode(0o666)).unwrap();
        let dev = fs::symlink_metadata(&from).unwrap().dev();
        copy_tree(&from, &to, dev, &to).unwrap();
        let meta = fs::symlink_metadata(to.join("dev/null")).unwrap();
        assert!(meta.file_type().is_char_device());
        assert_eq!((meta.rdev(), meta.mode() & 0o7777), (null, 0o666));
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn removes_everything_but_the_new_root_and_other_devices() {
        let (base, root, new_root, dev) = root_with_new_root("remove");
        fs::write(new_root.join("kept"), b"x").unwrap();

        assert_eq!(remove_tree(&root, dev, &new_root), 0);
        let left: Vec<_> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![OsString::from("newroot")]);
        assert!(new_root.join("kept").exists());

        // Entries of another device are never touched.
        initramfs_like(&root);
        assert_eq!(remove_tree(&root, dev.wrapping_add(1), &new_root), 0);
        assert!(root.join("init").exists() && root.join("etc/deep/file").exists());
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn tmpfs_size_is_content_and_headroom_in_whole_mib() {
        assert_eq!(tmpfs_size(0), 8 << 20);
        assert_eq!(tmpfs_size(1), 9 << 20);
        assert_eq!(tmpfs_size(6_285_332), 14 << 20);
        assert_eq!(tmpfs_size(1 << 20), 9 << 20);
        assert_eq!(tmpfs_size(u64::MAX), (u64::MAX / (1 << 20)) * (1 << 20));
    }

    #[test]
    fn tells_the_initramfs_root_from_a_mounted_root() {
        let initramfs = "\
1 1 0:2 / / rw - rootfs rootfs rw,size=118832k
20 1 0:19 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
";
        let switched = "\
22 1 0:20 / / rw,nosuid,nodev - tmpfs tmpfs rw,size=14336k,mode=755
23 22 0:19 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
";
        assert!(root_is_initramfs(initramfs));
        assert!(!root_is_initramfs(switched));
        assert!(!root_is_initramfs(""));
    }
}
