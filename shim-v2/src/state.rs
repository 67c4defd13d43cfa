//! What a shim leaves on disk for `delete` to clean up after it died: a
//! record in the bundle naming the VM's directory.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Root of the shim's sandbox directories: `$HUSK_SHIM_ROOT`, else this.
pub const DEFAULT_ROOT: &str = "/run/husk/containerd";
const RECORD: &str = "husk-shim.json";

/// `<root>/<namespace>`: the state root of sandboxes of one namespace.
pub fn state_root(namespace: &str) -> PathBuf {
    let root = std::env::var_os("HUSK_SHIM_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    root.join(namespace)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    /// The VM's directory (`<state root>/<pod or container id>`).
    pub sandbox_dir: PathBuf,
    /// The shared directory of the VM.
    pub shared_dir: PathBuf,
    /// This container booted the VM (plain container or pod sandbox).
    pub owns_vm: bool,
    /// The shim mounted the rootfs at this path.
    pub rootfs_mount: Option<PathBuf>,
    /// The host cgroup directories the shim created for the VM (the pod's
    /// cgroup in each hierarchy and any parent it made), removed after a
    /// dead shim once the VM's processes are gone.
    #[serde(default)]
    pub host_cgroup: Vec<PathBuf>,
    /// The client's network namespace whose interfaces the shim wired to
    /// the VM: husk's taps and filters are removed from it after a dead
    /// shim.
    #[serde(default)]
    pub network_namespace: Option<PathBuf>,
}

pub fn write_record(bundle: &Path, record: &Record) -> anyhow::Result<()> {
    let text = serde_json::to_vec_pretty(record)?;
    std::fs::write(bundle.join(RECORD), text)?;
    Ok(())
}

pub fn remove_record(bundle: &Path) {
    let _ = std::fs::remove_file(bundle.join(RECORD));
}

/// Unmounts and removes what a dead shim left for container `id`. The VM's
/// processes died with the shim (they get SIGKILL when it dies).
pub fn cleanup_after_dead_shim(bundle: &Path, _namespace: &str, id: &str) -> anyhow::Result<()> {
    use husk_runtime::sandbox::{remove_tree_same_fs, unmount_below};
    let path = bundle.join(RECORD);
    let record: Record = match std::fs::read(&path) {
        Ok(text) => serde_json::from_slice(&text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // Every step is tried even when an earlier one failed: a directory that
    // will not go must not keep the host cgroup or the network wiring.
    let mut first_error: Option<anyhow::Error> = None;
    let mut note = |result: Result<(), husk_runtime::sandbox::SandboxError>| {
        if let Err(e) = result {
            first_error.get_or_insert(e.into());
        }
    };
    let container_dir = record.shared_dir.join(id);
    if container_dir.exists() {
        note(unmount_below(&container_dir).and_then(|()| remove_tree_same_fs(&container_dir)));
    }
    if record.owns_vm && record.sandbox_dir.exists() {
        // Give the VM's helpers a moment to die of their parent's death.
        std::thread::sleep(std::time::Duration::from_millis(200));
        husk_runtime::sandbox::remove_jail_of(&record.sandbox_dir);
        note(
            unmount_below(&record.sandbox_dir)
                .and_then(|()| remove_tree_same_fs(&record.sandbox_dir)),
        );
    }
    if let Some(rootfs) = &record.rootfs_mount {
        note(unmount_below(rootfs));
    }
    if record.owns_vm {
        husk_runtime::host_cgroup::remove_after_owner_died(&record.host_cgroup);
        if let Some(netns) = &record.network_namespace {
            husk_runtime::supervisor::network::unwire_after_crash(netns);
        }
    }
    match first_error {
        // The record stays: a second `shim delete` of this bundle (if
        // containerd has not removed it) tries every step again.
        Some(e) => Err(e),
        None => {
            remove_record(bundle);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A container directory that cannot be removed (an immutable file in
    /// it) must not keep the dead shim's host cgroup: every step runs, the
    /// error is still reported, and the record stays for a retry.
    #[test]
    fn a_directory_that_will_not_go_does_not_keep_the_host_cgroup() {
        let Some(hierarchy) = husk_runtime::host_cgroup::hierarchies().into_iter().next() else {
            panic!("no cgroup hierarchy is mounted on this host");
        };
        let base = std::env::temp_dir().join(format!("husk-shim-state-{}", std::process::id()));
        let bundle = base.join("bundle");
        let shared = base.join("shared");
        let stuck = shared.join("victim").join("stuck");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::create_dir_all(&stuck).unwrap();
        std::fs::write(stuck.join("file"), b"x").unwrap();
        let chattr = |flag: &str| {
            let ok = std::process::Command::new("chattr")
                .arg(flag)
                .arg(stuck.join("file"))
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chattr {flag} failed (needs root and e2fsprogs)");
        };
        chattr("+i");
        let cgroup = hierarchy.join(format!("husk-shim-state-test-{}", std::process::id()));
        std::fs::create_dir(&cgroup).unwrap();
        let record = Record {
            sandbox_dir: base.join("sandbox-that-is-gone"),
            shared_dir: shared.clone(),
            owns_vm: true,
            rootfs_mount: None,
            host_cgroup: vec![cgroup.clone()],
            network_namespace: None,
        };
        write_record(&bundle, &record).unwrap();
        let result = cleanup_after_dead_shim(&bundle, "ns", "victim");
        let cgroup_left = cgroup.exists();
        let record_left = bundle.join(RECORD).exists();
        chattr("-i");
        let _ = std::fs::remove_dir(&cgroup);
        std::fs::remove_dir_all(&base).unwrap();
        let err = result.expect_err("the stuck directory is reported");
        assert!(err.to_string().contains("stuck"), "{err:#}");
        assert!(!cgroup_left, "the host cgroup was left behind");
        assert!(record_left, "the record is kept for a retry");
    }
}
