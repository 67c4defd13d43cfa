//! Host-side accounting: the processes of a sandbox (its monitor or shim,
//! the VMM and the device backends) are placed in the OCI `cgroupsPath` on
//! the host, in every mounted hierarchy: cgroup v1 controllers, cgroup v2,
//! or both on a hybrid host. The container's limits apply inside the guest
//! (and size the VM). On the host the cgroup accounts for the whole sandbox
//! and carries the container's CPU limits (`mirror_cpu`): shares, quota and
//! period, cpuset and real-time budget bound the host CPU time of the VM's
//! vCPU threads and of the backends doing its I/O, which is what the
//! container was granted. The container's memory and pids limits are not
//! mirrored: they count the VMM's and backends' own memory and threads, so
//! the container's value would kill the VM on the host before the guest
//! ever enforced it; the VM's RAM size bounds the guest instead. The
//! sandbox's own bounds are set (`limit_sandbox`): memory = the VM's RAM
//! plus the host overhead, pids = the configured maximum, so a hostile guest
//! cannot make its host processes take more.

use oci_spec::runtime::LinuxCpu;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum HostCgroupError {
    #[error("cgroupsPath {0:?}: systemd slices are not supported (husk uses the cgroupfs layout)")]
    Systemd(String),
    #[error("host cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A cgroup created on the host, in each hierarchy.
#[derive(Debug)]
pub struct HostCgroup {
    /// (hierarchy mount point, directory created for the sandbox)
    dirs: Vec<(PathBuf, PathBuf)>,
    /// Directories this created, deepest first, removed at the end.
    created: Vec<PathBuf>,
}

/// Mount points of the cgroup hierarchies (v1 and v2) on this host.
pub fn hierarchies() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split_whitespace().next().unwrap_or_default();
        let mount_point = left.split_whitespace().nth(4).unwrap_or_default();
        if fstype == "cgroup2" {
            found.push(PathBuf::from(mount_point));
        } else if fstype == "cgroup" {
            // v1: only hierarchies with a controller (not the named ones).
            let opts = right.split_whitespace().nth(2).unwrap_or_default();
            if !opts.split(',').any(|o| o.starts_with("name=")) {
                found.push(PathBuf::from(mount_point));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

fn relative(cgroups_path: &str) -> Result<PathBuf, HostCgroupError> {
    if cgroups_path.contains(':') {
        return Err(HostCgroupError::Systemd(cgroups_path.to_string()));
    }
    let mut rel = PathBuf::new();
    for part in Path::new(cgroups_path).components() {
        if let std::path::Component::Normal(p) = part {
            rel.push(p);
        }
    }
    Ok(rel)
}

impl HostCgroup {
    /// Creates `cgroups_path` in every hierarchy.
    pub fn create(cgroups_path: &str) -> Result<HostCgroup, HostCgroupError> {
        let rel = relative(cgroups_path)?;
        let mut cg = HostCgroup {
            dirs: Vec::new(),
            created: Vec::new(),
        };
        for mount in hierarchies() {
            let dir = mount.join(&rel);
            let mut missing = Vec::new();
            let mut p = dir.clone();
            while p != mount && !p.exists() {
                missing.push(p.clone());
                if !p.pop() {
                    break;
                }
            }
            if let Err(source) = std::fs::create_dir_all(&dir) {
                // A hierarchy that refuses (e.g. a read-only one) is skipped;
                // the others still account.
                log::warn!("host cgroup {}: {source}", dir.display());
                continue;
            }
            // A v1 cpuset cgroup takes no task until it has CPUs and memory
            // nodes: give each new level its parent's, top down.
            for created in missing.iter().rev() {
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let parent = created.parent().map(|p| p.join(file));
                    if let Some(value) = parent.and_then(|p| std::fs::read_to_string(p).ok()) {
                        let _ = std::fs::write(created.join(file), value.trim());
                    }
                }
            }
            cg.created.extend(missing);
            cg.dirs.push((mount, dir));
        }
        Ok(cg)
    }

    /// The existing directories of `cgroups_path` (a running sandbox's), to
    /// change its limits; dropping it removes nothing.
    pub fn existing(cgroups_path: &str) -> Result<HostCgroup, HostCgroupError> {
        let rel = relative(cgroups_path)?;
        let dirs = hierarchies()
            .into_iter()
            .map(|mount| {
                let dir = mount.join(&rel);
                (mount, dir)
            })
            .filter(|(_, dir)| dir.is_dir())
            .collect();
        Ok(HostCgroup {
            dirs,
            created: Vec::new(),
        })
    }

    /// Moves `pid` (and its future children) into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), HostCgroupError> {
        for (_, dir) in &self.dirs {
            let procs = dir.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string()).map_err(|source| HostCgroupError::Io {
                path: procs,
                source,
            })?;
        }
        Ok(())
    }

    /// Writes the container's CPU limits to the host cgroup (see the module
    /// comment). Shares, quota and period fail when the host refuses them
    /// (as runc fails); a cpuset or real-time budget the host cannot give
    /// (CPUs it lacks: `cpu.cpus` names guest CPUs, and the VM may have more
    /// than the host) is left at the parent's, with a warning.
    pub fn mirror_cpu(&self, cpu: &LinuxCpu) -> Result<(), HostCgroupError> {
        for (_, dir) in &self.dirs {
            let write = |file: &str, value: String| {
                let path = dir.join(file);
                std::fs::write(&path, value).map_err(|source| HostCgroupError::Io { path, source })
            };
            let has = |file: &str| dir.join(file).exists();
            // cgroup v1 cpu controller.
            if has("cpu.shares") {
                if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
                    write("cpu.shares", shares.to_string())?;
                }
                if let Some(period) = cpu.period().filter(|p| *p > 0) {
                    write("cpu.cfs_period_us", period.to_string())?;
                }
                if let Some(quota) = cpu.quota().filter(|q| *q != 0) {
                    write("cpu.cfs_quota_us", quota.to_string())?;
                }
                // The budget comes from the parent: period first, then runtime.
                for (file, value) in [
                    (
                        "cpu.rt_period_us",
                        cpu.realtime_period().map(|v| v.to_string()),
                    ),
                    (
                        "cpu.rt_runtime_us",
                        cpu.realtime_runtime().map(|v| v.to_string()),
                    ),
                ] {
                    if let (Some(v), true) = (value, has(file)) {
                        if let Err(e) = write(file, v) {
                            log::warn!("{e}: real-time budget not mirrored on the host");
                        }
                    }
                }
            }
            // cgroup v2 cpu controller (when the parent delegates it).
            if has("cpu.weight") {
                if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
                    write("cpu.weight", shares_to_weight(shares).to_string())?;
                }
                let period = cpu.period().filter(|p| *p > 0);
                match cpu.quota().filter(|q| *q != 0) {
                    Some(q) if q > 0 => {
                        write("cpu.max", format!("{q} {}", period.unwrap_or(100_000)))?
                    }
                    Some(_) => write("cpu.max", format!("max {}", period.unwrap_or(100_000)))?,
                    None => {}
                }
            }
            if has("cpuset.cpus") {
                for (file, value) in [("cpuset.cpus", cpu.cpus()), ("cpuset.mems", cpu.mems())] {
                    if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                        if let Err(e) = write(file, v.to_string()) {
                            log::warn!("{e}: the sandbox keeps its parent's {file}");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Bounds what the sandbox's host processes may take, whatever a guest
    /// makes them do: `memory_bytes` (the guest's RAM plus the host
    /// overhead) and `pids` tasks, in every hierarchy that has the
    /// controller (v1 `memory.limit_in_bytes` / `pids.max`, v2 `memory.max`
    /// / `pids.max`). A hierarchy refusing the value fails the sandbox.
    pub fn limit_sandbox(&self, memory_bytes: u64, pids: u32) -> Result<(), HostCgroupError> {
        for (_, dir) in &self.dirs {
            for (file, value) in [
                ("memory.limit_in_bytes", memory_bytes.to_string()),
                ("memory.max", memory_bytes.to_string()),
                ("pids.max", pids.to_string()),
            ] {
                let path = dir.join(file);
                if path.exists() {
                    std::fs::write(&path, value)
                        .map_err(|source| HostCgroupError::Io { path, source })?;
                }
            }
        }
        Ok(())
    }

    /// The directories, one per hierarchy.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, d)| d.as_path())
    }

    /// The directories this created (the cgroup and any parent it had to
    /// make), for an owner that must remove them after this process died.
    pub fn created(&self) -> &[PathBuf] {
        &self.created
    }

    /// Moves `pid` back to each hierarchy's root and removes what this
    /// created, once its other processes are gone.
    pub fn remove(&mut self, pid: u32) {
        for (mount, _) in &self.dirs {
            let _ = std::fs::write(mount.join("cgroup.procs"), pid.to_string());
        }
        // The same removal as after a dead owner: deepest first, once
        // each cgroup emptied.
        remove_after_owner_died(&std::mem::take(&mut self.created));
    }
}

/// Removes the cgroup directories an owner that died (a killed monitor or
/// shim) had created, deepest first. Only directories inside a mounted
/// cgroup hierarchy are touched, and only with rmdir(2), which removes
/// nothing but an empty cgroup: a parent another sandbox still uses stays.
/// The VM's processes die with their owner but may take a moment to leave
/// the cgroup, so the removal waits and retries for a while.
pub fn remove_after_owner_died(dirs: &[PathBuf]) {
    let hierarchies = hierarchies();
    let mut dirs: Vec<&PathBuf> = dirs
        .iter()
        .filter(|d| {
            hierarchies
                .iter()
                .any(|h| d.starts_with(h) && d.as_path() != h.as_path())
        })
        .collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in dirs {
        // Woken when a v2 cgroup empties; v1 has no notification: retried.
        wait_empty(dir, std::time::Duration::from_secs(2));
        for _ in 0..200 {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // A parent still holding another sandbox's cgroup.
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => {
                    log::warn!("removing the host cgroup {}: {e}", dir.display());
                    break;
                }
            }
        }
    }
}

/// Waits up to `timeout` for a cgroup v2 directory to hold no process
/// (`populated 0` in its cgroup.events), woken by the kernel's POLLPRI on
/// that file. Returns at once for a v1 directory (no such file) and for a
/// parent of other cgroups (whose processes are not ours to wait for, and
/// which rmdir refuses anyway).
pub fn wait_empty(dir: &Path, timeout: std::time::Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsFd;
    let has_children = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        })
        .unwrap_or(false);
    if has_children {
        return false;
    }
    let Ok(mut events) = std::fs::File::open(dir.join("cgroup.events")) else {
        return false;
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // Reading from the start also re-arms the notification.
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
        let ms = PollTimeout::try_from(left.as_millis().max(1)).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(events.as_fd(), PollFlags::POLLPRI)];
        // EINTR or a wake-up: look again.
        let _ = nix::poll::poll(&mut fds, ms);
    }
}

