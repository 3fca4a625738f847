//! What the kernel says about a VMM process: CPU time, memory overhead.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// RSS of the process minus the RSS of its guest RAM mapping (the mapping
/// whose size is the guest memory size, up to 4 MiB of alignment more).
pub fn overhead_kib(pid: u32, guest_bytes: u64) -> Result<u64> {
    let smaps = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let mut total = 0u64;
    let mut guest = 0u64;
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let size = b.saturating_sub(a);
                in_guest = size >= guest_bytes && size <= guest_bytes + (4 << 20);
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    if guest == 0 {
        bail!(
            "no guest RAM mapping of {} MiB found in /proc/{pid}/smaps",
            guest_bytes >> 20
        );
    }
    Ok(total - guest)
}

/// User plus system CPU time of process `pid` so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start at "state".
    let rest = stat.rsplit(") ").next().context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ") ".
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("malformed stat")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_millis(total * 1000 / hz))
}

/// The CPUs' worth process `pid` used over `window` (1.0 = one CPU busy).
pub fn cpu_use(pid: u32, window: Duration) -> Result<f64> {
    let (t0, c0) = (Instant::now(), cpu_time(pid)?);
    std::thread::sleep(window);
    let (t1, c1) = (Instant::now(), cpu_time(pid)?);
    Ok((c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64())
}
