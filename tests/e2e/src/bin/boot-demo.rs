//! boot-demo: boots isola's guest (build/vmlinux + build/initrd.img) under
//! QEMU microvm, waits for `isola-agent ready`, powers it off, and prints
//! the time from QEMU's start to ready. Run it on a KVM host:
//! `make boot-demo` (or `make boot-demo RUNS=5` for a median).

use anyhow::{bail, Context, Result};
use isola_e2e::qemu::{QemuConfig, QemuVm};
use isola_e2e::{require_kvm_host, GuestImages, Scratch, BOOT_DEADLINE, READY, SHUTDOWN_DEADLINE};

fn main() {
    if let Err(err) = run() {
        eprintln!("boot-demo: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut runs = 1usize;
    let mut initrd = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => {
                let v = args.next().context("--runs needs a number")?;
                runs = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .with_context(|| format!("--runs: {v:?} is not a number from 1 to 100"))?;
            }
            "--initrd" => initrd = Some(args.next().context("--initrd needs a path")?),
            "-h" | "--help" => {
                println!("usage: boot-demo [--runs N] [--initrd PATH]");
                return Ok(());
            }
            other => {
                bail!("unknown argument {other:?} (usage: boot-demo [--runs N] [--initrd PATH])")
            }
        }
    }
    let host = require_kvm_host()?;
    let mut images = GuestImages::from_build_dir()?;
    if let Some(path) = initrd {
        images.initrd = std::fs::canonicalize(&path).with_context(|| format!("--initrd {path}"))?;
    }
    let mut config = QemuConfig::new(images);
    config.echo = false;
    config.extra_cmdline = "quiet".into();

    let mut times = Vec::with_capacity(runs);
    for i in 1..=runs {
        let scratch = Scratch::new("demo")?;
        let mut vm = QemuVm::start(&config, &scratch.path)?;
        let line = vm.console.wait_for(READY, BOOT_DEADLINE)?;
        let elapsed = vm.started.elapsed();
        vm.request_power_off()?;
        let status = vm.wait_exit(SHUTDOWN_DEADLINE)?;
        if !status.success() {
            bail!("QEMU exited with {status} after the power-off request");
        }
        println!("boot {i}/{runs}: {} ms to `{line}`", elapsed.as_millis());
        times.push(elapsed);
    }
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "time to isola-agent ready: {} ms (median of {runs}, QEMU microvm, 1 vCPU, {} MiB, {host} KVM host)",
        median.as_millis(),
        config.memory_mib
    );
    if host == "emulated" {
        println!(
            "(the emulated KVM host is 10-20x slower than a real one: compare ratios, not times)"
        );
    }
    Ok(())
}
