//! `isola run`'s checks before any VM boots (no KVM needed): what is wrong
//! is named, the status is non-zero, and nothing is left behind.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn isola(args: &[&str], run_root: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_isola"))
        .arg("run")
        .arg("--run-root")
        .arg(run_root)
        .args(args)
        .env_remove("ISOLA_KERNEL")
        .env_remove("ISOLA_INITRD")
        .output()
        .expect("running isola")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A rootfs with an executable /bin/sh and a /usr/bin -> /bin link.
fn rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
    std::fs::write(dir.join("bin/sh"), b"#!").expect("write");
    std::fs::set_permissions(dir.join("bin/sh"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::create_dir_all(dir.join("usr")).expect("mkdir");
    std::os::unix::fs::symlink("/bin", dir.join("usr/bin")).expect("symlink");
}

fn assert_nothing_left(run_root: &Path) {
    let left: Vec<_> = std::fs::read_dir(run_root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_missing_rootfs_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_root = tmp.path().join("run");
    let missing = tmp.path().join("no-such-rootfs");
    let out = isola(
        &["--rootfs", missing.to_str().unwrap_or(""), "--", "sh"],
        &run_root,
    );
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "the rootfs {} is not a directory",
            missing.display()
        )),
        "{}",
        stderr(&out)
    );
    assert_nothing_left(&run_root);
}

#[test]
fn a_command_not_in_the_rootfs_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("rootfs");
    rootfs(&root);
    let run_root = tmp.path().join("run");
    let out = isola(
        &[
            "--rootfs",
            root.to_str().unwrap_or(""),
            "--",
            "bash",
            "-c",
            "true",
        ],
        &run_root,
    );
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(
        err.contains("command \"bash\" not found in the rootfs"),
        "{err}"
    );
    assert_nothing_left(&run_root);
}

#[test]
fn missing_images_are_named_and_found_commands_pass_the_check() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("rootfs");
    rootfs(&root);
    let run_root = tmp.path().join("run");
    let kernel = tmp.path().join("no-vmlinux");
    // `sh` is found through PATH (and /usr/bin/sh through a symlink), so
    // the next check, the kernel, is the one that fails.
    for cmd in ["sh", "/usr/bin/sh"] {
        let out = isola(
            &[
                "--rootfs",
                root.to_str().unwrap_or(""),
                "--kernel",
                kernel.to_str().unwrap_or(""),
                "--",
                cmd,
            ],
            &run_root,
        );
        assert_eq!(out.status.code(), Some(125));
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "the guest kernel {} does not exist",
                kernel.display()
            )),
            "{cmd}: {err}"
        );
    }
    assert_nothing_left(&run_root);
}

#[test]
fn bad_flags_name_the_bad_part() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_root = tmp.path().join("run");
    let out = isola(
        &["--rootfs", "/", "--volume", "/a:b", "--", "sh"],
        &run_root,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("container path \"b\" is not absolute"),
        "{}",
        stderr(&out)
    );
    let out = isola(&["--rootfs", "/", "--user", "root", "--", "sh"], &run_root);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("uid \"root\""), "{}", stderr(&out));
    let out = isola(&["--", "sh"], &run_root);
    assert_eq!(out.status.code(), Some(2), "no rootfs nor bundle");
    let missing_vol = tmp.path().join("nope");
    let vol = format!("{}:/data", missing_vol.display());
    let out = isola(&["--rootfs", "/", "--volume", &vol, "--", "sh"], &run_root);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert_nothing_left(&run_root);
}

#[test]
fn help_documents_the_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_isola"))
        .args(["run", "--help"])
        .output()
        .expect("isola");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--rootfs",
        "--bundle",
        "--tty",
        "--interactive",
        "--user",
        "--env",
        "--cwd",
        "--memory",
        "--vcpus",
        "--volume",
        "ISOLA_KERNEL",
        "ISOLA_VIRTIOFSD",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
}
