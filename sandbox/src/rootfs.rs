//! Looking at a container's rootfs from the host, as the container will
//! see it, without trusting it: the rootfs is an image's (a tenant's), so
//! every path in it is resolved by the kernel relative to a handle on its
//! root (`openat2` with `RESOLVE_IN_ROOT`, or libpathrs's checked walk on
//! older kernels: symlinks followed inside it, `..` stopping at its root,
//! no race with a symlink swapped in), files are read only when they are
//! regular files of a bounded size and opened non-blocking (a FIFO or a
//! device node as `/etc/passwd` is refused, never opened), and mount
//! points are made relative to the handle, never by a path string.

use std::fmt::Display;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pathrs::flags::OpenFlags;
use pathrs::{InodeType, Root};

/// The `PATH` used when the process's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The largest image file [`ImageRoot::read_file`] reads (an
/// `/etc/passwd` of thousands of users is well below it).
pub const MAX_IMAGE_FILE: u64 = 1 << 20;

/// A container's rootfs, opened once; every path is taken as the
/// container sees it (absolute or not, relative to the rootfs's root).
#[derive(Debug)]
pub struct ImageRoot {
    root: Root,
    dir: PathBuf,
}

/// A pathrs error as an `io::Error` of the same errno, naming `what`.
fn io_error(what: impl Display, err: pathrs::error::Error) -> io::Error {
    match err.kind() {
        pathrs::error::ErrorKind::OsError(Some(errno)) => {
            let os = io::Error::from_raw_os_error(errno);
            io::Error::new(os.kind(), format!("{what}: {err}: {os}"))
        }
        _ => io::Error::other(format!("{what}: {err}")),
    }
}

/// What a file's type is, in words.
fn type_name(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

impl ImageRoot {
    /// Opens the rootfs directory `dir`.
    pub fn open(dir: &Path) -> io::Result<ImageRoot> {
        let root = Root::open(dir)
            .map_err(|e| io_error(format!("opening the rootfs {}", dir.display()), e))?;
        Ok(ImageRoot {
            root,
            dir: dir.to_path_buf(),
        })
    }

    /// The rootfs's host path (for messages).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `path` in words: "/etc/passwd in the rootfs /x".
    fn name(&self, path: &Path) -> String {
        format!("{} in the rootfs {}", path.display(), self.dir.display())
    }

    /// The metadata of what `path` resolves to (symlinks followed inside
    /// the rootfs); `None` when it does not exist.
    fn metadata(&self, path: &Path) -> io::Result<Option<(pathrs::Handle, std::fs::Metadata)>> {
        let handle = match self.root.resolve(path) {
            Ok(handle) => handle,
            Err(err)
                if matches!(
                    err.kind(),
                    pathrs::error::ErrorKind::OsError(Some(libc::ENOENT))
                ) =>
            {
                return Ok(None)
            }
            Err(err) => return Err(io_error(self.name(path), err)),
        };
        let fd = handle
            .try_clone()
            .map_err(|e| io_error(self.name(path), e))?;
        // An O_PATH handle: fstat works on it, nothing is opened.
        let meta = std::fs::File::from(OwnedFd::from(fd))
            .metadata()
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.name(path))))?;
        Ok(Some((handle, meta)))
    }

    /// Reads the image file `path` (`/etc/passwd`, `/etc/group`) as text:
    /// `None` when it does not exist; an error naming it when it is not a
    /// regular file (never opened then), larger than `max` bytes, or not
    /// UTF-8.
    pub fn read_file(&self, path: &Path, max: u64) -> io::Result<Option<String>> {
        let Some((handle, meta)) = self.metadata(path)? else {
            return Ok(None);
        };
        let name = self.name(path);
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is {}, not a regular file", type_name(&meta)),
            ));
        }
        if meta.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is {} bytes, more than the {max} read", meta.len()),
            ));
        }
        let file = handle
            .reopen(OpenFlags::O_RDONLY | OpenFlags::O_NONBLOCK | OpenFlags::O_CLOEXEC)
            .map_err(|e| io_error(&name, e))?;
        let mut bytes = Vec::new();
        file.take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {name}: {e}")))?;
        if bytes.len() as u64 > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} grew past the {max} bytes read"),
            ));
        }
        String::from_utf8(bytes).map(Some).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name} is not UTF-8 text"),
            )
        })
    }

    /// Whether `path` resolves to an executable regular file.
    fn is_executable_file(&self, path: &Path) -> io::Result<bool> {
        Ok(self
            .metadata(path)?
            .is_some_and(|(_, m)| m.is_file() && m.permissions().mode() & 0o111 != 0))
    }

    /// Makes `path` exist, as a directory, or as an empty file when
    /// `file`: every missing directory on the way made inside the rootfs
    /// (mode 0755), nothing made when it exists (whatever it is). A
    /// dangling symlink on the way is an error (runc's rule since 1.2),
    /// not followed out of the rootfs nor created through.
    pub fn make_mount_point(&self, path: &Path, file: bool) -> io::Result<()> {
        if self.metadata(path)?.is_some() {
            return Ok(());
        }
        let name = self.name(path);
        let dir_mode = std::fs::Permissions::from_mode(0o755);
        if !file {
            return self
                .root
                .mkdir_all(path, &dir_mode)
                .map(drop)
                .map_err(|e| io_error(format!("making the directory {name}"), e));
        }
        if let Some(parent) = path.parent() {
            self.root
                .mkdir_all(parent, &dir_mode)
                .map_err(|e| io_error(format!("making the directory of {name}"), e))?;
        }
        match self.root.create(
            path,
            &InodeType::File(std::fs::Permissions::from_mode(0o644)),
        ) {
            Ok(()) => Ok(()),
            // Made meanwhile: it exists, as wanted.
            Err(err)
                if matches!(
                    err.kind(),
                    pathrs::error::ErrorKind::OsError(Some(libc::EEXIST))
                ) =>
            {
                Ok(())
            }
            Err(err) => Err(io_error(format!("making the file {name}"), err)),
        }
    }
}

