//! What the kernel says about a VMM process: CPU time, memory overhead.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// RSS of the process minus the RSS of its guest RAM mapping, in KiB.
pub fn overhead_kib(pid: u32, guest_bytes: u64) -> Result<u64> {
    let (total, guest) = rss_kib(pid, guest_bytes)?;
    Ok(total - guest)
}

/// The process's RSS and the RSS of its guest RAM mapping (the mapping
/// whose size is the guest memory size, up to 4 MiB of alignment more), in
/// KiB; their difference is the VMM's memory overhead.
pub fn rss_kib(pid: u32, guest_bytes: u64) -> Result<(u64, u64)> {
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
    Ok((total, guest))
}

/// User plus system CPU time of process `pid` so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    cpu_time_of(Path::new(&format!("/proc/{pid}/stat")))
}

/// The CPUs' worth process `pid` used over `window` (1.0 = one CPU busy).
pub fn cpu_use(pid: u32, window: Duration) -> Result<f64> {
    let (t0, c0) = (Instant::now(), cpu_time(pid)?);
    std::thread::sleep(window);
    let (t1, c1) = (Instant::now(), cpu_time(pid)?);
    Ok((c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64())
}

/// Where a process's CPU went over a window, in CPUs (1.0 = one CPU busy).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSplit {
    /// The whole process (threads that ended during the window included).
    pub total: f64,
    /// Threads named `vcpu*`.
    pub vcpus: f64,
    /// The main thread (for isola-vmm: the event loop).
    pub main: f64,
}

impl CpuSplit {
    /// Everything but the vCPU threads: what the VMM itself costs.
    pub fn overhead(&self) -> f64 {
        (self.total - self.vcpus).max(0.0)
    }
}

impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} CPUs (vCPU threads {:.2}, main thread {:.2}, other threads {:.2})",
            self.total,
            self.vcpus,
            self.main,
            (self.total - self.vcpus - self.main).max(0.0)
        )
    }
}

/// User plus system CPU time of every live thread of `pid`: (name, tid,
/// time).
fn thread_times(pid: u32) -> Result<Vec<(String, u32, Duration)>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("reading /proc/{pid}/task"))?
    {
        let Ok(task) = task else { continue };
        let Some(tid) = task.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread may end between the listing and these reads.
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        let Ok(time) = cpu_time_of(&task.path().join("stat")) else {
            continue;
        };
        out.push((comm.trim().to_string(), tid, time));
    }
    Ok(out)
}

/// User plus system CPU time in a `stat` file (a process's or a thread's).
fn cpu_time_of(stat_path: &Path) -> Result<Duration> {
    let stat = std::fs::read_to_string(stat_path)
        .with_context(|| format!("reading {}", stat_path.display()))?;
    // Fields after the command (which may hold spaces) start at "state";
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ") ".
    let rest = stat.rsplit(") ").next().context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("malformed stat")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 1000 / hz))
}

/// Like [`cpu_use`], split between the vCPU threads, the main thread and
/// the rest.
pub fn cpu_split(pid: u32, window: Duration) -> Result<CpuSplit> {
    let (t0, c0, th0) = (Instant::now(), cpu_time(pid)?, thread_times(pid)?);
    std::thread::sleep(window);
    let (t1, c1, th1) = (Instant::now(), cpu_time(pid)?, thread_times(pid)?);
    let secs = (t1 - t0).as_secs_f64();
    let mut split = CpuSplit {
        total: c1.saturating_sub(c0).as_secs_f64() / secs,
        ..CpuSplit::default()
    };
    for (name, tid, after) in &th1 {
        let before = th0
            .iter()
            .find(|(_, t, _)| t == tid)
            .map_or(Duration::ZERO, |(_, _, d)| *d);
        let used = after.saturating_sub(before).as_secs_f64() / secs;
        if name.starts_with("vcpu") {
            split.vcpus += used;
        } else if *tid == pid {
            split.main += used;
        }
    }
    Ok(split)
}
