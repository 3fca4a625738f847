//! A container's cgroup v2 statistics, read from its cgroup directory:
//! `cpu.stat`, `memory.current`/`max`/`peak`/`events`/`stat`,
//! `pids.current`/`max` and `io.stat`. Files a kernel does not have (no
//! `memory.peak` before 5.19, a controller not enabled) read as zeros; a
//! line that does not parse is skipped.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use isola_protocol::agent::{
    CpuStats, IoDeviceStats, MemoryStats, PidsStats, StatsContainerResponse,
};

/// Most `memory.stat` keys kept (the kernel has about 50).
const MAX_MEMORY_STAT_KEYS: usize = 128;
/// Most `io.stat` devices kept.
const MAX_IO_DEVICES: usize = 64;
/// Longest file read (cgroup files are small; a bound all the same).
const MAX_FILE: u64 = 64 * 1024;

/// `key value` lines (`cpu.stat`, `memory.events`, `memory.stat`).
pub fn parse_flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let key = words.next()?;
            let value = words.next()?.parse::<u64>().ok()?;
            words.next().is_none().then(|| (key.to_string(), value))
        })
        .take(MAX_MEMORY_STAT_KEYS)
        .collect()
}

/// A single number, or `max` (no limit) as 0.
pub fn parse_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        Some(0)
    } else {
        text.parse().ok()
    }
}

/// `io.stat`: `MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N`.
pub fn parse_io_stat(text: &str) -> Vec<IoDeviceStats> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (major, minor) = words.next()?.split_once(':')?;
            let mut dev = IoDeviceStats::new();
            dev.major = major.parse().ok()?;
            dev.minor = minor.parse().ok()?;
            for word in words {
                let Some((key, value)) = word.split_once('=') else {
                    continue;
                };
                let Ok(value) = value.parse::<u64>() else {
                    continue;
                };
                match key {
                    "rbytes" => dev.rbytes = value,
                    "wbytes" => dev.wbytes = value,
                    "rios" => dev.rios = value,
                    "wios" => dev.wios = value,
                    _ => {}
                }
            }
            Some(dev)
        })
        .take(MAX_IO_DEVICES)
        .collect()
}

fn read(dir: &Path, name: &str) -> Option<String> {
    use std::io::Read;
    let file = fs::File::open(dir.join(name)).ok()?;
    let mut text = String::new();
    file.take(MAX_FILE).read_to_string(&mut text).ok()?;
    Some(text)
}

/// The `oom_kill` count of `memory.events` in `dir` (0 if unreadable).
pub fn oom_kills(dir: &Path) -> u64 {
    read(dir, "memory.events")
        .map(|t| parse_flat_keyed(&t).get("oom_kill").copied().unwrap_or(0))
        .unwrap_or(0)
}

