//! Guest set-up done once by PID 1: the pseudo file systems, cgroup v2 with
//! its controllers delegated, and the sandbox's shared directory (virtio-fs).

use nix::mount::{mount, MsFlags};
use std::path::Path;

/// Where the virtio-fs share of the sandbox is mounted in the guest.
pub const SHARED_DIR: &str = "/run/husk/shared";
/// The virtio-fs tag the host gives the share.
pub const SHARED_TAG: &str = "husk";
/// Parent cgroup of all containers.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mounting {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        source: nix::Error,
    },
    #[error("creating {path}: {source}")]
    Mkdir {
        path: &'static str,
        source: std::io::Error,
    },
}

struct PseudoFs {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// Leaves the initramfs's root mount: pivot_root(2) refuses to move away
/// from the initial rootfs (it has no parent mount), so containers could not
/// pivot. A recursive bind of / moved onto / has a parent, and chroot makes
/// it the agent's root. Must run before anything else is mounted.
fn leave_initial_rootfs() -> Result<(), InitError> {
    let bind = |source: nix::Error| InitError::Mount {
        fstype: "bind",
        target: "/",
        source,
    };
    std::fs::create_dir_all("/newroot").map_err(|source| InitError::Mkdir {
        path: "/newroot",
        source,
    })?;
    mount(
        Some("/"),
        "/newroot",
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(bind)?;
    nix::unistd::chdir("/newroot").map_err(bind)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(bind)?;
    nix::unistd::chroot(".").map_err(bind)?;
    nix::unistd::chdir("/").map_err(bind)?;
    Ok(())
}

/// Mounts what the guest needs and enables the cgroup controllers.
pub fn setup_guest() -> Result<(), InitError> {
    leave_initial_rootfs()?;
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts = [
        PseudoFs {
            fstype: "proc",
            target: "/proc",
            flags: nodev,
            data: None,
        },
        PseudoFs {
            fstype: "sysfs",
            target: "/sys",
            flags: nodev,
            data: None,
        },
        PseudoFs {
            fstype: "devtmpfs",
            target: "/dev",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        PseudoFs {
            fstype: "devpts",
            target: "/dev/pts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("ptmxmode=0666,mode=0620"),
        },
        PseudoFs {
            fstype: "tmpfs",
            target: "/dev/shm",
            flags: nodev,
            data: Some("mode=1777"),
        },
        PseudoFs {
            fstype: "tmpfs",
            target: "/run",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        },
        PseudoFs {
            fstype: "tmpfs",
            target: "/tmp",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=1777"),
        },
        PseudoFs {
            fstype: "cgroup2",
            target: CGROUP_ROOT,
            flags: nodev,
            data: Some("nsdelegate"),
        },
    ];
    for m in &mounts {
        std::fs::create_dir_all(m.target).map_err(|source| InitError::Mkdir {
            path: m.target,
            source,
        })?;
        match mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) => {}
            // devtmpfs may already be mounted by the kernel.
            Err(nix::Error::EBUSY) => {}
            Err(source) => {
                return Err(InitError::Mount {
                    fstype: m.fstype,
                    target: m.target,
                    source,
                })
            }
        }
    }
    enable_cgroup_controllers();
    mount_shared_dir();
    // The guest's own loopback, up as a new namespace's is made: the
    // sandbox's network owner may take this namespace as its own.
    if let Err(e) = husk_agent::network::loopback_up_here() {
        eprintln!("husk-agent: warning: bringing up lo: {e}");
    }
    if let Err(e) = crate::tcp_buffers::raise_here() {
        eprintln!("husk-agent: warning: raising the TCP buffer ceilings: {e}");
    }
    Ok(())
}

/// Delegates every available controller to child cgroups, so each container
/// can get its own limits. A controller the kernel lacks is simply absent.
fn enable_cgroup_controllers() {
    let root = Path::new(CGROUP_ROOT);
    let Ok(available) = std::fs::read_to_string(root.join("cgroup.controllers")) else {
        eprintln!("husk-agent: warning: no cgroup.controllers in {CGROUP_ROOT}");
        return;
    };
    for controller in available.split_whitespace() {
        if let Err(e) = std::fs::write(
            root.join("cgroup.subtree_control"),
            format!("+{controller}"),
        ) {
            eprintln!("husk-agent: warning: enabling cgroup controller {controller}: {e}");
        }
    }
}

/// The sandbox's shared directory. A VM without the virtio-fs device (a bare
/// probe) still serves the API; container creation then reports the missing share.
fn mount_shared_dir() {
    if let Err(e) = std::fs::create_dir_all(SHARED_DIR) {
        eprintln!("husk-agent: warning: creating {SHARED_DIR}: {e}");
        return;
    }
    if let Err(e) = mount(
        Some(SHARED_TAG),
        SHARED_DIR,
        Some("virtiofs"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        eprintln!("husk-agent: warning: mounting virtio-fs tag {SHARED_TAG} on {SHARED_DIR}: {e}");
    }
}

/// True once the shared directory is a virtio-fs mount.
pub fn shared_dir_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(SHARED_DIR))
        })
        .unwrap_or(false)
}
