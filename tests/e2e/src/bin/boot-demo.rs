//! boot-demo: boots isola's guest (build/vmlinux + build/initrd.img) under
//! isola-vmm (or QEMU microvm with `--vmm qemu`), waits for
//! `isola-agent ready`, asks the agent Health.Check and Version over vsock
//! (isola-vmm only), powers the guest off, and prints the time from the
//! VMM's start to ready. Run it on a KVM host: `make boot-demo` (or
//! `make boot-demo RUNS=5` for a median).

use anyhow::{bail, Context, Result};
use isola_e2e::agent;
use isola_e2e::isola::{IsolaConfig, IsolaVm};
use isola_e2e::qemu::{QemuConfig, QemuVm};
use isola_e2e::{require_kvm_host, GuestImages, Scratch, BOOT_DEADLINE, READY, SHUTDOWN_DEADLINE};
use isola_vmm::api::Request;

const USAGE: &str = "usage: boot-demo [--runs N] [--vmm isola|qemu] [--initrd PATH]";

fn main() {
    if let Err(err) = run() {
        eprintln!("boot-demo: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut runs = 1usize;
    let mut initrd = None;
    let mut qemu = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = isola_e2e::parse_runs(args.next(), 100)?,
            "--vmm" => match args.next().as_deref() {
                Some("isola") => qemu = false,
                Some("qemu") => qemu = true,
                other => bail!("--vmm {other:?}: expected isola or qemu ({USAGE})"),
            },
            "--initrd" => initrd = Some(args.next().context("--initrd needs a path")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} ({USAGE})"),
        }
    }
    let host = require_kvm_host()?;
    let mut images = GuestImages::from_build_dir()?;
    if let Some(path) = initrd {
        images.initrd = std::fs::canonicalize(&path).with_context(|| format!("--initrd {path}"))?;
    }
    let vmm = if qemu { "QEMU microvm" } else { "isola-vmm" };
    let mut times = Vec::with_capacity(runs);
    for i in 1..=runs {
        let scratch = Scratch::new("demo")?;
        let (elapsed, line) = if qemu {
            boot_qemu(&images, &scratch)?
        } else {
            boot_isola(&images, &scratch)?
        };
        println!("boot {i}/{runs}: {} ms to `{line}`", elapsed.as_millis());
        times.push(elapsed);
    }
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "time to isola-agent ready: {} ms (median of {runs}, {vmm}, 1 vCPU, 256 MiB, {host} KVM host)",
        median.as_millis()
    );
    if host == "emulated" {
        println!(
            "(the emulated KVM host is 10-20x slower than a real one: compare ratios, not times)"
        );
    }
    Ok(())
}

fn boot_isola(images: &GuestImages, scratch: &Scratch) -> Result<(std::time::Duration, String)> {
    let mut config = IsolaConfig::new(images.clone());
    config.echo = false;
    config.extra_cmdline = "quiet".into();
    let mut vm = IsolaVm::start(&config, &scratch.path)?;
    let line = vm.console.wait_for(READY, BOOT_DEADLINE)?;
    let elapsed = vm.started.elapsed();
    let socket = vm.vsock_socket.clone().context("no vsock socket")?;
    let rt = agent::runtime()?;
    let version = rt.block_on(async {
        let health = agent::wait_serving_hybrid(&socket, BOOT_DEADLINE).await?;
        agent::version(&health).await
    })?;
    println!(
        "agent over hybrid vsock: Health.Check SERVING, version {} (API {})",
        version.agent_version, version.api_version
    );
    vm.api(Request::Shutdown { timeout_ms: None })?;
    let status = vm.wait_exit(SHUTDOWN_DEADLINE)?;
    if !status.success() {
        bail!("isola-vmm exited with {status} after the power-off request");
    }
    Ok((elapsed, line))
}

fn boot_qemu(images: &GuestImages, scratch: &Scratch) -> Result<(std::time::Duration, String)> {
    let mut config = QemuConfig::new(images.clone());
    config.echo = false;
    config.extra_cmdline = "quiet".into();
    let mut vm = QemuVm::start(&config, &scratch.path)?;
    let line = vm.console.wait_for(READY, BOOT_DEADLINE)?;
    let elapsed = vm.started.elapsed();
    vm.request_power_off()?;
    let status = vm.wait_exit(SHUTDOWN_DEADLINE)?;
    if !status.success() {
        bail!("QEMU exited with {status} after the power-off request");
    }
    Ok((elapsed, line))
}
