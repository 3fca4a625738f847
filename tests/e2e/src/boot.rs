//! One boot of isola-vmm to agent ready, measured: what `make bench`'s
//! programs compare (`bench`: against QEMU microvm; `bench-kernel`: one
//! guest kernel against another).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::agent;
use crate::isola::{vmm_binary, TEST_CMDLINE};
use crate::procstat::rss_kib;
use crate::{GuestImages, Scratch, BOOT_DEADLINE};

/// The benchmarks' VM: 1 vCPU, 256 MiB, console off.
pub const MEMORY_MIB: u64 = 256;
pub const VCPUS: u32 = 1;

#[derive(Debug)]
pub struct Sample {
    /// From spawning the VMM to the agent's first answered Health.Check.
    pub boot: Duration,
    /// isola-vmm's own record of the agent's first answer (ms since exec).
    pub vmm_agent_ready_ms: Option<u64>,
    /// The VMM process's RSS minus its guest RAM's.
    pub overhead_kib: u64,
    /// The guest RAM the boot touched (RSS of the guest RAM mapping).
    pub guest_rss_kib: u64,
    /// isola-vmm's user+system CPU from exec to its first KVM_RUN.
    pub startup_cpu_us: Option<u64>,
}

/// Kills the child on drop.
struct Reap(Child);
impl Drop for Reap {
    fn drop(&mut self) {
        crate::kill_and_reap(&mut self.0);
    }
}

/// Boots `images` in isola-vmm (console off) to the agent's first answer.
pub async fn isola_once(images: &GuestImages) -> Result<Sample> {
    let scratch = Scratch::new("bench-isola")?;
    let vsock = scratch.path.join("vsock.sock");
    let api = scratch.path.join("api.sock");
    let start = Instant::now();
    let child = Command::new(vmm_binary()?)
        .arg("--kernel")
        .arg(&images.kernel)
        .arg("--initrd")
        .arg(&images.initrd)
        .args(["--cmdline", TEST_CMDLINE, "--console", "off"])
        .args([
            "--memory",
            &MEMORY_MIB.to_string(),
            "--vcpus",
            &VCPUS.to_string(),
        ])
        .arg("--vsock")
        .arg(&vsock)
        .arg("--api-socket")
        .arg(&api)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting isola-vmm")?;
    let child = Reap(child);
    agent::poll_serving_hybrid(&vsock, BOOT_DEADLINE).await?;
    let boot = start.elapsed();
    let (total, guest_rss_kib) = rss_kib(child.0.id(), MEMORY_MIB << 20)?;
    let info = isola_vmm::api::call(
        &api,
        &isola_vmm::api::Request::Info,
        Duration::from_secs(30),
    )
    .context("isola-vmm info")?;
    Ok(Sample {
        boot,
        overhead_kib: total - guest_rss_kib,
        guest_rss_kib,
        startup_cpu_us: info["startup_cpu_us"].as_u64(),
        vmm_agent_ready_ms: info["boot_time_ms"]["agent_ready"].as_u64(),
    })
}
