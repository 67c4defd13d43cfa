//! The container's cgroup (v2) in the guest: made with its controllers
//! delegated, `linux.resources` written to it, its processes listed and
//! signalled, its device filter loaded (`devices`, a BPF program).

pub mod devices;

use crate::init::CGROUP_ROOT;
use devices::{DeviceFilter, DeviceFilterError};
use oci_spec::runtime::LinuxResources;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup directory or file (or the spec field written to it) and
    /// why it could not be made or written.
    #[error("cgroup {path}: {reason}")]
    Path { path: String, reason: String },
    #[error(transparent)]
    Devices(#[from] DeviceFilterError),
}

/// Creates `path` and every parent below the cgroup root, delegating all
/// controllers to each level so the leaf can use them.
pub fn ensure_cgroup(path: &Path) -> Result<(), CgroupError> {
    let root = Path::new(CGROUP_ROOT);
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let enable: Vec<String> = controllers
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    let rel = path.strip_prefix(root).map_err(|_| CgroupError::Path {
        path: path.display().to_string(),
        reason: "outside the cgroup root".into(),
    })?;
    let mut current = root.to_path_buf();
    for part in rel.components() {
        if current != root {
            // Best effort per controller: a parent may lack one.
            for c in &enable {
                let _ = std::fs::write(current.join("cgroup.subtree_control"), c);
            }
        }
        current.push(part);
        match std::fs::create_dir(&current) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(CgroupError::Path {
                    path: current.display().to_string(),
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(())
}

pub fn write_cgroup(cgroup: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    std::fs::write(cgroup.join(file), value).map_err(|e| CgroupError::Path {
        path: cgroup.join(file).display().to_string(),
        reason: format!("writing {value:?}: {e}"),
    })
}

/// Like `write_cgroup`, naming the spec field, and saying so when the
/// guest kernel has no such file.
fn write_cgroup_field(
    cgroup: &Path,
    file: &str,
    value: &str,
    field: &str,
) -> Result<(), CgroupError> {
    let path = cgroup.join(file);
    if !path.exists() {
        return Err(CgroupError::Path {
            path: field.to_string(),
            reason: format!("the guest kernel has no {file} for this cgroup"),
        });
    }
    std::fs::write(&path, value).map_err(|e| CgroupError::Path {
        path: field.to_string(),
        reason: format!("writing {value:?} to {}: {e}", path.display()),
    })
}

/// Compiles and loads the device filter and opens the cgroup it goes on.
pub fn load_device_filter(
    cgroup: &Path,
    rules: &[devices::Rule],
) -> Result<DeviceFilter, CgroupError> {
    let prog = devices::load(&devices::compile(rules))?;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(cgroup)
        .map_err(|e| CgroupError::Path {
            path: cgroup.display().to_string(),
            reason: format!("opening for the device filter: {e}"),
        })?;
    Ok(DeviceFilter::new(OwnedFd::from(dir), prog))
}

/// Applies OCI `linux.resources` to a cgroup v2 directory.
pub fn apply_resources(cgroup: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
    if let Some(mem) = r.memory() {
        if let Some(limit) = mem.limit() {
            write_cgroup(
                cgroup,
                "memory.max",
                &if limit < 0 {
                    "max".into()
                } else {
                    limit.to_string()
                },
            )?;
        }
        if let Some(res) = mem.reservation() {
            write_cgroup(
                cgroup,
                "memory.low",
                &if res < 0 {
                    "max".into()
                } else {
                    res.to_string()
                },
            )?;
        }
    }
    if let Some(mem) = r.memory() {
        // OCI swap is memory+swap; cgroup v2 wants swap alone.
        if let Some(swap) = mem.swap() {
            let value = match (swap, mem.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l > 0 => {
                    if s < l {
                        return Err(CgroupError::Path {
                            path: "linux.resources.memory.swap".into(),
                            reason: format!("swap {s} below the memory limit {l}"),
                        });
                    }
                    (s - l).to_string()
                }
                (s, _) => s.to_string(),
            };
            // A guest kernel without swap has no memory.swap.max: the
            // guest has no swap at all, so any swap limit holds.
            if cgroup.join("memory.swap.max").exists() {
                write_cgroup_field(
                    cgroup,
                    "memory.swap.max",
                    &value,
                    "linux.resources.memory.swap",
                )?;
            }
        }
    }
    // linux.resources.blockIO does not apply in the guest: it has no block
    // devices (the rootfs and volumes come over virtio-fs), so weights and
    // throttles naming host major:minor numbers have nothing to act on.
    // See docs/oci-conformance.md.
    for h in r.hugepage_limits().iter().flatten() {
        let size = h.page_size();
        if size.is_empty() || size.contains('/') {
            return Err(CgroupError::Path {
                path: "linux.resources.hugepageLimits".into(),
                reason: format!("invalid pageSize {size:?}"),
            });
        }
        let file = format!("hugetlb.{size}.max");
        // A page size the guest (CPU or kernel) does not have cannot be
        // allocated at all, so its limit holds.
        if cgroup.join(&file).exists() {
            write_cgroup_field(
                cgroup,
                &file,
                &h.limit().to_string(),
                "linux.resources.hugepageLimits",
            )?;
        }
    }
    if let Some(unified) = r.unified() {
        let mut keys: Vec<_> = unified.iter().collect();
        keys.sort();
        for (k, v) in keys {
            if k.is_empty() || k.contains('/') || k.starts_with('.') {
                return Err(CgroupError::Path {
                    path: "linux.resources.unified".into(),
                    reason: format!("invalid key {k:?}"),
                });
            }
            write_cgroup_field(cgroup, k, v, "linux.resources.unified")?;
        }
    }
    if let Some(pids) = r.pids() {
        let limit = pids.limit();
        write_cgroup(
            cgroup,
            "pids.max",
            &if limit <= 0 {
                "max".into()
            } else {
                limit.to_string()
            },
        )?;
    }
    if let Some(cpu) = r.cpu() {
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            let period = cpu.period().unwrap_or(100_000);
            write_cgroup(cgroup, "cpu.max", &format!("{quota} {period}"))?;
        }
        if let Some(shares) = cpu.shares() {
            let weight = husk_protocol::resources::shares_to_weight(shares);
            write_cgroup(cgroup, "cpu.weight", &weight.to_string())?;
        }
        if let Some(cpus) = cpu.cpus() {
            write_cgroup(cgroup, "cpuset.cpus", cpus)?;
        }
        if let Some(mems) = cpu.mems() {
            write_cgroup(cgroup, "cpuset.mems", mems)?;
        }
        if let Some(idle) = cpu.idle() {
            write_cgroup(cgroup, "cpu.idle", &idle.to_string())?;
        }
        // realtimeRuntime/realtimePeriod: cgroup v2 has no per-group
        // real-time budget; ignored as runc does on v2 (the host runtime
        // mirrors them to a v1 host cgroup that has one).
    }
    Ok(())
}

pub fn cgroup_pids(cgroup: &Path) -> Vec<i32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

pub fn kill_cgroup(cgroup: &Path, signal: i32) {
    for pid in cgroup_pids(cgroup) {
        // SAFETY: kill(2) on a pid read from the container's cgroup.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Waits until `cgroup` holds no process (its `cgroup.events` reads
/// `populated 0`), woken by the kernel's notification on that file
/// (POLLPRI on each change) rather than by polling, up to `timeout`. False
/// at the timeout or when the file cannot be read.
pub fn wait_empty(cgroup: &Path, timeout: std::time::Duration) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    let Ok(mut events) = std::fs::File::open(cgroup.join("cgroup.events")) else {
        return false;
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // Reading the file from its start also re-arms the notification.
        let mut text = String::new();
        if events.seek(SeekFrom::Start(0)).is_err() || events.read_to_string(&mut text).is_err() {
            return false;
        }
        if text.lines().any(|l| l.trim() == "populated 0") {
            return true;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = libc::pollfd {
            fd: events.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: poll of one valid pollfd; EINTR only loops.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }
}

pub fn oom_kills(cgroup: &Path) -> u64 {
    std::fs::read_to_string(cgroup.join("memory.events"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_empty_wakes_when_the_last_process_leaves() {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mount = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| std::path::PathBuf::from(f[1]))
            .expect("this test needs a cgroup2 mount (and root)");
        let cg = mount.join(format!("husk-agent-wait-empty-{}", std::process::id()));
        let _ = std::fs::remove_dir(&cg);
        std::fs::create_dir(&cg).expect("making a test cgroup (root needed)");
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30"])
            .spawn()
            .unwrap();
        std::fs::write(cg.join("cgroup.procs"), child.id().to_string()).unwrap();
        let short = std::time::Duration::from_millis(200);
        let t = std::time::Instant::now();
        assert!(
            !wait_empty(&cg, short),
            "a cgroup with a process is not empty"
        );
        assert!(t.elapsed() >= short);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            child.kill().unwrap();
            child.wait().unwrap();
        });
        let t = std::time::Instant::now();
        let emptied = wait_empty(&cg, std::time::Duration::from_secs(20));
        let took = t.elapsed();
        killer.join().unwrap();
        let removed = std::fs::remove_dir(&cg);
        assert!(emptied, "no notification within 20s");
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
        removed.unwrap();
        // A cgroup that is not there cannot be waited for.
        assert!(!wait_empty(&cg, short));
    }
}
