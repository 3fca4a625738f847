//! The jail natively (`--check-jail` needs no VM): as root it is entered
//! and reported; the jail root on the host stays empty and unmounted; a
//! jailed VMM that fails ends its supervisor with its status and message.

#![allow(clippy::unwrap_used)] // a test: a panic is its failure report

use std::process::Command;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn mounted_at(dir: &std::path::Path) -> bool {
    let dir = dir.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir))
}

/// Runs isola-vmm with `args` and a `--jail` whose root is a new empty
/// directory; returns its output and the root.
fn jailed(args: &[&str]) -> (std::process::Output, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("jail");
    std::fs::create_dir(&root).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_isola-vmm"))
        .args(args)
        .arg("--jail")
        .arg(format!(
            "uid=1879048199,gid=1879048199,root={}",
            root.display()
        ))
        .output()
        .unwrap();
    (out, dir, root)
}

#[test]
fn check_jail_enters_it_and_leaves_nothing() {
    let (out, _dir, root) = jailed(&["--check-jail"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if is_root() {
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(
            stdout.starts_with("jail: ok (pid 1 in its own pid, mount, IPC, UTS and network namespaces; uid 1879048199; no capabilities"),
            "{stdout}"
        );
    } else {
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(stderr.contains("the jail does not work here"), "{stderr}");
    }
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    assert!(!mounted_at(&root), "the jail's tmpfs leaked into the host");
}

#[test]
fn a_jailed_vmm_that_fails_ends_its_supervisor_with_its_status() {
    let (out, _dir, root) = jailed(&["--kernel", env!("CARGO_BIN_EXE_isola-vmm"), "--console=off"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // This file is no kernel, and where /dev/kvm is PVM (or absent) the VM
    // fails sooner: either way the jailed VMM ends with 1 and its message,
    // and so does the supervisor.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("isola-vmm: error:"), "{stderr}");
    if is_root() {
        assert!(
            !stderr.contains("jail:"),
            "the jail itself failed: {stderr}"
        );
    }
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
}

#[test]
fn a_jail_takes_taps_by_descriptor_only() {
    let out = Command::new(env!("CARGO_BIN_EXE_isola-vmm"))
        .args([
            "--kernel",
            "/nonexistent",
            "--net",
            "tap=tap0,mac=52:54:00:12:34:56",
            "--jail",
            "uid=5,gid=5,root=/nonexistent",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--net fd=N only"), "{stderr}");
}
