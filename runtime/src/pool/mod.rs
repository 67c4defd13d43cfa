//! The warm pool (the idea of Kata's VMCache, without its shared template):
//! `husk pool serve` keeps `pool_size` sandboxes booted per size class of
//! `[[pool]]` in the configuration, each with its agent ready and no
//! container yet; `create` (CLI and shim) claims one when the spec sizes to
//! a class, and cold-boots otherwise. A claimed sandbox is never returned:
//! it dies with its container, and the service boots a replacement.
//!
//! Processes: the service (`service`) spawns one keeper per pooled sandbox
//! (`keeper`, `husk pool keep`), which boots the sandbox with
//! `Sandbox::start` (so it is the parent of the VMM and backends), then
//! offers it on a socket. A claimant (`claim`) takes the socket by renaming
//! it out of `idle/` (exactly one rename wins), receives the helpers'
//! pidfds and the jail claim, and adopts the sandbox (`Sandbox::adopt`).
//! The keeper stays the helpers' parent (they are spawned to die with it)
//! and watches the new owner: if the owner dies first it ends the sandbox
//! and cleans up, as a cold-booted sandbox dies with its owner.
//!
//! Every pooled VM is its own boot of the kernel (no snapshot, no shared
//! memory image): its own entropy and kernel address randomisation, booted
//! with no tenant data.
//!
//! Layout, `<pool_dir>/` (root's, 0700): `serve.lock` (held by the
//! service), and per class `<class>/`: `vms/<id>/` (the sandbox
//! directories), `keepers/<id>.lock` (held by each keeper for its life),
//! and the keepers' sockets, in `idle/` while offered, `claimed/` once
//! taken, `retired/` while their keeper tears down.

pub mod claim;
pub mod keeper;
pub mod service;
pub mod wire;

use crate::config::{Config, PoolClass};
use std::path::{Path, PathBuf};

pub use claim::{claim, Claimed};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no [[pool]] entry in the configuration: the pool is off")]
    Off,
    #[error("pool: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pool: another `husk pool serve` holds {0}")]
    AlreadyServed(PathBuf),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Artifact(#[from] crate::artifacts::ArtifactError),
    #[error(transparent)]
    Hypervisor(#[from] crate::hypervisor::HypervisorError),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error(transparent)]
    Event(#[from] crate::event::EventError),
    #[error("pool: the keeper refused the claim: {0}")]
    Refused(String),
    #[error("pool: {0}")]
    Keeper(String),
}

pub(crate) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> PoolError + 'a {
    move |source| PoolError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A class's directory name: its size, and a hash of everything else that
/// makes two sandboxes the same (kernel, initramfs, hypervisor, backends,
/// command line, cache mode, jail range, boot timeout). A claimant whose
/// configuration differs in any of them looks in another directory and
/// finds nothing: it never gets a VM booted for other settings.
pub fn class_key(config: &Config, vcpus: u32, memory_mib: u32) -> Result<String, PoolError> {
    let kernel = crate::artifacts::kernel(config.kernel.as_deref())?;
    let initramfs = crate::artifacts::initramfs(config.initramfs.as_deref())?;
    let virtiofsd = crate::artifacts::virtiofsd(config.virtiofsd.as_deref())?;
    let vsock = crate::artifacts::vsock_backend(config.vsock_backend.as_deref())?;
    let selection = crate::hypervisor::select(config.hypervisor, config)?;
    let what = format!(
        "{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}",
        kernel.display(),
        initramfs.display(),
        virtiofsd.display(),
        vsock.display(),
        selection.hypervisor.name(),
        selection.hypervisor.program().display(),
        selection.hypervisor.acceleration(),
        config.kernel_params,
        config.virtiofs_cache,
        config.jail_uid_base,
        config.jail_uid_count,
    );
    let hash = crate::sandbox::fnv1a(what.as_bytes());
    Ok(format!("{vcpus}c-{memory_mib}m-{hash:016x}"))
}

/// The class a sandbox of this size would come from, if the pool has one.
pub fn class_of(config: &Config, vcpus: u32, memory_mib: u32) -> Option<PoolClass> {
    config
        .pool
        .iter()
        .find(|c| c.vcpus == vcpus && c.memory_mib == memory_mib)
        .copied()
}

/// The directories of one class.
#[derive(Debug, Clone)]
pub struct ClassDirs {
    pub root: PathBuf,
}

impl ClassDirs {
    pub fn new(pool_dir: &Path, key: &str) -> ClassDirs {
        ClassDirs {
            root: pool_dir.join(key),
        }
    }
    /// The state root of the class's sandboxes.
    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }
    pub fn keepers(&self) -> PathBuf {
        self.root.join("keepers")
    }
    pub fn idle(&self) -> PathBuf {
        self.root.join("idle")
    }
    pub fn claimed(&self) -> PathBuf {
        self.root.join("claimed")
    }
    pub fn retired(&self) -> PathBuf {
        self.root.join("retired")
    }
    pub fn lock(&self, id: &str) -> PathBuf {
        self.keepers().join(format!("{id}.lock"))
    }

    /// Makes every directory of the class (root's, 0700).
    pub fn make(&self) -> Result<(), PoolError> {
        for d in [
            self.vms(),
            self.keepers(),
            self.idle(),
            self.claimed(),
            self.retired(),
        ] {
            crate::sandbox::private_dir_all(&d)?;
        }
        Ok(())
    }

    /// The ids with an entry in `dir` (one of idle, claimed, retired).
    pub fn ids_in(dir: &Path) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Ids whose keeper is alive (holds its lock).
    pub fn live_keepers(&self) -> Vec<String> {
        Self::ids_in(&self.keepers())
            .into_iter()
            .filter_map(|n| n.strip_suffix(".lock").map(str::to_string))
            .filter(|id| keeper_alive(&self.lock(id)))
            .collect()
    }
}

/// Whether a keeper holds the lock at `lock`.
pub fn keeper_alive(lock: &Path) -> bool {
    let Ok(file) = std::fs::File::open(lock) else {
        return false;
    };
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock).is_err()
}

