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
//! - `virtiofsd_maps_the_bounce_memory_and_never_guest_ram`: none of
//!   virtiofsd's processes maps the guest's RAM memfd; they map the
//!   device's bounce memfd, of which the idle VMM keeps a few pages.
//! - `killing_virtiofsd_ends_the_vmm_with_an_error_naming_the_tag`: kill -9
//!   of virtiofsd (its whole process group: the sandbox forks) while the
//!   guest runs ends the VMM with status 1 within seconds, naming the tag.
//! - A SIGSTOPped virtiofsd (alive, silent) never hangs the VMM:
//!   `a_stopped_virtiofsd_at_start_ends_the_vmm_at_the_deadline` (the
//!   handshake waits; SIGTERM then is held until the start fails),
//!   `a_virtiofsd_stopped_before_activation_ends_the_vmm_at_the_deadline`
//!   (the event loop waits on SET_FEATURES; SIGTERM sent while it waits
//!   ends the VMM at the deadline), and
//!   `a_virtiofsd_stopped_under_guest_reads_leaves_the_vmm_responsive`
//!   (the guest waits on its reads; the API answers and SIGTERM stops the
//!   VM at once: the VMM relays guest requests through non-blocking
//!   eventfds and waits on nothing).

#![allow(clippy::unwrap_used)] // a test: a panic is its failure report

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use isola_e2e::isola::{IsolaConfig, IsolaVm};
use isola_e2e::virtiofsd::Virtiofsd;
use isola_e2e::{require_kvm_host, GuestImages, Scratch, BOOT_DEADLINE};
use isola_vmm::api::Request;
use isola_vmm::devices::virtio::fs::frontend::REPLY_DEADLINE;

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
/// whose guest mounts it and then does `then` (reboot, idle, readloop).
fn boot(scratch: &Scratch, then: &str) -> (Virtiofsd, IsolaVm, PathBuf) {
    boot_with(scratch, then, |_| {})
}

/// [`boot`], with `before_vmm` done to virtiofsd before the VMM starts.
fn boot_with(
    scratch: &Scratch,
    then: &str,
    before_vmm: impl FnOnce(&Virtiofsd),
) -> (Virtiofsd, IsolaVm, PathBuf) {
    let shared = scratch.path.join("share");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("from-host.bin"), host_content()).unwrap();
    let socket = scratch.path.join("virtiofsd.sock");
    let fsd = Virtiofsd::start(&socket, &shared);
    before_vmm(&fsd);
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
            .any(|l| l.contains("the queues run, relayed to the back end") && l.contains(TAG)),
        "{log:#?}"
    );
}

/// The mappings of `pid` whose name contains `name`: (size, Rss) in KiB
/// (none once the process is gone).
fn mappings(pid: u32, name: &str) -> Vec<(u64, u64)> {
    isola_e2e::procstat::mappings(pid)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.name.contains(name))
        .map(|m| (m.size_kib, m.rss_kib))
        .collect()
}

#[test]
fn virtiofsd_maps_the_bounce_memory_and_never_guest_ram() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("virtiofs-maps").unwrap();
    let (fsd, mut vm, shared) = boot(&scratch, "idle");
    check_read_and_write(&mut vm, &shared);
    guest_says(&mut vm, "idle");
    let pids = fsd.group_pids();
    assert!(!pids.is_empty(), "no virtiofsd process found");
    let bounce: Vec<_> = pids
        .iter()
        .flat_map(|pid| mappings(*pid, "memfd:isola-fs-bounce"))
        .collect();
    for pid in &pids {
        let ram = mappings(*pid, "memfd:isola-guest-ram");
        assert!(ram.is_empty(), "virtiofsd {pid} maps guest RAM: {ram:?}");
    }
    assert!(!bounce.is_empty(), "virtiofsd maps no bounce memory");
    // The VMM's view, once idle past the trim: a few pages of rings and
    // small slots.
    std::thread::sleep(isola_vmm::devices::virtio::fs::TRIM_AFTER + Duration::from_secs(2));
    let vmm = mappings(vm.pid(), "memfd:isola-fs-bounce");
    assert_eq!(vmm.len(), 1, "{vmm:?}");
    let (size, rss) = vmm[0];
    eprintln!(
        "bounce memory: {size} KiB mapped, {rss} KiB resident in the idle VMM; \
         virtiofsd maps {bounce:?} (size, rss KiB)"
    );
    assert!(rss <= 1024, "{rss} KiB of bounce memory resident at idle");
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

/// How much later than the deadline the VMM may end (the emulated host is
/// slow: starting, tearing down, the stderr reader).
const DEADLINE_MARGIN: Duration = Duration::from_secs(15);

