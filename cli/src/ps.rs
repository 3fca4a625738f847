//! `isola ps`: every sandbox on the node, whoever runs it (the shim for
//! containerd's `ctr run` and CRI pods, `isola run`), from the run roots'
//! directories and their status files (`isola_sandbox::status`), checked
//! against /proc: the runner's, isola-vmm's and virtiofsd's pids, host PSS,
//! and isola-vmm's own view (its API's `info`: running or paused, bounded
//! by a timeout), and its agent's (the guest's memory in use, bounded by
//! a shorter one). Reads only.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isola_sandbox::child::{alive, processes_naming, runs_one_of};
use isola_sandbox::status::{self, Status};
use serde::Serialize;

/// How long isola-vmm's API has to answer `info`.
const API_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an agent has to answer `GuestStats` (all sandboxes are asked
/// at once).
const AGENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `info` answer read from isola-vmm.
pub const MAX_INFO: u64 = 256 << 10;
/// The programs that run sandboxes.
pub const RUNNERS: [&str; 2] = ["containerd-shim-isola-v2", "isola"];

/// One sandbox as `isola ps` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Entry {
    pub id: String,
    pub namespace: String,
    pub dir: PathBuf,
    /// running, paused, starting, stopping, dead (leftovers), or unknown.
    pub state: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub template: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_cgroup: Option<PathBuf>,
    pub uptime_secs: Option<u64>,
    /// Host PSS of the runner, isola-vmm and virtiofsd (MiB).
    pub pss_mib: Option<f64>,
    /// The guest's memory in use (MemTotal - MemAvailable, MiB), as its
    /// agent says; None when it did not answer in time.
    pub guest_mem_used_mib: Option<f64>,
    pub runner: Proc,
    pub vmm: Proc,
    pub virtiofsd: Proc,
    pub containers: Vec<Container>,
    /// What is wrong, in words (a gone runner, a silent VMM...).
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Proc {
    pub pid: u32,
    pub alive: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Container {
    pub id: String,
    pub state: String,
    pub guest_pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
}

/// Every sandbox directory under `roots` (`<root>/<namespace>/<dir>`),
/// in order of namespace and id.
pub fn collect(roots: &[PathBuf]) -> Vec<Entry> {
    let mut entries: Vec<Entry> = crate::lookup::sandbox_dirs(roots)
        .into_iter()
        .map(|(namespace, dir)| inspect(&dir, &namespace))
        .collect();
    entries.sort_by(|a, b| (&a.namespace, &a.id).cmp(&(&b.namespace, &b.id)));
    entries.dedup_by(|a, b| a.dir == b.dir);
    add_guest_memory(&mut entries);
    entries
}

/// Asks the agents of the running sandboxes, all at once, for their
/// guest's memory in use; one that does not answer within
/// [`AGENT_TIMEOUT`] is left without.
fn add_guest_memory(entries: &mut [Entry]) {
    let running: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].state == "running")
        .collect();
    if running.is_empty() {
        return;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            tracing::warn!(%err, "no runtime to ask the agents");
            return;
        }
    };
    let sockets: Vec<PathBuf> = running
        .iter()
        .map(|&i| isola_sandbox::share::Layout::new(&entries[i].dir).vsock_socket())
        .collect();
    let answers = runtime.block_on(futures::future::join_all(
        sockets
            .iter()
            .map(|s| crate::agentstats::guest_stats(s, AGENT_TIMEOUT)),
    ));
    for (&i, answer) in running.iter().zip(answers) {
        match answer {
            Ok(stats) => {
                entries[i].guest_mem_used_mib = Some(stats.mem_used_bytes() as f64 / 1048576.0)
            }
            Err(err) => entries[i]
                .problems
                .push(format!("its agent did not give the guest's memory: {err}")),
        }
    }
}

/// One sandbox directory.
fn inspect(dir: &Path, dir_namespace: &str) -> Entry {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut entry = Entry {
        id: name,
        namespace: dir_namespace.to_string(),
        dir: dir.to_path_buf(),
        ..Default::default()
    };
    let status = match status::read(dir) {
        Ok(s) => s,
        Err(err) => {
            entry.state = "unknown".into();
            entry.problems.push(format!(
                "no status file ({err}): starting, or made by an older isola"
            ));
            return entry;
        }
    };
    let needle = format!("{}/", dir.display());
    let helpers = processes_naming(&needle);
    let names_dir = |pid: u32| helpers.iter().any(|(p, _)| *p == pid);
    let runners = RUNNERS.map(String::from);
    let runner_alive = alive(status.runner_pid) && runs_one_of(status.runner_pid, &runners);
    let vmm_alive = status.vmm_pid != 0 && alive(status.vmm_pid) && names_dir(status.vmm_pid);
    let fs_alive =
        status.virtiofsd_pid != 0 && alive(status.virtiofsd_pid) && names_dir(status.virtiofsd_pid);
    let api_state = if vmm_alive {
        match vmm_info(&isola_sandbox::share::Layout::new(dir).api_socket()) {
            Ok(state) => Some(state),
            Err(err) => {
                entry.problems.push(format!("isola-vmm's API: {err}"));
                None
            }
        }
    } else {
        None
    };
    entry.state = state_of(runner_alive, vmm_alive, api_state.as_deref());
    if !runner_alive {
        entry.problems.push(format!(
            "its runner (pid {}) is gone; left: {}",
            status.runner_pid,
            leftovers(&helpers)
        ));
    }
    let mut pids: Vec<u32> = helpers.iter().map(|(p, _)| *p).collect();
    if runner_alive {
        pids.push(status.runner_pid);
    }
    pids.sort_unstable();
    pids.dedup();
    entry.pss_mib = pss_kib(&pids).map(|k| k as f64 / 1024.0);
    fill(&mut entry, status, runner_alive, vmm_alive, fs_alive);
    entry
}

