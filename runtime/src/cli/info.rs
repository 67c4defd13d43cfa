//! ps, events, update, features, spec.

use super::monitor;
use super::monitor_protocol::{ContainerStats, MonitorReply, MonitorRequest};
use super::state::{ContainerState, Status};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

pub fn ps(root: &Path, id: &str, format: &str) -> anyhow::Result<()> {
    let st = ContainerState::load(root, id)?;
    if st.effective_status() == Status::Stopped {
        bail!("container {id} is not running");
    }
    let processes = match monitor::request(root, id, &MonitorRequest::Ps)? {
        MonitorReply::Processes { processes } => processes,
        other => bail!("the monitor of {id} answered ps with {other:?}"),
    };
    if format == "json" {
        let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
        println!("{}", serde_json::to_string(&pids)?);
    } else {
        // Guest pids: the processes live in the VM, not on this host.
        println!("{:<8} CMD", "PID");
        for p in processes {
            // Made printable by the monitor; printable again, cheaply, so
            // nothing raw reaches a terminal whatever sent it.
            let command = husk_runtime::agent::printable(&p.command, 4096);
            println!("{:<8} {command}", p.pid);
        }
    }
    Ok(())
}

fn stats_of(root: &Path, id: &str) -> anyhow::Result<ContainerStats> {
    match monitor::request(root, id, &MonitorRequest::Stats)? {
        MonitorReply::Stats { stats } => Ok(stats),
        other => bail!("the monitor of {id} answered stats with {other:?}"),
    }
}

fn stats_event(id: &str, s: &ContainerStats) -> serde_json::Value {
    serde_json::json!({
        "type": "stats",
        "id": id,
        "data": {
            // Guest numbers: saturating, never an overflow.
            "cpu": {"usage": {"total": s.cpu_usage_usec.saturating_mul(1000), "user": s.cpu_user_usec.saturating_mul(1000), "kernel": s.cpu_system_usec.saturating_mul(1000)},
                    "throttling": {"periods": s.cpu_nr_periods, "throttledPeriods": s.cpu_nr_throttled, "throttledTime": s.cpu_throttled_usec.saturating_mul(1000)}},
            "memory": {"usage": {"usage": s.memory_current_bytes, "limit": s.memory_limit_bytes}, "raw": s.memory_stat},
            "pids": {"current": s.pids_current, "limit": s.pids_limit},
            "blkio": {"read_bytes": s.io_read_bytes, "write_bytes": s.io_write_bytes},
        }
    })
}

pub fn events(root: &Path, id: &str, stats: bool, interval: &str) -> anyhow::Result<()> {
    let secs: f64 = interval
        .trim_end_matches('s')
        .parse()
        .with_context(|| format!("--interval {interval}"))?;
    if secs <= 0.0 {
        bail!("--interval must be positive");
    }
    let mut last_oom = None;
    loop {
        let st = ContainerState::load(root, id)?;
        if st.effective_status() == Status::Stopped {
            if stats {
                bail!("container {id} is not running");
            }
            return Ok(());
        }
        let sample = stats_of(root, id)?;
        let event = stats_event(id, &sample);
        if stats {
            println!("{event}");
            return Ok(());
        }
        let oom = sample.memory_oom_kill_events;
        if last_oom.is_some_and(|l| oom > l) {
            println!("{}", serde_json::json!({"type": "oom", "id": id}));
        }
        last_oom = Some(oom);
        println!("{event}");
        // The user's --interval: a period, not a wait for an event.
        std::thread::sleep(std::time::Duration::from_secs_f64(secs));
    }
}

#[derive(clap::Args, Debug)]
pub struct UpdateArgs {
    /// A JSON file with linux.resources ("-" for stdin).
    #[arg(short, long)]
    pub resources: Option<PathBuf>,
    #[arg(long)]
    pub memory: Option<i64>,
    #[arg(long)]
    pub memory_reservation: Option<i64>,
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    #[arg(long)]
    pub cpu_period: Option<u64>,
    #[arg(long)]
    pub cpu_shares: Option<u64>,
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    #[arg(long)]
    pub pids_limit: Option<i64>,
    pub id: String,
}

pub fn update(root: &Path, a: UpdateArgs) -> anyhow::Result<()> {
    let st = ContainerState::load(root, &a.id)?;
    if st.effective_status() == Status::Stopped {
        bail!("container {} is not running", a.id);
    }
    let mut r: serde_json::Value = match &a.resources {
        Some(p) if p.as_os_str() == "-" => {
            serde_json::from_reader(std::io::stdin()).context("resources from stdin")?
        }
        Some(p) => serde_json::from_slice(&std::fs::read(p)?)
            .with_context(|| format!("{}: malformed resources", p.display()))?,
        None => serde_json::json!({}),
    };
    let set = |r: &mut serde_json::Value, k1: &str, k2: &str, v: serde_json::Value| r[k1][k2] = v;
    if let Some(v) = a.memory {
        set(&mut r, "memory", "limit", v.into())
    }
    if let Some(v) = a.memory_reservation {
        set(&mut r, "memory", "reservation", v.into())
    }
    if let Some(v) = a.cpu_quota {
        set(&mut r, "cpu", "quota", v.into())
    }
    if let Some(v) = a.cpu_period {
        set(&mut r, "cpu", "period", v.into())
    }
    if let Some(v) = a.cpu_shares {
        set(&mut r, "cpu", "shares", v.into())
    }
    if let Some(v) = &a.cpuset_cpus {
        set(&mut r, "cpu", "cpus", v.clone().into())
    }
    if let Some(v) = &a.cpuset_mems {
        set(&mut r, "cpu", "mems", v.clone().into())
    }
    if let Some(v) = a.pids_limit {
        set(&mut r, "pids", "limit", v.into())
    }
    // Check it is a valid linux.resources before sending it.
    let resources: oci_spec::runtime::LinuxResources =
        serde_json::from_value(r).context("invalid resources")?;
    // The monitor applies it in the guest and mirrors the CPU limits on the
    // host cgroup (host_cgroup's module comment).
    monitor::request(
        root,
        &a.id,
        &MonitorRequest::Update {
            resources: Box::new(resources),
        },
    )?;
    Ok(())
}

pub fn features() -> anyhow::Result<()> {
    let features = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": ["ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "sync", "async", "noatime",
                         "nodiratime", "relatime", "strictatime", "bind", "rbind", "private", "rprivate", "shared",
                         "rshared", "slave", "rslave", "unbindable", "runbindable"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "uts"],
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.husk.isolation": "microvm",
            "io.husk.version": env!("CARGO_PKG_VERSION")
        }
    });
    println!("{}", serde_json::to_string_pretty(&features)?);
    Ok(())
}

pub fn spec(bundle: &Path) -> anyhow::Result<()> {
    let path = bundle.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": true,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "ambient": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "husk",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    });
    std::fs::write(&path, serde_json::to_string_pretty(&spec)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
