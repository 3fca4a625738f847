//! Asking a running sandbox's agent for statistics, for `isola ps` and
//! `isola monitor`: the guest's own (`Stats.GuestStats`) and its
//! containers' cgroups (`Agent.StatsContainer`), through the sandbox's
//! hybrid-vsock socket, on a connection of our own (the agent's ttrpc
//! server takes several; the runner's is left alone).
//!
//! Everything is bounded by one timeout: the handshake, which a stopped
//! or stuck isola-vmm never answers, and the calls, which a stuck agent
//! never answers. The replies come from the guest and are untrusted: the
//! numbers are checked for sense and turned into plain values; nothing is
//! unwrapped.

use std::path::Path;
use std::time::Duration;

use isola_protocol::agent::StatsContainerRequest;
use isola_protocol::stats::{GuestStatsRequest, GuestStatsResponse};
use isola_protocol::ttrpc;
use isola_protocol::{AgentClient, StatsClient, AGENT_VSOCK_PORT};

/// The most containers of one sandbox asked about.
pub const MAX_CONTAINERS: usize = 256;

/// Largest plausible guest memory (16 TiB): a reply above is refused.
const MAX_GUEST_MEMORY: u64 = 16 << 40;

/// The guest's statistics, checked.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GuestStats {
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub mem_free_bytes: u64,
    pub mem_buffers_bytes: u64,
    pub mem_cached_bytes: u64,
    pub mem_shmem_bytes: u64,
    pub mem_anon_bytes: u64,
    pub mem_slab_bytes: u64,
    /// CPU time by mode (user, nice, system, idle, iowait, irq, softirq,
    /// steal), µs.
    pub cpu_usec: [(&'static str, u64); 8],
    pub online_cpus: u32,
    pub uptime_ms: u64,
    /// Load averages (1, 5, 15 minutes).
    pub load: [f64; 3],
    pub threads_running: u32,
    pub threads: u32,
    pub processes: u32,
    pub forks: u64,
}

impl GuestStats {
    /// What the guest uses: MemTotal - MemAvailable.
    pub fn mem_used_bytes(&self) -> u64 {
        self.mem_total_bytes
            .saturating_sub(self.mem_available_bytes)
    }

    /// Checks a reply: a total memory that is zero or beyond
    /// [`MAX_GUEST_MEMORY`] is refused; the other memory figures are
    /// capped at the total.
    pub fn from_reply(r: &GuestStatsResponse) -> Result<GuestStats, String> {
        let m = r.memory.as_ref().ok_or("the reply has no memory")?;
        let total = m.total_bytes;
        if total == 0 || total > MAX_GUEST_MEMORY {
            return Err(format!("implausible guest memory total: {total} bytes"));
        }
        let cap = |v: u64| v.min(total);
        let c = r.cpu.as_ref().ok_or("the reply has no cpu")?;
        Ok(GuestStats {
            mem_total_bytes: total,
            mem_available_bytes: cap(m.available_bytes),
            mem_free_bytes: cap(m.free_bytes),
            mem_buffers_bytes: cap(m.buffers_bytes),
            mem_cached_bytes: cap(m.cached_bytes),
            mem_shmem_bytes: cap(m.shmem_bytes),
            mem_anon_bytes: cap(m.anon_bytes),
            mem_slab_bytes: cap(m.slab_bytes),
            cpu_usec: [
                ("user", c.user_usec),
                ("nice", c.nice_usec),
                ("system", c.system_usec),
                ("idle", c.idle_usec),
                ("iowait", c.iowait_usec),
                ("irq", c.irq_usec),
                ("softirq", c.softirq_usec),
                ("steal", c.steal_usec),
            ],
            online_cpus: c.online_cpus,
            uptime_ms: r.uptime_ms,
            load: [r.load1_x100, r.load5_x100, r.load15_x100].map(|l| f64::from(l) / 100.0),
            threads_running: r.threads_running,
            threads: r.threads,
            processes: r.processes,
            forks: r.forks,
        })
    }
}

/// A container's cgroup statistics, as the agent gave them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerStats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_periods: u64,
    pub cpu_throttled_periods: u64,
    pub cpu_throttled_usec: u64,
    pub memory_bytes: u64,
    /// 0: no limit.
    pub memory_limit_bytes: u64,
    pub memory_peak_bytes: u64,
    pub oom_kills: u64,
    pub pids: u64,
    /// 0: no limit.
    pub pids_limit: u64,
}

impl ContainerStats {
    fn from_reply(r: &isola_protocol::agent::StatsContainerResponse) -> ContainerStats {
        let mut s = ContainerStats::default();
        if let Some(c) = r.cpu.as_ref() {
            s.cpu_usage_usec = c.usage_usec;
            s.cpu_user_usec = c.user_usec;
            s.cpu_system_usec = c.system_usec;
            s.cpu_periods = c.nr_periods;
            s.cpu_throttled_periods = c.nr_throttled;
            s.cpu_throttled_usec = c.throttled_usec;
        }
        if let Some(m) = r.memory.as_ref() {
            s.memory_bytes = m.usage_bytes;
            s.memory_limit_bytes = m.limit_bytes;
            s.memory_peak_bytes = m.peak_bytes;
            s.oom_kills = m.oom_kill_events;
        }
        if let Some(p) = r.pids.as_ref() {
            s.pids = p.current;
            s.pids_limit = p.limit;
        }
        s
    }
}

