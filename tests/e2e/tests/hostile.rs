//! isola-vmm against a hostile guest (issue 7's findings, reproduced).
//!
//! The guest's init is `isola-hostile` (tests/hostile, built into
//! `build/hostile-initrd.img`, never the product initrd). It attacks on
//! command, over a vsock control stream, so one VM serves several attacks
//! and the test measures the VMM between them. For each attack: the VMM
//! answers the API within a second, uses a bounded share of CPU, keeps its
//! log, console and memory bounded, and a well-behaved host connection
//! still works; at the end SIGTERM stops it within a second.

#![allow(clippy::unwrap_used)] // a test: a panic is its failure report

use std::path::Path;
use std::time::{Duration, Instant};

use isola_e2e::isola::{IsolaConfig, IsolaVm};
use isola_e2e::procstat::{cpu_use, overhead_kib};
use isola_e2e::{project_dir, require_kvm_host, GuestImages, Scratch, BOOT_DEADLINE};
use isola_vmm::api::Request;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const CONTROL_PORT: u32 = 5000;
const MEMORY_MIB: u32 = 256;
/// How long each CPU measurement lasts.
const WINDOW: Duration = Duration::from_secs(5);
/// A generous deadline for one attack to run in the emulated host.
const ATTACK_DEADLINE: Duration = Duration::from_secs(180);

fn images() -> GuestImages {
    let initrd = project_dir().join("build/hostile-initrd.img");
    assert!(
        initrd.exists(),
        "{} is missing: run `make hostile-initrd`",
        initrd.display()
    );
    GuestImages {
        initrd,
        ..GuestImages::from_build_dir().unwrap()
    }
}

fn config() -> IsolaConfig {
    let mut c = IsolaConfig::new(images());
    c.extra_cmdline = "quiet".into();
    c.memory_mib = MEMORY_MIB;
    c
}

/// The guest's control stream.
struct Control {
    lines: BufReader<UnixStream>,
}

impl Control {
    async fn dial(socket: &Path) -> Control {
        let until = Instant::now() + BOOT_DEADLINE;
        loop {
            match isola_protocol::hybrid::connect(socket, CONTROL_PORT, Duration::from_secs(10))
                .await
            {
                Ok(stream) => {
                    return Control {
                        lines: BufReader::new(stream),
                    }
                }
                Err(e) if Instant::now() < until => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("control stream: {e}"),
            }
        }
    }

    /// Runs one attack; returns the guest's `done ...` line.
    async fn attack(&mut self, command: &str) -> String {
        self.lines
            .get_mut()
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        tokio::time::timeout(ATTACK_DEADLINE, self.lines.read_line(&mut line))
            .await
            .unwrap_or_else(|_| panic!("{command}: no answer within {ATTACK_DEADLINE:?}"))
            .unwrap();
        assert!(line.starts_with("done "), "{command}: {line}");
        eprintln!("guest: {}", line.trim_end());
        line
    }
}

/// The API answers `info` within a second; returns the reply.
fn info_within_a_second(vm: &IsolaVm, after: &str) -> serde_json::Value {
    let started = Instant::now();
    let reply =
        isola_vmm::api::call(&vm.api_socket, &Request::Info, Duration::from_secs(5)).unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "after {after}: the API took {took:?} to answer info (bound 1 s)"
    );
    assert_eq!(reply["ok"], true, "{reply}");
    reply
}

fn assert_cpu_below(vm: &IsolaVm, after: &str, bound: f64) -> f64 {
    let used = cpu_use(vm.pid(), WINDOW).unwrap();
    eprintln!("after {after}: the VMM used {used:.2} CPUs over {WINDOW:?}");
    assert!(
        used <= bound,
        "after {after}: the VMM used {used:.2} CPUs over {WINDOW:?} (bound {bound})"
    );
    used
}

fn assert_overhead_below(vm: &IsolaVm, after: &str, mib: u64) {
    let kib = overhead_kib(vm.pid(), u64::from(MEMORY_MIB) << 20).unwrap();
    eprintln!("after {after}: VMM overhead {} KiB", kib);
    assert!(
        kib <= mib << 10,
        "after {after}: VMM memory overhead {kib} KiB (bound {mib} MiB)"
    );
}

fn sigterm_stops_within_a_second(vm: &mut IsolaVm) {
    let started = Instant::now();
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) }, 0);
    let status = vm.wait_exit(Duration::from_secs(30)).unwrap();
    let took = started.elapsed();
    assert!(status.success(), "isola-vmm exited with {status}");
    assert!(
        took < Duration::from_secs(1),
        "SIGTERM took {took:?} to stop the VMM (bound 1 s)"
    );
}