impl Drop for HostCgroup {
    /// A sandbox that failed to start must not leave its cgroup behind.
    fn drop(&mut self) {
        if !self.created.is_empty() {
            self.remove(std::process::id());
        }
    }
}

pub use husk_protocol::resources::shares_to_weight;

#[cfg(test)]
mod tests {
    #[test]
    fn a_v2_cgroup_wait_wakes_when_it_empties_and_a_v1_one_returns_at_once() {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mount_of = |kind: &str| {
            mounts
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[2] == kind)
                .map(|f| PathBuf::from(f[1]))
        };
        let v2 = mount_of("cgroup2").expect("this test needs a cgroup2 mount (and root)");
        let cg = v2.join(format!("husk-host-wait-empty-{}", std::process::id()));
        let _ = std::fs::remove_dir(&cg);
        std::fs::create_dir(&cg).expect("making a test cgroup (root needed)");
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30"])
            .spawn()
            .unwrap();
        std::fs::write(cg.join("cgroup.procs"), child.id().to_string()).unwrap();
        let short = std::time::Duration::from_millis(100);
        assert!(!wait_empty(&cg, short));
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
        assert!(
            emptied && took < std::time::Duration::from_secs(5),
            "{took:?}"
        );
        removed.unwrap();
        // A parent of another cgroup with a process: no wait.
        let parent = v2.join(format!("husk-host-wait-parent-{}", std::process::id()));
        let inner = parent.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30"])
            .spawn()
            .unwrap();
        std::fs::write(inner.join("cgroup.procs"), child.id().to_string()).unwrap();
        let t = std::time::Instant::now();
        let waited = wait_empty(&parent, std::time::Duration::from_secs(5));
        let took = t.elapsed();
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = std::fs::remove_dir(&inner);
        let _ = std::fs::remove_dir(&parent);
        assert!(
            !waited && took < std::time::Duration::from_secs(1),
            "{took:?}"
        );
        // No cgroup.events (a v1 hierarchy's directory, or none): no wait.
        let t = std::time::Instant::now();
        assert!(!wait_empty(
            Path::new("/proc"),
            std::time::Duration::from_secs(5)
        ));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    use super::*;

    #[test]
    fn paths_are_kept_inside_the_hierarchy() {
        assert_eq!(relative("/a/b").unwrap(), PathBuf::from("a/b"));
        assert_eq!(relative("../../etc").unwrap(), PathBuf::from("etc"));
        assert!(matches!(
            relative("system.slice:docker:abc"),
            Err(HostCgroupError::Systemd(_))
        ));
    }
}