/// Removes what keeper `id` of `class` left if it died without cleaning
/// up (SIGKILL): its sandbox's mounts and directory, its jail, its socket
/// and lock. Only for a keeper that is dead (its lock free).
pub fn sweep_keeper(class: &ClassDirs, id: &str) {
    let lock = class.lock(id);
    let Ok(Some(held)) = crate::lockfile::lock_exclusive(&lock, false) else {
        return; // alive
    };
    let dir = crate::sandbox::sandbox_dir(&class.vms(), id);
    crate::sandbox::remove_jail_of(&dir);
    let _ = crate::sandbox::unmount_below(&dir);
    let _ = crate::sandbox::remove_tree_same_fs(&dir);
    for d in [class.idle(), class.claimed(), class.retired()] {
        let _ = std::fs::remove_file(d.join(id));
    }
    let _ = std::fs::remove_file(&lock);
    drop(held);
}

/// Sweeps every dead keeper's leftovers under `pool_dir`, and the class
/// directories left empty.
pub fn sweep(pool_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(pool_dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.path().is_dir() {
            continue;
        }
        let class = ClassDirs { root: e.path() };
        let mut ids: Vec<String> = ClassDirs::ids_in(&class.keepers())
            .into_iter()
            .filter_map(|n| n.strip_suffix(".lock").map(str::to_string))
            .collect();
        for d in [class.idle(), class.claimed(), class.retired(), class.vms()] {
            ids.extend(ClassDirs::ids_in(&d));
        }
        ids.sort();
        ids.dedup();
        for id in &ids {
            if crate::sandbox::valid_id(id) {
                sweep_keeper(&class, id);
            }
        }
        if class.live_keepers().is_empty() {
            for d in [
                class.vms(),
                class.keepers(),
                class.idle(),
                class.claimed(),
                class.retired(),
            ] {
                let _ = std::fs::remove_dir(d);
            }
            let _ = std::fs::remove_dir(&class.root);
        }
    }
}

/// The pool's state, for `husk pool status` and `husk check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolStatus {
    pub pool_dir: PathBuf,
    /// Whether a `husk pool serve` holds the pool.
    pub serving: bool,
    pub classes: Vec<ClassStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassStatus {
    pub class: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Sandboxes wanted ready.
    pub pool_size: u32,
    /// Booted, agent ready, offered.
    pub idle: usize,
    /// Keepers booting their sandbox.
    pub booting: usize,
    /// Claimed and running a container.
    pub claimed: usize,
}

/// Reads the pool's state from its directory.
pub fn status(config: &Config) -> Result<PoolStatus, PoolError> {
    let serving = keeper_alive(&config.pool_dir.join(service::SERVE_LOCK));
    let mut classes = Vec::new();
    for c in &config.pool {
        let key = class_key(config, c.vcpus, c.memory_mib)?;
        let dirs = ClassDirs::new(&config.pool_dir, &key);
        let live = dirs.live_keepers();
        let count = |d: PathBuf| {
            ClassDirs::ids_in(&d)
                .iter()
                .filter(|id| live.contains(id))
                .count()
        };
        let idle = count(dirs.idle());
        let claimed = count(dirs.claimed());
        let retired = count(dirs.retired());
        classes.push(ClassStatus {
            class: key,
            vcpus: c.vcpus,
            memory_mib: c.memory_mib,
            pool_size: c.pool_size,
            idle,
            booting: live.len().saturating_sub(idle + claimed + retired),
            claimed,
        });
    }
    Ok(PoolStatus {
        pool_dir: config.pool_dir.clone(),
        serving,
        classes,
    })
}

/// `pid` and its descendants (children, their children...), read from
/// /proc: the processes a claim moves into the container's cgroup.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // The fields after the command name, which may hold anything.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_tree_holds_children_and_grandchildren() {
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30 & sleep 30; wait"])
            .spawn()
            .unwrap();
        let me = std::process::id();
        let mut tree = Vec::new();
        for _ in 0..200 {
            tree = process_tree(me);
            if tree.len() >= 4 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(tree[0], me);
        assert!(tree.contains(&child.id()), "{tree:?}");
        assert!(tree.len() >= 4, "sh and its two sleeps: {tree:?}");
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-P", &child.id().to_string()])
            .status();
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn classes_are_found_by_exact_size() {
        let c = Config {
            pool: vec![PoolClass {
                vcpus: 1,
                memory_mib: 192,
                pool_size: 1,
            }],
            ..Config::default()
        };
        assert!(class_of(&c, 1, 192).is_some());
        assert!(class_of(&c, 1, 193).is_none());
        assert!(class_of(&c, 2, 192).is_none());
    }
}
