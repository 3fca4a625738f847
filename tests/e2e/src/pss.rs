//! The host memory a sandbox costs: the PSS (proportional set size:
//! memory shared between processes, such as the guest RAM isola-vmm and
//! virtiofsd both map, is counted once) of its processes, from
//! `/proc/PID/smaps_rollup`, sampled until it settles. Shared by the
//! benchmarks (bench-shim, bench-pods).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The idle sampling: interval, agreement, bound.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
pub const SETTLED_WITHIN: f64 = 0.02;
pub const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// Names of the processes an idle container costs.
pub const SHIM: &str = "shim";
pub const VMM: &str = "isola-vmm";
pub const VIRTIOFSD: &str = "virtiofsd";
pub const CONTAINER: &str = "container";

/// One process's PSS.
#[derive(Debug, Clone)]
pub struct Proc {
    /// [`SHIM`], [`VMM`], [`VIRTIOFSD`] or [`CONTAINER`] (another
    /// helper: its program's name).
    pub name: String,
    pub pid: u32,
    pub pss_kib: u64,
}

/// An idle container's processes, once their PSS settled.
#[derive(Debug, Clone)]
pub struct Pss {
    pub procs: Vec<Proc>,
    /// When two samples in a row agreed (None: not within the bound).
    pub settled_after: Option<Duration>,
}

impl Pss {
    pub fn total_kib(&self) -> u64 {
        self.procs.iter().map(|p| p.pss_kib).sum()
    }

    pub fn total_mib(&self) -> f64 {
        self.total_kib() as f64 / 1024.0
    }

    /// The PSS of the processes called `name`, in MiB.
    pub fn mib(&self, name: &str) -> f64 {
        self.procs
            .iter()
            .filter(|p| p.name == name)
            .map(|p| p.pss_kib)
            .sum::<u64>() as f64
            / 1024.0
    }
}

impl std::fmt::Display for Pss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut by_name: BTreeMap<&str, Vec<&Proc>> = BTreeMap::new();
        for p in &self.procs {
            by_name.entry(p.name.as_str()).or_default().push(p);
        }
        // The shim first, then the others by name.
        let mut names: Vec<&str> = by_name.keys().copied().collect();
        names.sort_by_key(|n| (*n != SHIM, *n));
        let parts: Vec<String> = names
            .iter()
            .map(|name| {
                let procs = &by_name[name];
                let each: Vec<String> = procs
                    .iter()
                    .map(|p| format!("{} {:.1}", p.pid, p.pss_kib as f64 / 1024.0))
                    .collect();
                format!("{name} {:.1} (pid {})", self.mib(name), each.join(" + "))
            })
            .collect();
        write!(f, "{} = {:.1} MiB", parts.join(", "), self.total_mib())?;
        match self.settled_after {
            Some(t) => write!(f, " (settled after {:.0} s)", t.as_secs_f64()),
            None => write!(
                f,
                " (NOT settled within {} s: last sample)",
                SETTLE_LIMIT.as_secs()
            ),
        }
    }
}

/// Samples every [`SAMPLE_EVERY`] until two totals in a row agree within
/// [`SETTLED_WITHIN`], at most [`SETTLE_LIMIT`] (then the last sample).
pub fn settle(sample: impl Fn() -> Result<Vec<Proc>>) -> Result<Pss> {
    let start = Instant::now();
    let mut previous: Option<u64> = None;
    loop {
        let procs = sample()?;
        let total: u64 = procs.iter().map(|p| p.pss_kib).sum();
        let settled = previous.is_some_and(|p| agree(p, total));
        if settled || start.elapsed() >= SETTLE_LIMIT {
            return Ok(Pss {
                procs,
                settled_after: settled.then(|| start.elapsed()),
            });
        }
        previous = Some(total);
        std::thread::sleep(SAMPLE_EVERY);
    }
}

/// Whether two totals differ by at most [`SETTLED_WITHIN`] of the larger.
pub fn agree(a: u64, b: u64) -> bool {
    let (a, b) = (a as f64, b as f64);
    (a - b).abs() <= SETTLED_WITHIN * a.max(b)
}

pub fn proc(name: String, pid: u32) -> Result<Proc> {
    Ok(Proc {
        name,
        pid,
        pss_kib: pss_kib(pid)?,
    })
}

/// The file name of a command line's program (`isola-vmm`, `virtiofsd`).
pub fn program(cmdline: &str) -> String {
    let argv0 = cmdline.split_whitespace().next().unwrap_or("?");
    argv0.rsplit('/').next().unwrap_or(argv0).to_string()
}

/// The `Pss:` line of /proc/PID/smaps_rollup, in kB.
pub fn pss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let rollup = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_pss(&rollup).with_context(|| format!("no `Pss:` line in {path}"))
}

fn parse_pss(rollup: &str) -> Option<u64> {
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_line() {
        let rollup = "00400000-7ffd [rollup]\nRss:  1234 kB\nPss:   567 kB\nPss_Anon:  12 kB\n";
        assert_eq!(parse_pss(rollup), Some(567));
        assert_eq!(parse_pss("Pss_Anon: 12 kB\n"), None);
        assert_eq!(parse_pss("Pss: x kB\n"), None);
    }

    #[test]
    fn settling() {
        assert!(agree(1000, 1020));
        assert!(!agree(1000, 1030));
        assert!(agree(0, 0));
    }

    #[test]
    fn program_names() {
        assert_eq!(program("/a/b/isola-vmm --kernel x"), "isola-vmm");
        assert_eq!(program("virtiofsd --socket-path /x"), "virtiofsd");
        assert_eq!(program(""), "?");
    }
}