fn fill(entry: &mut Entry, status: Status, runner: bool, vmm: bool, fs: bool) {
    entry.id = status.id;
    if !status.namespace.is_empty() {
        entry.namespace = status.namespace;
    }
    entry.vcpus = status.vcpus;
    entry.memory_mib = status.memory_mib;
    entry.template = status.template;
    entry.host_cgroup = status.host_cgroup;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    entry.uptime_secs =
        (status.started_unix_ms > 0).then(|| now_ms.saturating_sub(status.started_unix_ms) / 1000);
    entry.runner = Proc {
        pid: status.runner_pid,
        alive: runner,
    };
    entry.vmm = Proc {
        pid: status.vmm_pid,
        alive: vmm,
    };
    entry.virtiofsd = Proc {
        pid: status.virtiofsd_pid,
        alive: fs,
    };
    entry.containers = status
        .containers
        .into_iter()
        .map(|(id, c)| Container {
            id,
            state: c.state,
            guest_pid: c.guest_pid,
            exit_status: c.exit_status,
        })
        .collect();
}

/// The sandbox's state from who is alive and what isola-vmm says.
pub fn state_of(runner: bool, vmm: bool, api: Option<&str>) -> String {
    match (runner, vmm, api) {
        (true, true, Some(state)) => state.to_string(),
        (true, true, None) => "running (VMM silent)".into(),
        (true, false, _) => "stopping".into(),
        (false, _, _) => "dead (leftovers)".into(),
    }
}

/// What a sandbox whose runner is gone left: its directory, and the
/// processes naming it (a live isola-vmm or virtiofsd is one of them).
fn leftovers(helpers: &[(u32, String)]) -> String {
    let mut left = vec!["the run directory".to_string()];
    if !helpers.is_empty() {
        left.push(format!(
            "processes {}",
            helpers
                .iter()
                .map(|(p, _)| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    left.join(", ")
}

/// The sum of `pids`' PSS (kB), from /proc/PID/smaps_rollup; None if none
/// could be read.
fn pss_kib(pids: &[u32]) -> Option<u64> {
    let mut total = None;
    for pid in pids {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
            continue;
        };
        if let Some(kib) = pss_of_rollup(&text) {
            *total.get_or_insert(0) += kib;
        }
    }
    total
}

/// The `Pss:` line of a smaps_rollup, in kB.
pub fn pss_of_rollup(text: &str) -> Option<u64> {
    rollup_kib(text, "Pss:")
}

/// A smaps_rollup's `Key:   N kB` line's N (`key` with its colon).
pub fn rollup_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// isola-vmm's state from its API (`{"action":"info"}`).
fn vmm_info(socket: &Path) -> Result<String, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connecting: {e}"))?;
    stream
        .set_read_timeout(Some(API_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(API_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"{\"action\":\"info\"}\n")
        .map_err(|e| format!("asking: {e}"))?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_INFO))
        .read_line(&mut line)
        .map_err(|e| format!("no answer within {} s: {e}", API_TIMEOUT.as_secs()))?;
    parse_info(&line).map(|info| info.state)
}

/// isola-vmm's `info`, as `isola ps` and `isola monitor` read it.
#[derive(Debug, Clone, Default)]
pub struct VmmInfo {
    pub state: String,
    pub metrics: std::collections::BTreeMap<String, u64>,
}

/// isola-vmm's `info` answer: its state and the counters under
/// `metrics` (non-negative integers; anything else is left out).
pub fn parse_info(line: &str) -> Result<VmmInfo, String> {
    let info: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("isola-vmm's answer: {e}"))?;
    let state = info
        .get("state")
        .and_then(|s| s.as_str())
        .filter(|s| s.len() <= 32 && s.bytes().all(|b| b.is_ascii_lowercase()))
        .ok_or_else(|| "isola-vmm's answer has no state".to_string())?;
    let metrics = info
        .get("metrics")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .take(256)
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    Ok(VmmInfo {
        state: state.to_string(),
        metrics,
    })
}

/// The table `isola ps` prints: a line per sandbox, one more per
/// container, then the problems.
pub fn table(entries: &[Entry]) -> String {
    let mut out = format!(
        "{:<24} {:<10} {:<18} {:>5} {:>7} {:>8} {:>8} {:>9}  {}\n",
        "SANDBOX",
        "NAMESPACE",
        "STATE",
        "VCPUS",
        "MEMORY",
        "UPTIME",
        "PSS",
        "GUEST MEM",
        "PIDS (runner/vmm/virtiofsd)"
    );
    for e in entries {
        let pid = |p: &Proc| {
            if p.pid == 0 {
                "-".to_string()
            } else if p.alive {
                p.pid.to_string()
            } else {
                format!("{}(gone)", p.pid)
            }
        };
        out.push_str(&format!(
            "{:<24} {:<10} {:<18} {:>5} {:>7} {:>8} {:>8} {:>9}  {}/{}/{}\n",
            short(&e.id, 24),
            short(&e.namespace, 10),
            e.state,
            e.vcpus,
            format!("{}M", e.memory_mib),
            e.uptime_secs.map_or("-".into(), uptime),
            e.pss_mib.map_or("-".into(), |m| format!("{m:.1}M")),
            e.guest_mem_used_mib
                .map_or("-".into(), |m| format!("{m:.1}M")),
            pid(&e.runner),
            pid(&e.vmm),
            pid(&e.virtiofsd),
        ));
        for c in &e.containers {
            let exit = c
                .exit_status
                .map_or(String::new(), |s| format!(" (status {s})"));
            out.push_str(&format!(
                "  container {} {}{exit}, guest pid {}\n",
                c.id, c.state, c.guest_pid
            ));
        }
        for p in &e.problems {
            out.push_str(&format!("  ! {p}\n"));
        }
    }
    out
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let head: String = s.chars().take(n - 1).collect();
        format!("{head}…")
    }
}

