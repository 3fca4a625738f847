//! Command-line errors: named clearly, exit status 1 or 2, nothing left
//! behind. These run natively: they fail before KVM is touched.

#![allow(clippy::unwrap_used)] // a test: a panic is its failure report

use std::process::Command;

fn vmm(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_isola-vmm"))
        .args(args)
        .output()
        .expect("running isola-vmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_kernel_names_its_path() {
    let (code, err) = vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("kernel /nonexistent/vmlinux: no such file"),
        "{err}"
    );
}

#[test]
fn missing_initrd_names_its_path() {
    let kernel = env!("CARGO_BIN_EXE_isola-vmm");
    let (code, err) = vmm(&["--kernel", kernel, "--initrd", "/nonexistent/initrd.img"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/initrd.img"), "{err}");
}

#[test]
fn bad_sizes_are_named() {
    let kernel = env!("CARGO_BIN_EXE_isola-vmm");
    let (code, err) = vmm(&["--kernel", kernel, "--vcpus", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("--vcpus 0"), "{err}");
    let (code, err) = vmm(&["--kernel", kernel, "--memory", "8"]);
    assert_eq!(code, 1);
    assert!(err.contains("--memory 8"), "{err}");
    let (code, err) = vmm(&["--kernel", kernel, "--vcpus", "many"]);
    assert_eq!(code, 2, "clap usage error: {err}");
    assert!(err.contains("--vcpus"), "{err}");
}

#[test]
fn missing_kernel_argument_is_a_usage_error() {
    let (code, err) = vmm(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("--kernel"), "{err}");
}

#[test]
fn help_documents_every_option() {
    let out = Command::new(env!("CARGO_BIN_EXE_isola-vmm"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--vcpus",
        "--memory",
        "--vsock",
        "--console",
        "--api-socket",
        "--fs",
        "--net",
    ] {
        assert!(help.contains(opt), "{opt} missing from --help");
    }
}

#[test]
fn pvm_kvm_is_refused_with_a_clear_message() {
    // Only a PVM host (like the project's development machines) can show
    // this; elsewhere /dev/kvm may boot guests and the check does not fire.
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("not a PVM host: nothing to check");
        return;
    }
    let kernel = env!("CARGO_BIN_EXE_isola-vmm");
    let started = std::time::Instant::now();
    let (code, err) = vmm(&["--kernel", kernel]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("PVM"), "{err}");
    assert!(err.contains("cannot boot standard guest"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "it must not hang"
    );
}

#[test]
fn bad_fs_values_are_usage_errors_naming_the_field() {
    let kernel = env!("CARGO_BIN_EXE_isola-vmm");
    for (value, named) in [
        ("tag=,socket=/s", "tag"),
        (
            "tag=0123456789012345678901234567890123456,socket=/s",
            "1 to 36 bytes",
        ),
        ("tag=a", "socket is missing"),
        ("tag=a,socket=/s,queues=0", "queues=0"),
        ("tag=a,socket=/s,queue_size=100", "queue_size=100"),
        ("tag=a,socket=/s,queue_size=4096", "queue_size=4096"),
        ("tag=a,socket=/s,bogus=1", "unknown field \"bogus\""),
    ] {
        let (code, err) = vmm(&["--kernel", kernel, "--fs", value]);
        assert_eq!(code, 2, "{value}: {err}");
        assert!(err.contains(named), "{value}: {err}");
    }
    let (code, err) = vmm(&[
        "--kernel",
        kernel,
        "--fs",
        "tag=same,socket=/a",
        "--fs",
        "tag=same,socket=/b",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("tag=\"same\" is given more than once"),
        "{err}"
    );
}

#[test]
fn an_fs_socket_nobody_listens_on_is_an_error_at_start() {
    let kernel = env!("CARGO_BIN_EXE_isola-vmm");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("virtiofsd.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let fs = format!("tag=shared,socket={}", socket.display());
    let started = std::time::Instant::now();
    let (code, err) = vmm(&["--kernel", kernel, "--fs", &fs]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("virtio-fs tag=shared"), "{err}");
    assert!(err.contains(&socket.display().to_string()), "{err}");
    assert!(err.contains("connecting to the vhost-user socket"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn bad_net_values_are_usage_errors_naming_the_field() {
    let kernel = env!("CARGO_BIN_EXE_isola-vmm");
    for (value, named) in [
        ("fd=3", "mac is missing"),
        ("fd=1,mac=52:54:00:12:34:56", "fd=1"),
        ("tap=a/b,mac=52:54:00:12:34:56", "tap=\"a/b\""),
        ("fd=3,mac=01:00:00:00:00:01", "multicast"),
        ("fd=3,mac=00:00:00:00:00:00", "all-zero"),
        ("fd=3,mac=52:54:00:12:34", "six hex bytes"),
        ("fd=3,tap=t,mac=52:54:00:12:34:56", "not both"),
        ("fd=3,mac=52:54:00:12:34:56,mtu=1", "unknown field \"mtu\""),
    ] {
        let (code, err) = vmm(&["--kernel", kernel, "--net", value]);
        assert_eq!(code, 2, "{value}: {err}");
        assert!(err.contains(named), "{value}: {err}");
    }
    let mut args = vec!["--kernel".to_string(), kernel.to_string()];
    for i in 0..9 {
        args.push("--net".into());
        args.push(format!("fd={},mac=52:54:00:00:00:{i:02x}", i + 3));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = vmm(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("at most 8"), "{err}");
    let (code, err) = vmm(&[
        "--kernel",
        kernel,
        "--net",
        "fd=3,mac=52:54:00:00:00:01",
        "--net",
        "fd=3,mac=52:54:00:00:00:02",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--net fd=3 is given more than once"), "{err}");
}

#[test]
fn a_net_fd_that_is_not_an_open_tap_is_an_error_naming_it() {
    let kernel = env!("CARGO_BIN_EXE_isola-vmm");
    let (code, err) = vmm(&["--kernel", kernel, "--net", "fd=1000,mac=52:54:00:12:34:56"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--net fd=1000: the file descriptor is not open"),
        "{err}"
    );
}
