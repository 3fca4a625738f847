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
    let maps = mappings(pid)?;
    let total = maps.iter().map(|m| m.rss_kib).sum();
    let guest: u64 = maps
        .iter()
        .filter(|m| m.size_kib << 10 >= guest_bytes && m.size_kib << 10 <= guest_bytes + (4 << 20))
        .map(|m| m.rss_kib)
        .sum();
    if guest == 0 {
        bail!(
            "no guest RAM mapping of {} MiB found in /proc/{pid}/smaps",
            guest_bytes >> 20
        );
    }
    Ok((total, guest))
}

/// One mapping of a process, as `/proc/PID/smaps` describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    /// What is mapped: a file's path (memfds as `/memfd:NAME (deleted)`),
    /// `[heap]`, or empty for anonymous memory.
    pub name: String,
    pub size_kib: u64,
    pub rss_kib: u64,
    /// The `VmFlags` line's two-letter flags (`rd wr mr ...`).
    pub flags: String,
}

impl Mapping {
    /// Whether `VmFlags` has `flag` (`uw`: registered with a userfaultfd
    /// in write-protect mode).
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.split_whitespace().any(|f| f == flag)
    }
}

/// Every mapping of process `pid` (`/proc/PID/smaps`).
pub fn mappings(pid: u32) -> Result<Vec<Mapping>> {
    let smaps = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    Ok(parse_smaps(&smaps))
}

/// The mappings of an smaps text: each starts at a line `START-END PERMS
/// OFFSET DEV INODE [NAME]`, and its `Size:`, `Rss:` and `VmFlags:` lines
/// follow.
pub fn parse_smaps(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        let range = first.split_once('-').filter(|(a, b)| {
            u64::from_str_radix(a, 16).is_ok() && u64::from_str_radix(b, 16).is_ok()
        });
        if range.is_some() {
            // The name is what follows the fifth field, spaces and all.
            let name = line
                .splitn(6, char::is_whitespace)
                .nth(5)
                .unwrap_or_default()
                .trim()
                .to_string();
            out.push(Mapping {
                name,
                ..Mapping::default()
            });
            continue;
        }
        let Some(m) = out.last_mut() else { continue };
        let kib = || {
            words
                .clone()
                .next()
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match first {
            "Size:" => m.size_kib = kib(),
            "Rss:" => m.rss_kib = kib(),
            "VmFlags:" => m.flags = words.clone().collect::<Vec<_>>().join(" "),
            _ => {}
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f0000000000-7f0010000000 rw-p 00000000 00:1a 1234                       /run/isola/templates/k/memory
Size:             262144 kB
Rss:                5840 kB
VmFlags: rd wr mr mw me uw nr sd
7f0010000000-7f0010001000 rw-s 00000000 00:01 99                         /memfd:isola-fs-bounce (deleted)
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd wr sh mr mw me ms sd
7f0010001000-7f0010003000 rw-p 00000000 00:00 0 
Size:                  8 kB
Rss:                   0 kB
THPeligible:    0
VmFlags: rd wr mr mw me ac sd
";

    #[test]
    fn smaps_mappings_with_names_sizes_and_flags() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 3, "{maps:?}");
        assert_eq!(maps[0].name, "/run/isola/templates/k/memory");
        assert_eq!((maps[0].size_kib, maps[0].rss_kib), (262_144, 5840));
        assert!(maps[0].has_flag("uw") && !maps[1].has_flag("uw"));
        assert_eq!(maps[1].name, "/memfd:isola-fs-bounce (deleted)");
        assert_eq!((maps[1].size_kib, maps[1].rss_kib), (4, 4));
        assert_eq!(maps[2].name, "");
        assert_eq!(maps[2].flags, "rd wr mr mw me ac sd");
    }
}