/// Finds `command` (a process's `args[0]`) in `root` as the container
/// would: a name with a `/` is a path (relative to `cwd`), any other is
/// looked up on `path` (the process's `PATH`). Returns the path the
/// container runs it by, or an error naming the command, the rootfs and
/// the directories searched.
pub fn find_command(root: &Path, command: &str, cwd: &str, path: &str) -> Result<PathBuf, String> {
    if command.is_empty() {
        return Err("the command is empty".to_string());
    }
    let image = ImageRoot::open(root).map_err(|e| e.to_string())?;
    if command.contains('/') {
        let in_container = Path::new(cwd).join(command);
        return match image.is_executable_file(&in_container) {
            Ok(true) => Ok(in_container),
            Ok(false) if image.metadata(&in_container).ok().flatten().is_some() => Err(format!(
                "command {command:?} is not an executable file in the rootfs {}",
                root.display()
            )),
            Ok(false) => Err(format!(
                "command {command:?} not found in the rootfs {}: {} does not exist",
                root.display(),
                in_container.display()
            )),
            Err(err) => Err(format!("command {command:?} not found: {err}")),
        };
    }
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let candidate = Path::new(dir).join(command);
        if image.is_executable_file(&candidate).unwrap_or(false) {
            return Ok(candidate);
        }
    }
    Err(format!(
        "command {command:?} not found in the rootfs {} (PATH={path})",
        root.display()
    ))
}