/// The VMM's `isola-vmm: error:` line, once its stderr reader has it.
fn error_line(vm: &IsolaVm) -> String {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let log = vm.log();
        if let Some(l) = log.iter().find(|l| l.starts_with("isola-vmm: error:")) {
            return l.clone();
        }
        assert!(Instant::now() < until, "no error line:\n{}", log.join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The error a silent back end ends the VMM with: the tag, the request,
/// the deadline.
fn assert_no_answer_error(vm: &IsolaVm, request: &str) {
    let error = error_line(vm);
    assert!(error.contains(&format!("virtio-fs tag={TAG}")), "{error}");
    let secs = REPLY_DEADLINE.as_secs_f64();
    assert!(
        error.contains(&format!(
            "did not answer vhost-user {request} within {secs} s"
        )),
        "{error}"
    );
}

/// The system call the VMM's main thread (the event loop) is in, from
/// /proc/PID/syscall (its first field; `running` if on a CPU).
fn main_thread_syscall(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn sigterm(vm: &IsolaVm) {
    // SAFETY: kill(2) on our child; no pointers.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
}

#[test]
fn a_stopped_virtiofsd_at_start_ends_the_vmm_at_the_deadline() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("virtiofs-stopped-start").unwrap();
    let started = Instant::now();
    // The socket accepts (the kernel completes the connection), nobody
    // answers the handshake.
    let (_fsd, mut vm, _shared) =
        boot_with(&scratch, "idle", |fsd| fsd.signal_group(libc::SIGSTOP));
    std::thread::sleep(Duration::from_secs(1));
    // Held (blocked, as at every start) until the start fails: no effect
    // but that it must not make anything wait longer.
    sigterm(&vm);
    let (status, _) = vm
        .wait_exit_timed(REPLY_DEADLINE + DEADLINE_MARGIN)
        .unwrap_or_else(|e| panic!("{e:#}\nVMM log:\n{}", vm.log().join("\n")));
    let took = started.elapsed();
    eprintln!("isola-vmm exited {took:?} after it started, virtiofsd stopped: {status}");
    assert_eq!(status.code(), Some(1), "{:#?}", vm.log());
    assert!(took >= REPLY_DEADLINE, "took {took:?}");
    // Without REPLY_ACK yet, SET_OWNER is not answered: GET_FEATURES is
    // the first request that waits.
    assert_no_answer_error(&vm, "GET_FEATURES");
}

#[test]
fn a_virtiofsd_stopped_before_activation_ends_the_vmm_at_the_deadline() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("virtiofs-stopped-activation").unwrap();
    let (fsd, mut vm, _shared) = boot(&scratch, "idle");
    // "VM built" comes after the handshake, seconds before the guest's
    // driver probes the device (the kernel boots first).
    let until = Instant::now() + BOOT_DEADLINE;
    while !vm.log().iter().any(|l| l.contains("VM built")) {
        assert!(Instant::now() < until, "{:#?}", vm.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    fsd.signal_group(libc::SIGSTOP);
    // The driver's DRIVER_OK: the event loop sends SET_FEATURES and waits
    // in recvmsg (47) for the acknowledgement.
    let until = Instant::now() + BOOT_DEADLINE;
    loop {
        let call = main_thread_syscall(vm.pid());
        if call == "47" {
            break;
        }
        assert!(
            Instant::now() < until,
            "the event loop never waited on the back end (now in {call:?}):\n{}",
            vm.log().join("\n")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let blocked = Instant::now();
    sigterm(&vm);
    let (status, _) = vm
        .wait_exit_timed(REPLY_DEADLINE + DEADLINE_MARGIN)
        .unwrap_or_else(|e| panic!("{e:#}\nVMM log:\n{}", vm.log().join("\n")));
    let took = blocked.elapsed();
    eprintln!("isola-vmm exited {took:?} after SIGTERM, its event loop blocked: {status}");
    // The deadline ends the wait; the back end's failure is the VMM's
    // error (it comes first), SIGTERM or not.
    assert_eq!(status.code(), Some(1), "{:#?}", vm.log());
    assert!(took < REPLY_DEADLINE + DEADLINE_MARGIN, "took {took:?}");
    assert_no_answer_error(&vm, "SET_FEATURES");
}

#[test]
fn a_virtiofsd_stopped_under_guest_reads_leaves_the_vmm_responsive() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("virtiofs-stopped-reads").unwrap();
    let (fsd, mut vm, shared) = boot(&scratch, "readloop");
    check_read_and_write(&mut vm, &shared);
    guest_says(&mut vm, "looping");
    std::thread::sleep(Duration::from_millis(500));
    fsd.signal_group(libc::SIGSTOP);
    // Longer than the deadline: the guest's reads wait on virtiofsd, the
    // VMM on nothing (no vhost-user request is out).
    std::thread::sleep(REPLY_DEADLINE + Duration::from_secs(1));
    let asked = Instant::now();
    let info = vm.api(Request::Info).unwrap();
    let answered = asked.elapsed();
    eprintln!("API info answered in {answered:?} with virtiofsd stopped: {info}");
    assert!(answered < Duration::from_secs(5), "{answered:?}");
    let call = main_thread_syscall(vm.pid());
    assert_ne!(call, "47", "the event loop waits on the back end");
    let asked = Instant::now();
    sigterm(&vm);
    let (status, _) = vm.wait_exit_timed(Duration::from_secs(30)).unwrap();
    let took = asked.elapsed();
    eprintln!("isola-vmm exited {took:?} after SIGTERM, virtiofsd stopped: {status}");
    assert!(
        status.success(),
        "SIGTERM stops the VM: {status}\n{:#?}",
        vm.log()
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
