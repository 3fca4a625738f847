//! Looking at a container's rootfs from the host, as the container will
//! see it: paths resolved with the rootfs as `/` (symlinks followed inside
//! it, `..` stopping at its root), and a command looked up on `PATH`.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Most symlinks followed in one resolution (Linux's limit).
const MAX_SYMLINKS: usize = 40;

/// The `PATH` used when the process's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Resolves `path` (absolute, as the container sees it) inside `root`,
/// following symlinks as if `root` were `/`. Returns the host path; the
/// last component need not exist.
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut resolved = PathBuf::new(); // relative to root
    let mut pending: Vec<std::ffi::OsString> = components_rev(path);
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match part.to_str() {
            Some("..") => {
                resolved.pop();
                continue;
            }
            Some(".") | Some("") => continue,
            _ => {}
        }
        let candidate = resolved.join(&part);
        let host = root.join(&candidate);
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::other(format!(
                        "{}: too many levels of symbolic links",
                        path.display()
                    )));
                }
                let target = std::fs::read_link(&host)?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                pending.extend(components_rev(&target));
            }
            Ok(_) => resolved = candidate,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                if pending.is_empty() {
                    return Ok(root.join(candidate));
                }
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: {} does not exist", path.display(), candidate.display()),
                ));
            }
            Err(err) => return Err(err),
        }
    }
    Ok(root.join(resolved))
}

/// The path's components, last first (a stack to pop), without the root.
fn components_rev(path: &Path) -> Vec<std::ffi::OsString> {
    let mut parts: Vec<std::ffi::OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    parts.reverse();
    parts
}

fn is_executable_file(host: &Path) -> bool {
    std::fs::metadata(host).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `command` (a process's `args[0]`) in `root` as the container
/// would: a name with a `/` is a path (relative to `cwd`), any other is
/// looked up on `path` (the process's `PATH`). Returns the host path of
/// the executable file, or an error naming the command, the rootfs and the
/// directories searched.
pub fn find_command(root: &Path, command: &str, cwd: &str, path: &str) -> Result<PathBuf, String> {
    if command.is_empty() {
        return Err("the command is empty".to_string());
    }
    if command.contains('/') {
        let in_container = Path::new(cwd).join(command);
        return match resolve_in_root(root, &in_container) {
            Ok(host) if is_executable_file(&host) => Ok(host),
            Ok(_) => Err(format!(
                "command {command:?} is not an executable file in the rootfs {}",
                root.display()
            )),
            Err(err) => Err(format!(
                "command {command:?} not found in the rootfs {}: {err}",
                root.display()
            )),
        };
    }
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        if let Ok(host) = resolve_in_root(root, &Path::new(dir).join(command)) {
            if is_executable_file(&host) {
                return Ok(host);
            }
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

        let busybox = root.join("bin/busybox");
        assert_eq!(
            find_command(root, "sh", "/", DEFAULT_PATH),
            Ok(busybox.clone())
        );
        assert_eq!(
            find_command(root, "env", "/", DEFAULT_PATH),
            Ok(busybox.clone())
        );
        assert_eq!(
            find_command(root, "/sbin/env", "/", "/nowhere"),
            Ok(busybox.clone())
        );
        assert_eq!(
            find_command(root, "./busybox", "/bin", ""),
            Ok(busybox.clone())
        );
        assert_eq!(
            find_command(root, "../bin/sh", "/usr", ""),
            Ok(busybox.clone())
        );
        assert_eq!(find_command(root, "escape", "/", "/bin"), Ok(busybox));

        let err = find_command(root, "bash", "/", "/bin:/usr/bin")
            .err()
            .unwrap_or_default();
        assert!(err.contains("\"bash\" not found"), "{err}");
        assert!(err.contains("PATH=/bin:/usr/bin"), "{err}");
        let err = find_command(root, "data", "/", "/bin")
            .err()
            .unwrap_or_default();
        assert!(err.contains("not found"), "{err}");
        let err = find_command(root, "/bin/data", "/", "")
            .err()
            .unwrap_or_default();
        assert!(err.contains("not an executable file"), "{err}");
        let err = find_command(root, "/bin/loop1", "/", "")
            .err()
            .unwrap_or_default();
        assert!(err.contains("too many levels"), "{err}");
        let err = find_command(root, "/no/such/cmd", "/", "")
            .err()
            .unwrap_or_default();
        assert!(err.contains("does not exist"), "{err}");
        assert!(find_command(root, "", "/", DEFAULT_PATH).is_err());
        // The host's own /bin/sh is not the container's.
        assert!(find_command(&root.join("usr"), "sh", "/", "/bin").is_err());
    }

    #[test]
    fn path_from_env() {
        assert_eq!(env_path(&[]), DEFAULT_PATH);
        let env = vec!["A=1".to_string(), "PATH=/x:/y".to_string()];
        assert_eq!(env_path(&env), "/x:/y");
    }
}
