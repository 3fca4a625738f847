//! `isola check`: one `ok`/`FAIL` line per check, a config error named by
//! its key, a non-zero status when anything fails. (What passes depends on
//! the host; the shape of the report does not.)

use std::path::Path;
use std::process::{Command, Output};

/// Every check's name, in order.
const NAMES: [&str; 14] = [
    "kvm",
    "/dev/kvm",
    "/dev/net/tun",
    "transparent hugepages",
    "config",
    "isola-vmm",
    "jail",
    "guest kernel",
    "guest initrd",
    "versions",
    "virtiofsd",
    "debug sessions",
    "containerd",
    "containerd-shim-isola-v2",
];

fn check(config: &Path, containerd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_isola"))
        .arg("check")
        .arg("--config")
        .arg(config)
        .arg("--containerd-address")
        .arg(containerd)
        .env_remove("ISOLA_CONFIG")
        .output()
        .expect("running isola check")
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Every line is `ok   NAME...` or `FAIL NAME: ...`, one per check, in order.
fn assert_report_shape(out: &Output) {
    let lines = lines(out);
    assert_eq!(lines.len(), NAMES.len(), "{lines:#?}");
    for (line, name) in lines.iter().zip(NAMES) {
        let rest = line
            .strip_prefix("ok   ")
            .or_else(|| line.strip_prefix("FAIL "))
            .unwrap_or_else(|| panic!("neither ok nor FAIL: {line:?}"));
        assert!(
            rest == name || rest.starts_with(&format!("{name}: ")),
            "expected the check {name:?}: {line:?}"
        );
    }
    let all_ok = lines.iter().all(|l| l.starts_with("ok   "));
    assert_eq!(out.status.success(), all_ok, "{lines:#?}");
}

#[test]
fn a_bad_key_fails_naming_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("config.toml");
    std::fs::write(&config, "[hypervisor]\ndefault_vcpus = 2\nvcpu = 4\n").expect("write");
    let out = check(&config, &tmp.path().join("containerd.sock"));
    assert_ne!(out.status.code(), Some(0));
    assert_report_shape(&out);
    let lines = lines(&out);
    let expected = format!(
        "FAIL config: unknown key `hypervisor.vcpu` in {} (line 3, column 1)",
        config.display()
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&expected)),
        "no {expected:?} in {lines:#?}"
    );
    // What depends on the config is not checked against a guess.
    assert!(
        lines
            .iter()
            .any(|l| l
                == "FAIL isola-vmm: not checked: the config did not load (see `config` above)"),
        "{lines:#?}"
    );
}

#[test]
fn a_valid_config_gives_one_line_per_check() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("config.toml");
    let missing = tmp.path().join("missing");
    std::fs::write(
        &config,
        format!(
            "[hypervisor]\nvmm = \"{0}/isola-vmm\"\nkernel = \"{0}/vmlinux\"\n\
             initrd = \"{0}/initrd.img\"\n[virtiofs]\nvirtiofsd = \"{0}/virtiofsd\"\n",
            missing.display()
        ),
    )
    .expect("write");
    let containerd = tmp.path().join("containerd.sock");
    let out = check(&config, &containerd);
    assert_report_shape(&out);
    let lines = lines(&out);
    assert!(
        lines.contains(&format!("ok   config: {}", config.display())),
        "{lines:#?}"
    );
    // The files it names do not exist, and neither does containerd's socket.
    for expected in [
        format!(
            "FAIL isola-vmm: {}/isola-vmm does not exist",
            missing.display()
        ),
        format!(
            "FAIL guest kernel: {}/vmlinux does not exist",
            missing.display()
        ),
        format!(
            "FAIL guest initrd: {}/initrd.img does not exist",
            missing.display()
        ),
        format!(
            "FAIL virtiofsd: {}/virtiofsd does not exist",
            missing.display()
        ),
        format!("FAIL containerd: no socket at {}", containerd.display()),
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(&expected)),
            "no {expected:?} in {lines:#?}"
        );
    }
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn the_shipped_config_is_valid() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/isola.toml");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = check(&shipped, &tmp.path().join("containerd.sock"));
    assert_report_shape(&out);
    assert!(
        lines(&out)
            .iter()
            .any(|l| l.starts_with("ok   config: ") && l.ends_with("configs/isola.toml")),
        "{:#?}",
        lines(&out)
    );
}

/// With the isola-vmm built beside this `isola`, the jail is tried for
/// real: entered as root, refused with the reason otherwise.
#[test]
fn the_jail_is_tried_with_the_configured_vmm() {
    let vmm = Path::new(env!("CARGO_BIN_EXE_isola")).with_file_name("isola-vmm");
    if !vmm.exists() {
        eprintln!("skipped: no {} (cargo build -p isola-vmm)", vmm.display());
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("config.toml");
    let leases = tmp.path().join("leases");
    std::fs::write(
        &config,
        format!(
            "[hypervisor]\nvmm = \"{}\"\n[jail]\nfirst_uid = 1879100000\nuid_count = 4\n\
             lease_dir = \"{}\"\n",
            vmm.display(),
            leases.display()
        ),
    )
    .expect("write");
    let out = check(&config, &tmp.path().join("containerd.sock"));
    assert_report_shape(&out);
    let lines = lines(&out);
    let jail = lines
        .iter()
        .find(|l| l.contains(" jail: "))
        .expect("a jail line");
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            jail.starts_with("ok   jail: ok (pid 1 in its own pid, mount, IPC, UTS and network namespaces; uid 18791000"),
            "{lines:#?}"
        );
    } else {
        assert!(
            jail.starts_with("FAIL jail: isola-vmm: error: the jail does not work here"),
            "{jail}"
        );
    }
    // The lease was given back: every uid of the range is free again.
    for uid in 1_879_100_000u32..1_879_100_004 {
        let file = leases.join(uid.to_string());
        if let Ok(f) = std::fs::File::open(&file) {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor `f` owns.
            let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            assert_eq!(r, 0, "{} still held", file.display());
        }
    }
}
