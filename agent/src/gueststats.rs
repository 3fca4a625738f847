//! `isola.agent.v1.Stats`: the guest's own memory, CPU time, uptime, load
//! and process counts, from /proc (`meminfo`, `stat`, `uptime`,
//! `loadavg`). Reads only; a file that is missing or a line that does not
//! parse reads as zeros.

use std::fs;
use std::io::Read;
use std::path::Path;

use isola_protocol::stats::{GuestCpu, GuestMemory, GuestStatsRequest, GuestStatsResponse};
use isola_protocol::ttrpc;
use isola_protocol::ttrpc::asynchronous::TtrpcContext;

/// Longest /proc file read (/proc/stat grows with CPUs and interrupts).
const MAX_FILE: u64 = 256 * 1024;
/// Most /proc entries looked at when counting processes.
const MAX_PROC_ENTRIES: usize = 1 << 20;
/// The kernel's USER_HZ, the unit of /proc/stat (100 on every Linux
/// architecture isola runs on).
const USER_HZ: u64 = 100;

/// The service; stateless.
#[derive(Debug, Default)]
pub struct StatsService;

#[async_trait::async_trait]
impl isola_protocol::Stats for StatsService {
    async fn guest_stats(
        &self,
        _ctx: &TtrpcContext,
        _req: GuestStatsRequest,
    ) -> ttrpc::Result<GuestStatsResponse> {
        // A few small reads of /proc, in memory, on this thread: the agent
        // must stay single-threaded (no blocking pool), since it forks
        // containers (`service::check_single_threaded`).
        Ok(collect(Path::new("/proc")))
    }
}

fn read(proc: &Path, name: &str) -> String {
    let mut text = String::new();
    if let Ok(file) = fs::File::open(proc.join(name)) {
        let _ = file.take(MAX_FILE).read_to_string(&mut text);
    }
    text
}

/// Everything `GuestStats` answers, from the proc file system at `proc`.
pub fn collect(proc: &Path) -> GuestStatsResponse {
    let mut resp = GuestStatsResponse::new();
    resp.memory = Some(parse_meminfo(&read(proc, "meminfo"))).into();
    let (cpu, forks) = parse_stat(&read(proc, "stat"));
    resp.cpu = Some(cpu).into();
    resp.forks = forks;
    resp.uptime_ms = parse_uptime_ms(&read(proc, "uptime")).unwrap_or(0);
    if let Some(load) = parse_loadavg(&read(proc, "loadavg")) {
        resp.load1_x100 = load.0;
        resp.load5_x100 = load.1;
        resp.load15_x100 = load.2;
        resp.threads_running = load.3;
        resp.threads = load.4;
    }
    resp.processes = count_processes(proc);
    resp
}

/// /proc/meminfo's fields this API has, `Key:  N kB` lines, in bytes.
pub fn parse_meminfo(text: &str) -> GuestMemory {
    let mut m = GuestMemory::new();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(Ok(n)) = words.next().map(str::parse::<u64>) else {
            continue;
        };
        let bytes = match words.next() {
            Some("kB") => n.saturating_mul(1024),
            None => n,
            Some(_) => continue,
        };
        let field = match key {
            "MemTotal" => &mut m.total_bytes,
            "MemFree" => &mut m.free_bytes,
            "MemAvailable" => &mut m.available_bytes,
            "Buffers" => &mut m.buffers_bytes,
            "Cached" => &mut m.cached_bytes,
            "Shmem" => &mut m.shmem_bytes,
            "AnonPages" => &mut m.anon_bytes,
            "Slab" => &mut m.slab_bytes,
            _ => continue,
        };
        *field = bytes;
    }
    m
}

/// /proc/stat: the summed `cpu` line in µs, the number of `cpuN` lines,
/// and `processes` (forks since boot).
pub fn parse_stat(text: &str) -> (GuestCpu, u64) {
    let mut cpu = GuestCpu::new();
    let mut forks = 0;
    let usec = |ticks: u64| ticks.saturating_mul(1_000_000 / USER_HZ);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("cpu") => {
                let v: Vec<u64> = words.take(8).map(|w| w.parse().unwrap_or(0)).collect();
                let at = |i: usize| usec(v.get(i).copied().unwrap_or(0));
                cpu.user_usec = at(0);
                cpu.nice_usec = at(1);
                cpu.system_usec = at(2);
                cpu.idle_usec = at(3);
                cpu.iowait_usec = at(4);
                cpu.irq_usec = at(5);
                cpu.softirq_usec = at(6);
                cpu.steal_usec = at(7);
            }
            Some(name)
                if name.len() > 3
                    && name.starts_with("cpu")
                    && name[3..].bytes().all(|b| b.is_ascii_digit()) =>
            {
                cpu.online_cpus = cpu.online_cpus.saturating_add(1);
            }
            Some("processes") => {
                forks = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            }
            _ => {}
        }
    }
    (cpu, forks)
}

/// /proc/uptime's first field (`12345.67 ...`), in ms.
pub fn parse_uptime_ms(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, ""));
    let secs: u64 = secs.parse().ok()?;
    let frac = hundredths(frac)?;
    Some(
        secs.saturating_mul(1000)
            .saturating_add(u64::from(frac) * 10),
    )
}

/// The first two digits of a decimal fraction as hundredths ("5" is 50).
fn hundredths(frac: &str) -> Option<u32> {
    let digits: Vec<u32> = frac
        .chars()
        .take(2)
        .map(|c| c.to_digit(10))
        .collect::<Option<_>>()?;
    Some(digits.first().copied().unwrap_or(0) * 10 + digits.get(1).copied().unwrap_or(0))
}

