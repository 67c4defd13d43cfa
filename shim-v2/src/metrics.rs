//! The guest's cgroup v2 numbers as containerd's `io.containerd.cgroups.v2.Metrics`.

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use husk_protocol::agent::StatsResponse;

pub fn to_cgroup2(s: &StatsResponse) -> Metrics {
    let stat = |k: &str| s.memory_stat.get(k).copied().unwrap_or(0);
    Metrics {
        pids: Some(PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        })
        .into(),
        cpu: Some(CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStat {
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
            usage: s.memory_current_bytes,
            usage_limit: s.memory_limit_bytes,
            ..Default::default()
        })
        .into(),
        memory_events: Some(MemoryEvents {
            oom: s.memory_oom_events,
            oom_kill: s.memory_oom_kill_events,
            ..Default::default()
        })
        .into(),
        io: Some(IOStat {
            usage: vec![IOEntry {
                rbytes: s.io_read_bytes,
                wbytes: s.io_write_bytes,
                ..Default::default()
            }],
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}