#[test]
fn device_registers_vsock_floods_and_the_console_stay_bounded() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("hostile").unwrap();
    let console = scratch.path.join("console.log");
    // The guest's UART driver paces a flood to a few KiB a second in the
    // emulated host: a small cap is what the flood can exceed there.
    let limit = 4 << 10;
    let mut c = config();
    c.console_file = Some((console.clone(), limit));
    let mut vm = IsolaVm::start(&c, &scratch.path).unwrap();
    let socket = vm.vsock_socket.clone().unwrap();
    let rt = isola_e2e::agent::runtime().unwrap();
    let mut control = rt.block_on(Control::dial(&socket));
    eprintln!("control stream up after {:?}", vm.started.elapsed());
    // A quiet guest is the baseline.
    assert_cpu_below(&vm, "boot", 0.5);

    // 1. virtio-rng reset, then notified: it spun a host CPU at 100%.
    rt.block_on(control.attack("rng-reset"));
    info_within_a_second(&vm, "rng reset");
    assert_cpu_below(&vm, "rng reset + notify", 0.3);

    // 2. 300 rounds of bad queue sizes and addresses: 602 log lines before.
    let lines_before = vm.log().len();
    rt.block_on(control.attack("bad-queue 300"));
    info_within_a_second(&vm, "bad queue config");
    let logged = vm.log().len() - lines_before;
    eprintln!("bad queue config: {logged} log lines");
    assert!(
        logged <= 60,
        "300 rounds of bad queue config put {logged} lines in the VMM's log (bound 60)"
    );
    let metrics = &info_within_a_second(&vm, "bad queue config")["metrics"];
    assert!(
        metrics["mmio_refused_writes"].as_u64().unwrap() >= 300,
        "{metrics}"
    );

    // 3. vsock: connections to nobody, connect/close churn against a host
    //    listener that never accepts, and a guest that never reads.
    let churn_port = 6000;
    let _listener =
        std::os::unix::net::UnixListener::bind(format!("{}_{churn_port}", socket.display()))
            .unwrap();
    rt.block_on(control.attack("connect-flood 2000"));
    rt.block_on(control.attack(&format!("churn {churn_port} 2000")));
    rt.block_on(control.attack("sink 5001"));
    rt.block_on(control.attack("echo 5002"));
    let sinks: Vec<UnixStream> = rt.block_on(async {
        let mut sinks = Vec::new();
        for _ in 0..16 {
            let mut s = isola_protocol::hybrid::connect(&socket, 5001, Duration::from_secs(30))
                .await
                .unwrap();
            // Fill what the guest's credit and the sockets take.
            let chunk = vec![0x5au8; 64 << 10];
            for _ in 0..8 {
                if tokio::time::timeout(Duration::from_millis(200), s.write_all(&chunk))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            sinks.push(s);
        }
        sinks
    });
    info_within_a_second(&vm, "vsock abuse");
    assert_cpu_below(&vm, "vsock abuse", 0.5);
    assert_overhead_below(&vm, "vsock abuse", 64);
    // A well-behaved host connection still works.
    rt.block_on(async {
        let mut s = isola_protocol::hybrid::connect(&socket, 5002, Duration::from_secs(30))
            .await
            .unwrap();
        let msg = b"still here after the flood";
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, msg);
    });
    drop(sinks);

    // 4. Serial flood into a capped console file.
    let pid = vm.pid();
    let flood = std::thread::scope(|scope| {
        let sampler = scope.spawn(move || cpu_use(pid, WINDOW).unwrap());
        let done = rt.block_on(control.attack("serial-flood 8"));
        (sampler.join().unwrap(), done)
    });
    eprintln!("during the serial flood the VMM used {:.2} CPUs", flood.0);
    assert!(
        flood.0 <= 1.5,
        "during the serial flood the VMM used {:.2} CPUs (bound: 1 vCPU + 0.5)",
        flood.0
    );
    let metrics = info_within_a_second(&vm, "serial flood")["metrics"].clone();
    let size = std::fs::metadata(&console).unwrap().len();
    eprintln!("console file {size} bytes, metrics {metrics}");
    assert!(size <= limit, "console file {size} bytes (limit {limit})");
    assert!(
        metrics["console_dropped_bytes"].as_u64().unwrap() > 0,
        "the flood exceeded the limit, yet nothing was dropped: {metrics}"
    );
    assert_overhead_below(&vm, "serial flood", 64);

    sigterm_stops_within_a_second(&mut vm);
}

#[test]
fn a_console_nobody_reads_never_blocks_pause_or_stop() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("hostile-unread").unwrap();
    let mut c = config();
    c.unread_console = true;
    let mut vm = IsolaVm::start(&c, &scratch.path).unwrap();
    let socket = vm.vsock_socket.clone().unwrap();
    let rt = isola_e2e::agent::runtime().unwrap();
    let mut control = rt.block_on(Control::dial(&socket));
    // More than the pipe holds (the harness shrinks it to 4 KiB), with
    // nobody reading it: before, the vCPU blocked in the console write
    // while holding the UART, and pause and stop timed out.
    rt.block_on(control.attack("serial-flood 8"));
    for request in [Request::Pause, Request::Resume, Request::Pause] {
        let started = Instant::now();
        let reply =
            isola_vmm::api::call(&vm.api_socket, &request, Duration::from_secs(30)).unwrap();
        let took = started.elapsed();
        assert_eq!(reply["ok"], true, "{request:?}: {reply}");
        assert!(
            took < Duration::from_secs(5),
            "{request:?} took {took:?} with an unread console"
        );
    }
    let metrics = info_within_a_second(&vm, "unread console")["metrics"].clone();
    eprintln!("unread console: {metrics}");
    let started = Instant::now();
    let reply =
        isola_vmm::api::call(&vm.api_socket, &Request::Stop, Duration::from_secs(30)).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    let status = vm.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "isola-vmm exited with {status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stop took {:?} with an unread console",
        started.elapsed()
    );
}