/// A `0.52` load average as 52.
fn load_x100(word: &str) -> Option<u32> {
    let (int, frac) = word.split_once('.').unwrap_or((word, ""));
    let int: u32 = int.parse().ok()?;
    Some(int.saturating_mul(100).saturating_add(hundredths(frac)?))
}

/// /proc/loadavg: `0.52 0.58 0.59 2/301 12345`: the three averages (×100),
/// runnable and total threads.
pub fn parse_loadavg(text: &str) -> Option<(u32, u32, u32, u32, u32)> {
    let mut words = text.split_whitespace();
    let l1 = load_x100(words.next()?)?;
    let l5 = load_x100(words.next()?)?;
    let l15 = load_x100(words.next()?)?;
    let (running, total) = words.next()?.split_once('/')?;
    Some((l1, l5, l15, running.parse().ok()?, total.parse().ok()?))
}

/// The directories of `proc` named by a number.
fn count_processes(proc: &Path) -> u32 {
    let Ok(entries) = fs::read_dir(proc) else {
        return 0;
    };
    entries
        .take(MAX_PROC_ENTRIES)
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.as_encoded_bytes();
            !name.is_empty() && name.iter().all(u8::is_ascii_digit)
        })
        .count()
        .try_into()
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:         498048 kB\nMemFree:          401232 kB\n\
        MemAvailable:     440000 kB\nBuffers:               0 kB\nCached:            40960 kB\n\
        SwapCached:            0 kB\nAnonPages:          8192 kB\nShmem:              1024 kB\n\
        Slab:               6000 kB\nHugePages_Total:       0\nbroken line\nMemFree: lots kB\n";

    #[test]
    fn meminfo_sample_in_bytes() {
        let m = parse_meminfo(MEMINFO);
        assert_eq!(m.total_bytes, 498048 * 1024);
        assert_eq!(
            m.free_bytes,
            401232 * 1024,
            "a garbled later line is skipped"
        );
        assert_eq!(m.available_bytes, 440000 * 1024);
        assert_eq!(m.cached_bytes, 40960 * 1024);
        assert_eq!(m.anon_bytes, 8192 * 1024);
        assert_eq!(m.shmem_bytes, 1024 * 1024);
        assert_eq!(m.slab_bytes, 6000 * 1024);
        assert_eq!(
            parse_meminfo("MemTotal: 18446744073709551615 kB\n").total_bytes,
            u64::MAX
        );
        assert_eq!(parse_meminfo("").total_bytes, 0);
    }

    #[test]
    fn stat_sample_in_microseconds() {
        let text = "cpu  120 3 450 98000 12 0 7 1 0 0\ncpu0 60 1 200 49000 6 0 3 0 0 0\n\
                    cpu1 60 2 250 49000 6 0 4 1 0 0\ncpufreq 1\nintr 1234 0 0\nctxt 5555\n\
                    btime 1700000000\nprocesses 321\nprocs_running 1\n";
        let (cpu, forks) = parse_stat(text);
        assert_eq!(cpu.user_usec, 1_200_000);
        assert_eq!(cpu.nice_usec, 30_000);
        assert_eq!(cpu.system_usec, 4_500_000);
        assert_eq!(cpu.idle_usec, 980_000_000);
        assert_eq!(cpu.softirq_usec, 70_000);
        assert_eq!(cpu.steal_usec, 10_000);
        assert_eq!(cpu.online_cpus, 2, "cpufreq is not a CPU");
        assert_eq!(forks, 321);
        // A short or garbled cpu line reads as zeros where it is wrong.
        let (cpu, forks) = parse_stat("cpu 5 x\n");
        assert_eq!(
            (cpu.user_usec, cpu.nice_usec, cpu.idle_usec, forks),
            (50_000, 0, 0, 0)
        );
    }

    #[test]
    fn uptime_and_loadavg() {
        assert_eq!(parse_uptime_ms("12345.67 2400.10\n"), Some(12_345_670));
        assert_eq!(parse_uptime_ms("3.5 1.0\n"), Some(3_500));
        assert_eq!(parse_uptime_ms("7\n"), Some(7_000));
        assert_eq!(parse_uptime_ms("x.5"), None);
        assert_eq!(parse_uptime_ms(""), None);
        assert_eq!(
            parse_loadavg("0.52 1.05 12.00 2/301 12345\n"),
            Some((52, 105, 1200, 2, 301))
        );
        assert_eq!(parse_loadavg("0.52 1.05\n"), None);
        assert_eq!(parse_loadavg("a b c 1/2 3"), None);
    }

    #[test]
    fn collects_from_a_fake_proc() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = |name: &str, text: &str| fs::write(dir.path().join(name), text).expect("write");
        w("meminfo", MEMINFO);
        w(
            "stat",
            "cpu 1 0 2 3 0 0 0 0\ncpu0 1 0 2 3 0 0 0 0\nprocesses 9\n",
        );
        w("uptime", "42.00 40.00\n");
        w("loadavg", "0.00 0.01 0.05 1/20 99\n");
        for pid in ["1", "35", "self-not", "net"] {
            fs::create_dir(dir.path().join(pid)).expect("mkdir");
        }
        let s = collect(dir.path());
        assert_eq!(s.memory.total_bytes, 498048 * 1024);
        assert_eq!(s.cpu.system_usec, 20_000);
        assert_eq!(s.cpu.online_cpus, 1);
        assert_eq!(s.uptime_ms, 42_000);
        assert_eq!((s.load15_x100, s.threads_running, s.threads), (5, 1, 20));
        assert_eq!(s.processes, 2);
        assert_eq!(s.forks, 9);
        // Nothing there: zeros, no error.
        let empty = tempfile::tempdir().expect("tempdir");
        assert_eq!(collect(empty.path()).uptime_ms, 0);
    }
}