/// What one round of questions to an agent brought.
#[derive(Debug, Default)]
pub struct Answers {
    pub guest: Option<Result<GuestStats, String>>,
    pub containers: Vec<(String, Result<ContainerStats, String>)>,
}

/// A failed call: its status code, and its message cut and escaped as
/// every agent message is (the guest chooses its text).
fn rpc_error(what: &str, err: ttrpc::Error) -> String {
    let message = isola_sandbox::error::agent_message(&err);
    match isola_protocol::status::code(&err) {
        Some(code) => format!("{what}: {code:?}: {message}"),
        None => format!("{what}: {message}"),
    }
}

/// Asks the agent behind the hybrid-vsock socket `vsock` for the guest's
/// statistics and, for each of `containers` (at most
/// [`MAX_CONTAINERS`]), its cgroup's, all within `timeout`. Err when the
/// agent could not be reached in time; a call that failed or did not
/// finish in time is its own Err.
pub async fn ask(
    vsock: &Path,
    containers: &[String],
    timeout: Duration,
) -> Result<Answers, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = isola_protocol::hybrid::connect(vsock, AGENT_VSOCK_PORT, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let client = ttrpc::asynchronous::Client::new(stream.into());
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let ctx = || ttrpc::context::with_duration(left);
    let stats = StatsClient::new(client.clone());
    let agent = AgentClient::new(client);
    let guest = async {
        let req = GuestStatsRequest::new();
        match tokio::time::timeout_at(deadline, stats.guest_stats(ctx(), &req)).await {
            Ok(Ok(reply)) => GuestStats::from_reply(&reply),
            Ok(Err(err)) => Err(rpc_error("GuestStats", err)),
            Err(_) => Err(format!("GuestStats: no answer within {timeout:?}")),
        }
    };
    let per_container = containers.iter().take(MAX_CONTAINERS).map(|id| {
        let agent = &agent;
        async move {
            let req = StatsContainerRequest {
                container_id: id.clone(),
                ..Default::default()
            };
            let what = format!("StatsContainer {id}");
            let result =
                match tokio::time::timeout_at(deadline, agent.stats_container(ctx(), &req)).await {
                    Ok(Ok(reply)) => Ok(ContainerStats::from_reply(&reply)),
                    Ok(Err(err)) => Err(rpc_error(&what, err)),
                    Err(_) => Err(format!("{what}: no answer within {timeout:?}")),
                };
            (id.clone(), result)
        }
    });
    let (guest, containers) = tokio::join!(guest, futures::future::join_all(per_container));
    Ok(Answers {
        guest: Some(guest),
        containers,
    })
}

/// The guest's statistics alone, within `timeout`.
pub async fn guest_stats(vsock: &Path, timeout: Duration) -> Result<GuestStats, String> {
    let outer = timeout + Duration::from_millis(100);
    match tokio::time::timeout(outer, ask(vsock, &[], timeout)).await {
        Ok(Ok(answers)) => answers
            .guest
            .unwrap_or_else(|| Err("no answer".to_string())),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_protocol::stats::{GuestCpu, GuestMemory};

    fn reply(total: u64, available: u64) -> GuestStatsResponse {
        let mut r = GuestStatsResponse::new();
        let mut m = GuestMemory::new();
        m.total_bytes = total;
        m.available_bytes = available;
        m.free_bytes = u64::MAX;
        r.memory = Some(m).into();
        let mut c = GuestCpu::new();
        c.user_usec = 5;
        c.online_cpus = 2;
        r.cpu = Some(c).into();
        r.load1_x100 = 150;
        r
    }

    #[test]
    fn a_reply_is_checked() {
        let s = GuestStats::from_reply(&reply(512 << 20, 400 << 20)).unwrap();
        assert_eq!(s.mem_used_bytes(), 112 << 20);
        assert_eq!(s.mem_free_bytes, 512 << 20, "capped at the total");
        assert_eq!(s.cpu_usec[0], ("user", 5));
        assert_eq!(s.load[0], 1.5);
        // More available than there is: nothing used, not an underflow.
        let s = GuestStats::from_reply(&reply(512 << 20, u64::MAX)).unwrap();
        assert_eq!(s.mem_used_bytes(), 0);
        assert!(GuestStats::from_reply(&reply(0, 0)).is_err());
        assert!(GuestStats::from_reply(&reply(u64::MAX, 0)).is_err());
        assert!(GuestStats::from_reply(&GuestStatsResponse::new()).is_err());
    }

    /// A socket that accepts and never answers (a stopped isola-vmm's):
    /// the question ends at its timeout.
    #[tokio::test]
    async fn a_silent_socket_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                kept.push(stream);
            }
        });
        let started = std::time::Instant::now();
        let err = guest_stats(&path, Duration::from_millis(300))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(290), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(err.contains("CONNECT") || err.contains("within"), "{err}");
        held.abort();
    }

    /// A VMM that answers the handshake, then an agent that never
    /// answers the call: the same.
    #[tokio::test]
    async fn a_silent_agent_times_out() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 64];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"OK 1234\n").await;
                kept.push(stream);
            }
        });
        let started = std::time::Instant::now();
        let answers = tokio::time::timeout(
            Duration::from_secs(5),
            ask(&path, &["c1".to_string()], Duration::from_millis(300)),
        )
        .await
        .expect("ask ends by itself")
        .expect("the handshake succeeded");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
        let guest = answers.guest.unwrap().unwrap_err();
        assert!(guest.contains("GuestStats"), "{guest}");
        assert_eq!(answers.containers.len(), 1);
        assert!(answers.containers[0].1.is_err());
        held.abort();
    }
}
