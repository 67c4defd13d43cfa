//! Warming a booted guest before it has a tenant: one throwaway container
//! is created, started, waited for and removed, so that every code path a
//! container takes (the agent's planner, the fork, namespaces, mounts,
//! pivot_root, the device filter, exec, the reaper) has run once. Under an
//! emulator (QEMU's TCG) the first run of any code pays for translating
//! it, more than the work itself; a pooled sandbox pays that while it idles
//! instead of when it is claimed.
//!
//! The container's rootfs is a directory of the guest's own root with the
//! agent's binary bound in as its one program (run with `--version`): no
//! host path, no tenant data, nothing that outlives the call.

use crate::container::{ContainerError, Containers, ProcessStreams};
use crate::phases::Laps;
use std::collections::HashMap;
use std::path::Path;

/// The throwaway container's id (a tenant may use it later: it is gone).
const WARM_ID: &str = "husk-warm-up";
/// Where its rootfs is made, on the guest's own root (initramfs).
const WARM_DIR: &str = "/run/husk-warm-up";

/// Runs the throwaway container through create, start, wait and remove.
pub fn warm_up(containers: &Containers, laps: &mut Laps) -> Result<(), ContainerError> {
    let rootfs = Path::new(WARM_DIR).join("rootfs");
    let program = rootfs.join("warm");
    let io = |e: std::io::Error| ContainerError::Io(e);
    std::fs::create_dir_all(&rootfs).map_err(io)?;
    std::fs::write(&program, b"").map_err(io)?;
    let agent = std::env::current_exe().map_err(io)?;
    nix::mount::mount(
        Some(&agent),
        &program,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| io(e.into()))?;
    let result = run(containers, laps);
    let _ = nix::mount::umount2(&program, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(WARM_DIR);
    laps.lap("clean up");
    result
}

fn run(containers: &Containers, laps: &mut Laps) -> Result<(), ContainerError> {
    // What `runc spec` gives, less the terminal: the namespaces and mounts
    // a container usually asks for.
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/warm", "--version"],
            "env": ["PATH=/"],
            "cwd": "/",
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "warm",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"},
            ],
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
        },
    });
    let spec: oci_spec::runtime::Spec =
        serde_json::from_value(spec).map_err(|e| ContainerError::Parse(e.to_string()))?;
    laps.lap("spec");
    containers.create_at(
        WARM_ID,
        &spec,
        Path::new(WARM_DIR).join("rootfs"),
        &HashMap::new(),
        false,
        // A throwaway: the guest's own network namespace stays for the
        // tenant's container.
        false,
        "",
        ProcessStreams::default(),
        laps,
    )?;
    let started = containers.start(WARM_ID, laps);
    if started.is_ok() {
        let _ = containers.wait(WARM_ID, "", laps);
    }
    let removed = containers.remove(WARM_ID, true);
    laps.lap("remove");
    started.map(|_| ())?;
    removed
}
