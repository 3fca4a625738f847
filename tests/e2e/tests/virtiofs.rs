//! isola-vmm's virtio-fs share against a real virtiofsd (the Rust one the
//! KVM host set-up installs, `isola_virtiofsd` in scripts/lib.sh).
//!
//! The guest is the test-only `isola-hostile` init in its virtio-fs mode
//! (`hostile.virtiofs=TAG`): it mounts the share, prints the bytes of the
//! host's file, writes them back reversed, then reboots or idles. The
//! VMM runs with its seccomp filters on.
//!
//! - `virtiofs_guest_reads_and_writes_a_host_directory`: byte-exact both ways, and
//!   the guest's reboot ends the VMM with status 0.
//! - `killing_virtiofsd_ends_the_vmm_with_an_error_naming_the_tag`: kill -9
//!   of virtiofsd (its whole process group: the sandbox forks) while the
//!   guest runs ends the VMM with status 1 within seconds, naming the tag.

#![allow(clippy::unwrap_used)] // a test: a panic is its failure report

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use isola_e2e::isola::{IsolaConfig, IsolaVm};
use isola_e2e::virtiofsd::Virtiofsd;
use isola_e2e::{require_kvm_host, GuestImages, Scratch, BOOT_DEADLINE};

const TAG: &str = "e2eshare";
/// How long the VMM may take to notice a dead back end and exit (the
/// emulated host is 10-20x slower than a real one; on a real host this is
/// milliseconds).
const DEATH_BOUND: Duration = Duration::from_secs(10);

fn images() -> GuestImages {
    GuestImages::hostile().unwrap()
}

/// What the host puts in the share: every byte value, then some text.
fn host_content() -> Vec<u8> {
    let mut data: Vec<u8> = (0..=255u8).collect();
    data.extend_from_slice(b"isola virtio-fs e2e\n\0end");
    data
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A shared directory with the host's file, virtiofsd on it, and a VM
/// whose guest mounts it and then does `then` (reboot or idle).
fn boot(scratch: &Scratch, then: &str) -> (Virtiofsd, IsolaVm, PathBuf) {
    let shared = scratch.path.join("share");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("from-host.bin"), host_content()).unwrap();
    let socket = scratch.path.join("virtiofsd.sock");
    let fsd = Virtiofsd::start(&socket, &shared);
    let mut config = IsolaConfig::new(images());
    config.memory_mib = 256;
    config.vsock = false;
    config.extra_cmdline = format!("quiet hostile.virtiofs={TAG} hostile.virtiofs_then={then}");
    config.extra_args = vec![
        "--fs".into(),
        format!("tag={TAG},socket={},queue_size=256", socket.display()),
    ];
    let vm = IsolaVm::start(&config, &scratch.path).unwrap();
    (fsd, vm, shared)
}

/// Waits for the guest's next `hostile: virtiofs ...` line.
fn guest_says(vm: &mut IsolaVm, what: &str) -> String {
    let line = vm
        .console
        .wait_until(
            |l| l.contains(&format!("hostile: virtiofs {what}")) || l.contains("virtiofs failed"),
            what,
            BOOT_DEADLINE,
        )
        .unwrap_or_else(|e| panic!("{e:#}\nVMM log:\n{}", vm.log().join("\n")));
    assert!(!line.contains("virtiofs failed"), "the guest: {line}");
    line
}

/// The guest's read, checked byte for byte, and its write, checked on the
/// host.
fn check_read_and_write(vm: &mut IsolaVm, shared: &Path) {
    let content = host_content();
    let line = guest_says(vm, "read");
    let rest = line
        .split("hostile: virtiofs read ")
        .nth(1)
        .unwrap_or_default();
    let mut words = rest.split_whitespace();
    assert_eq!(
        words.next(),
        Some(content.len().to_string().as_str()),
        "{line}"
    );
    assert_eq!(words.next(), Some(hex(&content).as_str()), "{line}");
    let line = guest_says(vm, "wrote");
    assert!(
        line.ends_with(&format!("wrote {}", content.len())),
        "{line}"
    );
    let written = std::fs::read(shared.join("from-guest.bin")).unwrap();
    let reversed: Vec<u8> = content.iter().rev().copied().collect();
    assert_eq!(written, reversed, "the guest's file as the host sees it");
}

#[test]
fn virtiofs_guest_reads_and_writes_a_host_directory() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("virtiofs").unwrap();
    let started = Instant::now();
    let (_fsd, mut vm, shared) = boot(&scratch, "reboot");
    check_read_and_write(&mut vm, &shared);
    eprintln!("read and write checked after {:?}", started.elapsed());
    let status = vm.wait_exit(BOOT_DEADLINE).unwrap();
    assert!(
        status.success(),
        "the guest rebooted; the VMM must exit 0, not {status}:\n{}",
        vm.log().join("\n")
    );
    let log = vm.log();
    assert!(
        log.iter()
            .any(|l| l.contains("the back end runs the queues") && l.contains(TAG)),
        "{log:#?}"
    );
}

#[test]
fn killing_virtiofsd_ends_the_vmm_with_an_error_naming_the_tag() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("virtiofs-kill").unwrap();
    let (mut fsd, mut vm, shared) = boot(&scratch, "idle");
    check_read_and_write(&mut vm, &shared);
    guest_says(&mut vm, "idle");
    fsd.kill9();
    let (status, took) = vm.wait_exit_timed(Duration::from_secs(120)).unwrap();
    eprintln!("isola-vmm exited {took:?} after virtiofsd was killed: {status}");
    assert_eq!(status.code(), Some(1), "{:#?}", vm.log());
    assert!(
        took < DEATH_BOUND,
        "the VMM took {took:?} to notice (bound {DEATH_BOUND:?})"
    );
    // The stderr reader may lag the exit a little.
    let until = Instant::now() + Duration::from_secs(30);
    let error = loop {
        let log = vm.log();
        if let Some(l) = log.iter().find(|l| l.starts_with("isola-vmm: error:")) {
            break l.clone();
        }
        assert!(Instant::now() < until, "no error line:\n{}", log.join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(error.contains(&format!("virtio-fs tag={TAG}")), "{error}");
    assert!(error.contains("closed the connection"), "{error}");
    assert!(
        vm.log()
            .iter()
            .any(|l| l.contains("virtio-fs back end failed") && l.contains(TAG)),
        "{:#?}",
        vm.log()
    );
}
