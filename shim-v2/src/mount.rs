//! Mounting the rootfs containerd hands over (`CreateTaskRequest.rootfs`).
//!
//! Hand-written rather than `containerd_shim::mount::mount_rootfs` (0.12),
//! which does not do the job in this shim: its synchronous version forks
//! and then blocks in `monitor::wait_pid` until the crate's own SIGCHLD
//! reaper (the one `containerd_shim::run` installs) reports the child's
//! exit. This shim serves ttrpc itself and waits for each of its children
//! (QEMU, virtiofsd, vhost-device-vsock) by pid, so nothing would ever
//! report it and CreateTask would hang; a `waitpid(-1)` reaper added for it
//! would steal those children's exits. The forked child also logs through
//! the process's logger after fork in a multithreaded process. The
//! fork-free version exists only with the crate's `async` feature, which
//! replaces the synchronous `Task` trait the service implements.

use nix::mount::{mount, MsFlags};
use std::path::Path;

/// Mounts one containerd mount (`type`, `source`, `options`) at `target`.
pub fn mount_one(typ: &str, source: &str, options: &[String], target: &Path) -> anyhow::Result<()> {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "suid" | "dev" | "exec" | "defaults" | "atime" => (MsFlags::empty(), MsFlags::empty()),
            _ => {
                data.push(o.as_str());
                continue;
            }
        };
        flags |= set;
        flags &= !clear;
    }
    let data = data.join(",");
    if data.len() >= 4000 {
        anyhow::bail!(
            "mount options of {typ} {source} are too long ({} bytes)",
            data.len()
        );
    }
    let fstype = if flags.contains(MsFlags::MS_BIND) {
        None
    } else {
        Some(typ)
    };
    let data_opt = (!data.is_empty()).then_some(data.as_str());
    mount(Some(source), target, fstype, flags, data_opt)
        .map_err(|e| anyhow::anyhow!("mount {typ} {source} on {}: {e}", target.display()))?;
    if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| anyhow::anyhow!("remount {} read-only: {e}", target.display()))?;
    }
    Ok(())
}