/// Everything `StatsContainer` answers, from the cgroup directory `dir`.
pub fn collect(dir: &Path) -> StatsContainerResponse {
    let mut resp = StatsContainerResponse::new();

    let cpu_stat = read(dir, "cpu.stat")
        .map(|t| parse_flat_keyed(&t))
        .unwrap_or_default();
    let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let mut cpu = CpuStats::new();
    cpu.usage_usec = get(&cpu_stat, "usage_usec");
    cpu.user_usec = get(&cpu_stat, "user_usec");
    cpu.system_usec = get(&cpu_stat, "system_usec");
    cpu.nr_periods = get(&cpu_stat, "nr_periods");
    cpu.nr_throttled = get(&cpu_stat, "nr_throttled");
    cpu.throttled_usec = get(&cpu_stat, "throttled_usec");
    resp.cpu = Some(cpu).into();

    let mut memory = MemoryStats::new();
    let number = |name: &str| read(dir, name).and_then(|t| parse_limit(&t)).unwrap_or(0);
    memory.usage_bytes = number("memory.current");
    memory.limit_bytes = number("memory.max");
    memory.peak_bytes = number("memory.peak");
    let events = read(dir, "memory.events")
        .map(|t| parse_flat_keyed(&t))
        .unwrap_or_default();
    memory.oom_events = get(&events, "oom");
    memory.oom_kill_events = get(&events, "oom_kill");
    memory.max_events = get(&events, "max");
    memory.stat = read(dir, "memory.stat")
        .map(|t| parse_flat_keyed(&t).into_iter().collect())
        .unwrap_or_default();
    resp.memory = Some(memory).into();

    let mut pids = PidsStats::new();
    pids.current = number("pids.current");
    pids.limit = number("pids.max");
    resp.pids = Some(pids).into();

    resp.io = read(dir, "io.stat")
        .map(|t| parse_io_stat(&t))
        .unwrap_or_default();
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_stat_sample() {
        let text = "usage_usec 41250\nuser_usec 30000\nsystem_usec 11250\n\
                    core_sched.force_idle_usec 0\nnr_periods 12\nnr_throttled 3\n\
                    throttled_usec 7000\nnr_bursts 0\nburst_usec 0\n";
        let m = parse_flat_keyed(text);
        assert_eq!(m.get("usage_usec"), Some(&41250));
        assert_eq!(m.get("nr_throttled"), Some(&3));
        assert_eq!(m.get("throttled_usec"), Some(&7000));
        assert_eq!(m.len(), 9);
    }

    #[test]
    fn memory_events_sample_and_garbage() {
        let text = "low 0\nhigh 0\nmax 17\noom 2\noom_kill 1\noom_group_kill 0\n\
                    broken\nextra 1 2\nneg -1\n";
        let m = parse_flat_keyed(text);
        assert_eq!(m.get("max"), Some(&17));
        assert_eq!(m.get("oom"), Some(&2));
        assert_eq!(m.get("oom_kill"), Some(&1));
        assert!(!m.contains_key("broken") && !m.contains_key("extra") && !m.contains_key("neg"));
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit("max\n"), Some(0));
        assert_eq!(parse_limit("1048576\n"), Some(1048576));
        assert_eq!(parse_limit("lots"), None);
    }

    #[test]
    fn io_stat_sample() {
        let text = "254:0 rbytes=1052672 wbytes=4096 rios=37 wios=1 dbytes=0 dios=0\n\
                    8:16 rbytes=5 wbytes=6 rios=7 wios=8\n\
                    bad line\n";
        let devs = parse_io_stat(text);
        assert_eq!(devs.len(), 2);
        assert_eq!((devs[0].major, devs[0].minor), (254, 0));
        assert_eq!(
            (devs[0].rbytes, devs[0].wbytes, devs[0].rios, devs[0].wios),
            (1052672, 4096, 37, 1)
        );
        assert_eq!((devs[1].major, devs[1].minor, devs[1].wios), (8, 16, 8));
    }

    #[test]
    fn collects_from_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = |name: &str, text: &str| fs::write(dir.path().join(name), text).expect("write");
        w("cpu.stat", "usage_usec 10\nuser_usec 6\nsystem_usec 4\n");
        w("memory.current", "4096\n");
        w("memory.max", "max\n");
        w("memory.events", "oom 1\noom_kill 1\nmax 3\n");
        w("memory.stat", "anon 1024\nfile 2048\n");
        w("pids.current", "2\n");
        w("pids.max", "64\n");
        let stats = collect(dir.path());
        assert_eq!(stats.cpu.usage_usec, 10);
        assert_eq!(stats.memory.usage_bytes, 4096);
        assert_eq!(stats.memory.limit_bytes, 0);
        assert_eq!(stats.memory.peak_bytes, 0, "no memory.peak: zero");
        assert_eq!(stats.memory.oom_kill_events, 1);
        assert_eq!(stats.memory.max_events, 3);
        assert_eq!(stats.memory.stat.get("file"), Some(&2048));
        assert_eq!((stats.pids.current, stats.pids.limit), (2, 64));
        assert!(stats.io.is_empty());
        assert_eq!(oom_kills(dir.path()), 1);
    }
}
