//! A container's state on disk (`<root>/containers/<id>/state.json`) and how
//! liveness is read from it. One writer: `husk create` saves the first
//! record (status "creating", before the monitor exists); from then on only
//! the monitor changes it ([`update`]), and `husk delete` of a container
//! whose monitor is gone only removes it. A container whose monitor is gone
//! is stopped, whatever the file says, so `state` never hangs on a crashed
//! monitor.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The state machine is the supervisor's, shared with the shim.
pub use husk_runtime::supervisor::Status;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub bundle: PathBuf,
    pub status: Status,
    /// The host process standing for the container's process (state.pid).
    pub pid: i32,
    pub monitor_pid: i32,
    /// The monitor's start time (clock ticks after boot), so a reused pid
    /// is not mistaken for it.
    pub monitor_start: u64,
    pub created: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The container process's pid in the guest.
    #[serde(default)]
    pub guest_pid: u32,
    /// Why the container stopped, when it was not its process's own doing
    /// (the VMM or a device backend died).
    #[serde(default)]
    pub error: Option<String>,
    /// The spec's hooks, saved at create: poststart and poststop run from
    /// here, so a bundle removed or changed since does not skip them.
    #[serde(default)]
    pub hooks: Option<oci_spec::runtime::Hooks>,
    /// The client's network namespace whose interfaces the monitor wires
    /// to the VM, saved at create: a `delete` after a crashed monitor
    /// removes husk's taps and filters from it.
    #[serde(default)]
    pub network_namespace: Option<PathBuf>,
    /// The host cgroup directories the monitor created for the sandbox
    /// (from `linux.cgroupsPath`), saved as soon as they exist: a `delete`
    /// after a crashed monitor removes them once the VM's processes left.
    #[serde(default)]
    pub host_cgroup: Vec<PathBuf>,
}

/// Refuses an id that is not a plain name, as runc does ("invalid id
/// format"), before it is ever joined to a path: `../x`, `..`, `a/b`, an
/// empty or overlong id would otherwise name state outside the root.
pub fn check_id(id: &str) -> anyhow::Result<()> {
    if husk_runtime::sandbox::valid_id(id) {
        return Ok(());
    }
    // The id as the user gave it, but never raw control characters.
    let shown: String = id.chars().take(80).flat_map(char::escape_debug).collect();
    let more = if id.chars().count() > 80 { "…" } else { "" };
    bail!(
        "invalid id format: \"{shown}{more}\" (use 1-64 characters of [A-Za-z0-9_.-], not starting with . or -)"
    )
}

pub fn containers_dir(root: &Path) -> PathBuf {
    root.join("containers")
}

pub fn container_dir(root: &Path, id: &str) -> PathBuf {
    containers_dir(root).join(id)
}

pub fn sandbox_root(root: &Path) -> PathBuf {
    root.join("sandbox")
}

/// The monitor's control socket. It lives in the sandbox directory, whose
/// name is kept short enough for Unix socket addresses even for long ids.
pub fn monitor_socket(root: &Path, id: &str) -> PathBuf {
    husk_runtime::sandbox::sandbox_dir(&sandbox_root(root), id).join("monitor.sock")
}

/// The start time of a process (field 22 of /proc/<pid>/stat), if it lives.
pub fn process_start(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

impl ContainerState {
    pub fn load(root: &Path, id: &str) -> anyhow::Result<ContainerState> {
        let path = container_dir(root, id).join("state.json");
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("container {id} does not exist")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_slice(&text).with_context(|| format!("{}: corrupt state", path.display()))
    }

    pub fn save(&self, root: &Path) -> anyhow::Result<()> {
        let dir = container_dir(root, &self.id);
        let tmp = dir.join("state.json.tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(&serde_json::to_vec(self)?)
                .with_context(|| format!("writing {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, dir.join("state.json"))
            .with_context(|| format!("saving state of {}", self.id))
    }

    pub fn monitor_alive(&self) -> bool {
        process_start(self.monitor_pid) == Some(self.monitor_start)
    }

    /// The status as a client must see it.
    pub fn effective_status(&self) -> Status {
        if !self.monitor_alive() {
            return Status::Stopped;
        }
        self.status
    }

    /// The OCI state document.
    pub fn oci(&self) -> serde_json::Value {
        let status = self.effective_status();
        let pid = if status == Status::Stopped {
            0
        } else {
            self.pid
        };
        serde_json::json!({
            "ociVersion": "1.0.2",
            "id": self.id,
            "status": status.as_str(),
            "pid": pid,
            "bundle": self.bundle,
            "annotations": self.annotations,
        })
    }

    pub fn monitor_socket(&self, root: &Path) -> PathBuf {
        monitor_socket(root, &self.id)
    }
}

/// Create and delete of one id, serialised: an exclusive flock on
/// `<root>/containers/.ID.lock` (no id starts with a dot, so it never names
/// a container), held for the whole operation. A `delete` that arrives while
/// `create` is still booting the VM waits for it instead of tearing down a
/// sandbox being made; two `create`s of one id run one after the other.
/// The descriptor is close-on-exec: the monitor and the shadow never hold it.
pub struct LifecycleLock {
    _lock: husk_runtime::lockfile::HeldLock,
    path: PathBuf,
}

pub fn lifecycle_lock(root: &Path, id: &str) -> anyhow::Result<LifecycleLock> {
    check_id(id)?;
    let dir = containers_dir(root);
    husk_runtime::sandbox::private_dir_all(&dir)?;
    let path = dir.join(format!(".{id}.lock"));
    let lock = husk_runtime::lockfile::lock_exclusive(&path, true)
        .with_context(|| format!("locking {}", path.display()))?
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(LifecycleLock { _lock: lock, path })
}

impl LifecycleLock {
    /// Removes the lock file (the container is gone), then unlocks.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Updates the saved state under an exclusive lock.
pub fn update(
    root: &Path,
    id: &str,
    f: impl FnOnce(&mut ContainerState),
) -> anyhow::Result<ContainerState> {
    let lock_path = container_dir(root, id).join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("locking {}", lock_path.display()))?;
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", lock_path.display()))?;
    let mut state = ContainerState::load(root, id)?;
    f(&mut state);
    state.save(root)?;
    Ok(state)
}

pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_name_a_path_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/abs",
            "-x",
            ".hidden",
            "a b",
            "x\u{1b}[2J",
        ] {
            let e = check_id(bad).expect_err(bad).to_string();
            assert!(e.starts_with("invalid id format"), "{e}");
            assert!(!e.contains('\u{1b}'), "raw escape in {e:?}");
        }
        assert!(check_id(&"a".repeat(65)).is_err());
        assert!(check_id(&"a".repeat(64)).is_ok());
        assert!(check_id("web-1_a.b").is_ok());
    }

    #[test]
    fn rfc3339_has_the_right_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 30, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }

    #[test]
    fn own_process_is_alive_and_start_time_is_stable() {
        let me = std::process::id() as i32;
        assert!(process_start(me).is_some());
        assert_eq!(process_start(me), process_start(me));
        assert!(process_start(0).is_none());
    }
}