fn uptime(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_sandbox::status::ContainerStatus;

    #[test]
    fn states_from_who_is_alive() {
        assert_eq!(state_of(true, true, Some("paused")), "paused");
        assert_eq!(state_of(true, true, None), "running (VMM silent)");
        assert_eq!(state_of(true, false, None), "stopping");
        assert_eq!(state_of(false, true, Some("running")), "dead (leftovers)");
        assert_eq!(state_of(false, false, None), "dead (leftovers)");
    }

    #[test]
    fn pss_and_uptime_text() {
        let rollup = "00400000-7ffd rw-p 00000000 00:00 0 [rollup]\nRss:  2048 kB\nPss:  1536 kB\nPss_Anon: 10 kB\n";
        assert_eq!(pss_of_rollup(rollup), Some(1536));
        assert_eq!(pss_of_rollup("Rss: 1 kB\n"), None);
        assert_eq!(uptime(59), "59s");
        assert_eq!(uptime(61), "1m01s");
        assert_eq!(uptime(3 * 3600 + 120), "3h02m");
        assert_eq!(uptime(2 * 86400 + 3600), "2d01h");
        assert_eq!(short("abcdef", 4), "abc…");
    }

    #[test]
    fn a_dead_runners_sandbox_is_reported_with_its_leftovers() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("k8s.io").join("pod1");
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Status {
            id: "pod1".into(),
            namespace: "k8s.io".into(),
            // Not a runner: this test's own parent is neither program.
            runner_pid: u32::MAX - 1,
            vmm_pid: u32::MAX - 2,
            virtiofsd_pid: 0,
            vcpus: 2,
            memory_mib: 512,
            started_unix_ms: 1,
            template: true,
            ..Default::default()
        };
        s.containers.insert(
            "app".into(),
            ContainerStatus {
                state: "exited".into(),
                guest_pid: 35,
                exit_status: Some(137),
                create_ms: None,
            },
        );
        status::write(&dir, &s).unwrap();
        // A directory without a status file: listed as unknown.
        std::fs::create_dir_all(root.path().join("_direct").join("new")).unwrap();
        let entries = collect(&[root.path().to_path_buf(), root.path().to_path_buf()]);
        assert_eq!(entries.len(), 2, "{entries:#?}");
        let e = entries.iter().find(|e| e.id == "pod1").unwrap();
        assert_eq!(e.state, "dead (leftovers)");
        assert_eq!((e.vcpus, e.memory_mib, e.template), (2, 512, true));
        assert!(!e.runner.alive && !e.vmm.alive);
        assert_eq!(e.containers[0].exit_status, Some(137));
        assert!(e.problems[0].contains("is gone"), "{:?}", e.problems);
        let unknown = entries.iter().find(|e| e.id == "new").unwrap();
        assert_eq!(unknown.state, "unknown");
        assert_eq!(unknown.namespace, "_direct");
        let text = table(&entries);
        assert!(text.contains("pod1"), "{text}");
        assert!(
            text.contains("container app exited (status 137), guest pid 35"),
            "{text}"
        );
        assert!(text.contains("! its runner"), "{text}");
        let json = serde_json::to_value(&entries).unwrap();
        assert_eq!(json[1]["id"], "pod1");
        assert_eq!(json[1]["containers"][0]["state"], "exited");
    }
}
