//! cgroup v2 statistics of a container's cgroup.

use husk_protocol::agent::StatsResponse;
use std::collections::HashMap;
use std::path::Path;

/// Parses a flat-keyed cgroup file ("key value" per line).
fn keyed(path: &Path) -> HashMap<String, u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.parse().ok()?))
        })
        .collect()
}

/// Reads a single-value file; "max" reads as 0 (no limit).
fn single(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

pub fn read(cgroup: &Path) -> StatsResponse {
    let cpu = keyed(&cgroup.join("cpu.stat"));
    let events = keyed(&cgroup.join("memory.events"));
    let memory_stat = keyed(&cgroup.join("memory.stat"));
    let (mut rbytes, mut wbytes) = (0, 0);
    for line in std::fs::read_to_string(cgroup.join("io.stat"))
        .unwrap_or_default()
        .lines()
    {
        for field in line.split_whitespace().skip(1) {
            if let Some(v) = field.strip_prefix("rbytes=") {
                rbytes += v.parse::<u64>().unwrap_or(0);
            } else if let Some(v) = field.strip_prefix("wbytes=") {
                wbytes += v.parse::<u64>().unwrap_or(0);
            }
        }
    }
    let get = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    StatsResponse {
        cpu_usage_usec: get(&cpu, "usage_usec"),
        cpu_user_usec: get(&cpu, "user_usec"),
        cpu_system_usec: get(&cpu, "system_usec"),
        cpu_nr_periods: get(&cpu, "nr_periods"),
        cpu_nr_throttled: get(&cpu, "nr_throttled"),
        cpu_throttled_usec: get(&cpu, "throttled_usec"),
        memory_current_bytes: single(&cgroup.join("memory.current")),
        memory_limit_bytes: single(&cgroup.join("memory.max")),
        memory_oom_events: get(&events, "oom"),
        memory_oom_kill_events: get(&events, "oom_kill"),
        pids_current: single(&cgroup.join("pids.current")),
        pids_limit: single(&cgroup.join("pids.max")),
        memory_stat,
        io_read_bytes: rbytes,
        io_write_bytes: wbytes,
        ..Default::default()
    }
}
