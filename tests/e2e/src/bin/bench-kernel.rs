//! bench-kernel: this build's guest kernel (`build/vmlinux`) against another
//! (`--against PATH`, e.g. the cached build of an earlier `isola.config`),
//! both booted by isola-vmm side by side in one run on the same KVM host,
//! same initrd, 1 vCPU, 256 MiB, console off: what a config change costs.
//!
//! For each kernel, alternating, `--runs` times (medians reported): boot to
//! agent ready, and the guest RAM the boot touched (RSS of the guest RAM
//! mapping once the agent answered). The kernels' file sizes beside them.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use isola_e2e::agent;
use isola_e2e::boot::{isola_once, MEMORY_MIB, VCPUS};
use isola_e2e::{median, parse_runs, require_kvm_host, GuestImages};

fn main() {
    if let Err(err) = run() {
        eprintln!("bench-kernel: error: {err:#}");
        std::process::exit(1);
    }
}

fn args() -> Result<(usize, PathBuf)> {
    let usage = "usage: bench-kernel [--runs N] --against VMLINUX";
    let mut runs = 5usize;
    let mut against = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = parse_runs(args.next(), 50)?,
            "--against" => {
                against =
                    Some(PathBuf::from(args.next().with_context(|| {
                        format!("--against needs a path ({usage})")
                    })?))
            }
            other => bail!("unknown argument {other:?} ({usage})"),
        }
    }
    let against = against.with_context(|| format!("no --against kernel ({usage})"))?;
    if !against.is_file() {
        bail!("--against {}: no such file", against.display());
    }
    Ok((runs, against))
}

fn run() -> Result<()> {
    let (runs, against) = args()?;
    let host = require_kvm_host()?;
    let this = GuestImages::from_build_dir()?;
    let other = GuestImages {
        kernel: against,
        initrd: this.initrd.clone(),
    };
    let size = |k: &PathBuf| -> Result<f64> {
        Ok(std::fs::metadata(k)
            .with_context(|| format!("{}", k.display()))?
            .len() as f64
            / (1 << 20) as f64)
    };
    let (this_size, other_size) = (size(&this.kernel)?, size(&other.kernel)?);
    let rt = agent::runtime()?;
    println!(
        "bench-kernel: {runs} runs each, alternating; {VCPUS} vCPU, {MEMORY_MIB} MiB, console off, {host} KVM host"
    );
    println!("this:    {} ({this_size:.2} MiB)", this.kernel.display());
    println!("against: {} ({other_size:.2} MiB)", other.kernel.display());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        for (name, images, into) in [("this", &this, &mut a), ("against", &other, &mut b)] {
            let s = rt.block_on(isola_once(images))?;
            println!(
                "run {i}: {name:<7} boot {:>6} ms  guest RAM touched {:>6.1} MiB",
                s.boot.as_millis(),
                s.guest_rss_kib as f64 / 1024.0
            );
            into.push(s);
        }
    }
    let boot = |v: &[isola_e2e::boot::Sample]| {
        median(v.iter().map(|s| s.boot.as_secs_f64() * 1000.0).collect())
    };
    let touched = |v: &[isola_e2e::boot::Sample]| {
        median(v.iter().map(|s| s.guest_rss_kib as f64 / 1024.0).collect())
    };
    let (ab, bb, at, bt) = (boot(&a), boot(&b), touched(&a), touched(&b));
    println!();
    println!(
        "| {:<29} | {:>9} | {:>9} |",
        format!("median of {runs}"),
        "this",
        "against"
    );
    println!("|-------------------------------|-----------|-----------|");
    println!("| vmlinux (MiB)                 | {this_size:>9.2} | {other_size:>9.2} |");
    println!("| boot to agent ready (ms)      | {ab:>9.0} | {bb:>9.0} |");
    println!("| guest RAM touched (MiB)       | {at:>9.1} | {bt:>9.1} |");
    println!("boot ratio this/against = {:.2}", ab / bb);
    Ok(())
}