/// The `PATH` of an OCI process environment (`KEY=VALUE` strings).
pub fn env_path(env: &[String]) -> &str {
    env.iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn exe(path: &Path) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn commands_resolve_inside_the_rootfs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        exe(&root.join("bin/busybox"));
        std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        // An absolute symlink is relative to the rootfs, not the host.
        symlink("/bin/busybox", root.join("bin/sh")).expect("symlink");
        symlink("../../bin/busybox", root.join("usr/bin/env")).expect("symlink");
        // A symlinked directory, as merged-/usr distributions have.
        symlink("usr/bin", root.join("sbin")).expect("symlink");
        std::fs::write(root.join("bin/data"), b"not executable").expect("write");
        // Escapes stop at the rootfs's root.
        symlink("/../../../../bin/busybox", root.join("bin/escape")).expect("symlink");
        symlink("loop2", root.join("bin/loop1")).expect("symlink");
        symlink("loop1", root.join("bin/loop2")).expect("symlink");

        let found = |cmd: &str, cwd: &str, path: &str| find_command(root, cmd, cwd, path);
        assert_eq!(found("sh", "/", DEFAULT_PATH), Ok("/bin/sh".into()));
        assert_eq!(found("env", "/", DEFAULT_PATH), Ok("/usr/bin/env".into()));
        assert_eq!(found("/sbin/env", "/", "/nowhere"), Ok("/sbin/env".into()));
        assert_eq!(found("./busybox", "/bin", ""), Ok("/bin/./busybox".into()));
        assert_eq!(found("../bin/sh", "/usr", ""), Ok("/usr/../bin/sh".into()));
        assert_eq!(found("escape", "/", "/bin"), Ok("/bin/escape".into()));

        let err = found("bash", "/", "/bin:/usr/bin")
            .err()
            .unwrap_or_default();
        assert!(err.contains("\"bash\" not found"), "{err}");
        assert!(err.contains("PATH=/bin:/usr/bin"), "{err}");
        let err = found("data", "/", "/bin").err().unwrap_or_default();
        assert!(err.contains("not found"), "{err}");
        let err = found("/bin/data", "/", "").err().unwrap_or_default();
        assert!(err.contains("not an executable file"), "{err}");
        let err = found("/bin/loop1", "/", "").err().unwrap_or_default();
        assert!(err.to_lowercase().contains("symbolic links"), "{err}");
        let err = found("/no/such/cmd", "/", "").err().unwrap_or_default();
        assert!(err.contains("does not exist"), "{err}");
        assert!(found("", "/", DEFAULT_PATH).is_err());
        // The host's own /bin/sh is not the container's.
        assert!(find_command(&root.join("usr"), "sh", "/", "/bin").is_err());
    }

    #[test]
    fn image_files_are_read_only_when_regular_and_small() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::fs::write(root.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").expect("write");
        // Absolute and escaping links stay inside the rootfs.
        symlink("/etc/passwd", root.join("etc/link")).expect("symlink");
        symlink("../../../../../etc/hostname", root.join("etc/out")).expect("symlink");
        nix::unistd::mkfifo(
            &root.join("etc/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");
        std::fs::write(root.join("etc/big"), vec![b'x'; 100]).expect("write");
        let image = ImageRoot::open(root).expect("open");
        let read = |p: &str| image.read_file(Path::new(p), 64);
        assert_eq!(
            read("/etc/passwd").expect("read").as_deref(),
            Some("root:x:0:0::/root:/bin/sh\n")
        );
        assert_eq!(
            read("etc/link").expect("read"),
            read("/etc/passwd").expect("read")
        );
        assert_eq!(read("/etc/out").expect("missing inside"), None);
        assert_eq!(read("/etc/none").expect("missing"), None);
        // A FIFO would block a reader forever: refused, not opened (this
        // returns at once), and named.
        let err = read("/etc/fifo").expect_err("fifo").to_string();
        assert!(
            err.contains("/etc/fifo in the rootfs") && err.contains("a FIFO, not a regular file"),
            "{err}"
        );
        let err = read("/etc").expect_err("dir").to_string();
        assert!(err.contains("a directory"), "{err}");
        let err = read("/etc/big").expect_err("big").to_string();
        assert!(err.contains("100 bytes, more than the 64"), "{err}");
    }

    #[test]
    fn image_files_refuse_devices() {
        // A device node needs root to make: checked where the tests run as
        // root (make test does).
        let tmp = tempfile::tempdir().expect("tempdir");
        let dev = tmp.path().join("passwd");
        let made = nix::sys::stat::mknod(
            &dev,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(1, 3),
        );
        if made.is_err() {
            eprintln!("not root: cannot make a device node, skipped");
            return;
        }
        let image = ImageRoot::open(tmp.path()).expect("open");
        let err = image
            .read_file(Path::new("/passwd"), 64)
            .expect_err("device")
            .to_string();
        assert!(err.contains("a character device"), "{err}");
    }

    #[test]
    fn mount_points_are_made_inside_the_rootfs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("rootfs");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        // A link to an existing directory, written to leave the rootfs:
        // it resolves inside.
        symlink("/../../../../etc", root.join("up")).expect("symlink");
        // A link to the host's directory by its absolute path: inside the
        // rootfs that path does not exist.
        symlink(outside.path(), root.join("host")).expect("symlink");
        let image = ImageRoot::open(&root).expect("open");
        image
            .make_mount_point(Path::new("/data/deep"), false)
            .expect("dir");
        image
            .make_mount_point(Path::new("/etc/one"), true)
            .expect("file");
        image
            .make_mount_point(Path::new("/up/two"), false)
            .expect("through a link");
        image
            .make_mount_point(Path::new("/etc/one"), true)
            .expect("exists");
        assert!(root.join("data/deep").is_dir());
        assert!(root.join("etc/one").is_file());
        assert!(root.join("etc/two").is_dir());
        let err = image
            .make_mount_point(Path::new("/host/x"), false)
            .expect_err("dangling");
        assert!(err.to_string().contains("/host/x in the rootfs"), "{err}");
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("ls").count(),
            0,
            "made on the host"
        );
        assert!(!root.join("host/x").exists());
    }

    #[test]
    fn path_from_env() {
        assert_eq!(env_path(&[]), DEFAULT_PATH);
        let env = vec!["A=1".to_string(), "PATH=/x:/y".to_string()];
        assert_eq!(env_path(&env), "/x:/y");
    }
}
