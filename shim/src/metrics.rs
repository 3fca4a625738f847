//! A container's cgroup statistics, read in the guest by the agent, as
//! containerd's cgroups v2 `Metrics` (what `ctr task metrics` and the CRI
//! plugin decode).

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use isola_sandbox::proto as pb;

/// The type URL containerd's typeurl gives cgroups v2 metrics.
pub const METRICS_V2_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

/// The agent's statistics as cgroups v2 metrics.
pub fn to_metrics(stats: &pb::StatsContainerResponse) -> Metrics {
    let mut metrics = Metrics::new();
    if let Some(cpu) = stats.cpu.as_ref() {
        metrics.cpu = MessageField::some(CPUStat {
            usage_usec: cpu.usage_usec,
            user_usec: cpu.user_usec,
            system_usec: cpu.system_usec,
            nr_periods: cpu.nr_periods,
            nr_throttled: cpu.nr_throttled,
            throttled_usec: cpu.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = stats.memory.as_ref() {
        let stat = |name: &str| mem.stat.get(name).copied().unwrap_or(0);
        metrics.memory = MessageField::some(MemoryStat {
            anon: stat("anon"),
            file: stat("file"),
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            file_writeback: stat("file_writeback"),
            anon_thp: stat("anon_thp"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            slab_reclaimable: stat("slab_reclaimable"),
            slab_unreclaimable: stat("slab_unreclaimable"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            workingset_refault: stat("workingset_refault_anon")
                .saturating_add(stat("workingset_refault_file"))
                .max(stat("workingset_refault")),
            workingset_activate: stat("workingset_activate_anon")
                .saturating_add(stat("workingset_activate_file"))
                .max(stat("workingset_activate")),
            workingset_nodereclaim: stat("workingset_nodereclaim"),
            pgrefill: stat("pgrefill"),
            pgscan: stat("pgscan"),
            pgsteal: stat("pgsteal"),
            pgactivate: stat("pgactivate"),
            pgdeactivate: stat("pgdeactivate"),
            pglazyfree: stat("pglazyfree"),
            pglazyfreed: stat("pglazyfreed"),
            thp_fault_alloc: stat("thp_fault_alloc"),
            thp_collapse_alloc: stat("thp_collapse_alloc"),
            usage: mem.usage_bytes,
            // containerd reads "no limit" as the largest value.
            usage_limit: if mem.limit_bytes == 0 {
                u64::MAX
            } else {
                mem.limit_bytes
            },
            max_usage: mem.peak_bytes,
            ..Default::default()
        });
        metrics.memory_events = MessageField::some(MemoryEvents {
            max: mem.max_events,
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        });
    }
    if let Some(pids) = stats.pids.as_ref() {
        metrics.pids = MessageField::some(PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        });
    }
    if !stats.io.is_empty() {
        metrics.io = MessageField::some(IOStat {
            usage: stats
                .io
                .iter()
                .map(|d| IOEntry {
                    major: u64::from(d.major),
                    minor: u64::from(d.minor),
                    rbytes: d.rbytes,
                    wbytes: d.wbytes,
                    rios: d.rios,
                    wios: d.wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    metrics
}

/// `metrics` packed as containerd expects in a StatsResponse.
pub fn to_any(metrics: &Metrics) -> Result<Any, String> {
    let value = metrics
        .write_to_bytes()
        .map_err(|e| format!("encoding metrics: {e}"))?;
    Ok(Any {
        type_url: METRICS_V2_TYPE.to_string(),
        value,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_stats_become_v2_metrics() {
        let mut stats = pb::StatsContainerResponse::new();
        stats.cpu = MessageField::some(pb::CpuStats {
            usage_usec: 1500,
            user_usec: 1000,
            system_usec: 500,
            ..Default::default()
        });
        let mut mem = pb::MemoryStats {
            usage_bytes: 4096,
            limit_bytes: 0,
            peak_bytes: 8192,
            oom_kill_events: 1,
            ..Default::default()
        };
        mem.stat.insert("anon".into(), 100);
        mem.stat.insert("file".into(), 200);
        stats.memory = MessageField::some(mem);
        stats.pids = MessageField::some(pb::PidsStats {
            current: 3,
            limit: 0,
            ..Default::default()
        });
        stats.io.push(pb::IoDeviceStats {
            major: 254,
            minor: 0,
            rbytes: 10,
            ..Default::default()
        });
        let m = to_metrics(&stats);
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, u64::MAX);
        assert_eq!(m.memory.max_usage, 8192);
        assert_eq!((m.memory.anon, m.memory.file), (100, 200));
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.io.usage[0].major, 254);
        let any = to_any(&m).expect("any");
        assert_eq!(any.type_url, METRICS_V2_TYPE);
        let back = Metrics::parse_from_bytes(&any.value).expect("decode");
        assert_eq!(back, m);
    }

    #[test]
    fn empty_stats_give_empty_metrics() {
        let m = to_metrics(&pb::StatsContainerResponse::new());
        assert!(m.cpu.is_none() && m.memory.is_none() && m.pids.is_none() && m.io.is_none());
    }
}
