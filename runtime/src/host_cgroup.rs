//! Host-side accounting: the processes of a sandbox (its monitor or shim,
//! the VMM and the device backends) are placed in the OCI `cgroupsPath` on
//! the host, in every mounted hierarchy: cgroup v1 controllers, cgroup v2,
//! or both on a hybrid host. The container's limits apply inside the guest
//! (and size the VM); on the host the cgroup is for accounting.

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

    /// The directories, one per hierarchy.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, d)| d.as_path())
    }

    /// Moves `pid` back to each hierarchy's root and removes what this
    /// created, once its other processes are gone.
    pub fn remove(&mut self, pid: u32) {
        for (mount, _) in &self.dirs {
            let _ = std::fs::write(mount.join("cgroup.procs"), pid.to_string());
        }
        self.created
            .sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for dir in self.created.drain(..) {
            for _ in 0..100 {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        }
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

#[cfg(test)]
mod tests {
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
