//! bench: isola-vmm against QEMU microvm, measured side by side in one run
//! on the same KVM host, same vmlinux, initrd, vCPUs and memory, console
//! off. Run it as `make bench`.
//!
//! For each VMM, alternating, `--runs` times (medians reported):
//! - boot to agent ready: from spawning the VMM to the agent's first
//!   answered Health.Check (isola-vmm: over its hybrid vsock socket; QEMU:
//!   over kernel vsock to a vhost-vsock device);
//! - VMM memory overhead: the process's RSS minus the RSS of its guest RAM
//!   mapping, once the agent answered;
//! - start-up CPU: isola-vmm's own report of user+system CPU from exec to
//!   its first KVM_RUN (QEMU does not report it).

use anyhow::Result;
use isola_e2e::agent;
use isola_e2e::boot::{isola_once, Sample, MEMORY_MIB, VCPUS};
use isola_e2e::procstat::rss_kib;
use isola_e2e::qemu::{QemuConfig, QemuVm};
use isola_e2e::report::{self, Row};
use isola_e2e::{median, require_kvm_host, GuestImages, Scratch, BOOT_DEADLINE};

fn main() {
    if let Err(err) = run() {
        eprintln!("bench: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let runs = isola_e2e::runs_from_args("bench")?;
    let host = require_kvm_host()?;
    let images = GuestImages::from_build_dir()?;
    let rt = agent::runtime()?;
    println!(
        "bench: {runs} runs each, alternating; {VCPUS} vCPU, {MEMORY_MIB} MiB, console off, {host} KVM host"
    );
    let mut isola = Vec::new();
    let mut qemu = Vec::new();
    for i in 1..=runs {
        let s = rt.block_on(isola_once(&images))?;
        println!(
            "run {i}: isola-vmm    boot {:>6} ms (VMM saw the agent answer at {} ms)  overhead {:>6.1} MiB  start-up CPU {:>6.1} ms",
            s.boot.as_millis(),
            s.vmm_agent_ready_ms.map_or("?".into(), |v| v.to_string()),
            s.overhead_kib as f64 / 1024.0,
            s.startup_cpu_us.unwrap_or(0) as f64 / 1000.0
        );
        isola.push(s);
        let s = rt.block_on(qemu_once(&images, 100 + i as u32))?;
        println!(
            "run {i}: qemu-microvm boot {:>6} ms  overhead {:>6.1} MiB",
            s.boot.as_millis(),
            s.overhead_kib as f64 / 1024.0
        );
        qemu.push(s);
    }
    let med_boot = |v: &[Sample]| median(v.iter().map(|s| s.boot.as_secs_f64() * 1000.0).collect());
    let med_over =
        |v: &[Sample]| median(v.iter().map(|s| s.overhead_kib as f64 / 1024.0).collect());
    let cpu = median(
        isola
            .iter()
            .map(|s| s.startup_cpu_us.unwrap_or(0) as f64 / 1000.0)
            .collect(),
    );
    let (ib, qb) = (med_boot(&isola), med_boot(&qemu));
    let (io, qo) = (med_over(&isola), med_over(&qemu));
    println!();
    println!("| median of {runs}                 | isola-vmm | qemu-microvm |");
    println!("|-------------------------------|-----------|--------------|");
    println!("| boot to agent ready (ms)      | {ib:>9.0} | {qb:>12.0} |");
    println!("| VMM memory overhead (MiB)     | {io:>9.1} | {qo:>12.1} |");
    println!(
        "| start-up CPU, exec to KVM_RUN | {cpu:>6.1} ms | {:>12} |",
        "n/a"
    );
    println!("goals: boot ratio <= 0.50, overhead <= 5 MiB, start-up <= 8 CPU ms (on a real host)");
    println!("boot ratio isola-vmm/qemu-microvm = {:.2}", ib / qb);
    let boots =
        |v: &[Sample]| -> Vec<f64> { v.iter().map(|s| s.boot.as_secs_f64() * 1000.0).collect() };
    let overheads =
        |v: &[Sample]| -> Vec<f64> { v.iter().map(|s| s.overhead_kib as f64 / 1024.0).collect() };
    let rows = [
        Row::new(
            "cold boot to agent ready",
            "ms",
            "isola-vmm",
            &boots(&isola),
        )
        .against("qemu microvm", &boots(&qemu))
        .goal("ratio <= 0.5"),
        Row::new(
            "VMM memory overhead",
            "MiB",
            "isola-vmm",
            &overheads(&isola),
        )
        .against("qemu microvm", &overheads(&qemu))
        .goal("<= 5 MiB"),
    ];
    println!("rows: {}", report::save("bench", &host, &rows)?.display());
    Ok(())
}

async fn qemu_once(images: &GuestImages, cid: u32) -> Result<Sample> {
    let scratch = Scratch::new("bench-qemu")?;
    let mut config = QemuConfig::new(images.clone());
    config.console = false;
    config.echo = false;
    config.vsock_cid = Some(cid);
    config.memory_mib = MEMORY_MIB as u32;
    config.vcpus = VCPUS;
    let vm = QemuVm::start(&config, &scratch.path)?;
    agent::wait_serving_vsock(cid, BOOT_DEADLINE).await?;
    let boot = vm.started.elapsed();
    let (total, guest_rss_kib) = rss_kib(vm.pid(), MEMORY_MIB << 20)?;
    Ok(Sample {
        boot,
        overhead_kib: total - guest_rss_kib,
        guest_rss_kib,
        startup_cpu_us: None,
        vmm_agent_ready_ms: None,
    })
}
