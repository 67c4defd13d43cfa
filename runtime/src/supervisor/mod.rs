//! The supervisor: everything between a client's request and the sandbox
//! library that the CLI's monitor (`runtime/src/cli/monitor.rs`) and the
//! containerd shim (`shim-v2/src/service.rs`) have in common, written once.
//!
//! - [`bundle`]: the one bundle model (typed spec + the JSON passed on),
//!   bind mounts, the read-only rootfs, VM sizing;
//! - [`status`]: the container state machine both adapters move through;
//! - [`hooks`]: the four host hooks;
//! - [`network`]: the client's network namespace wired to the VM's taps;
//! - here: the host cgroup of a VM, sharing a container's files into its
//!   VM, and how a process's end is read from the guest.
//!
//! The adapters keep only what is theirs: the CLI's state file, shadow
//! process and stdio fds; the shim's task API, events and pods.

pub mod bundle;
pub mod hooks;
pub mod network;
pub mod status;

pub use bundle::{BindMount, Bundle, BundleError, VmSize};
pub use hooks::{HookError, HookKind};
pub use status::{Event, IllegalTransition, Next, Status};

use crate::config::Config;
use crate::host_cgroup::{HostCgroup, HostCgroupError};
use crate::sandbox::{Sandbox, SandboxError};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("config.json: mounts[{index}] ({destination}): {source}")]
    Mount {
        index: usize,
        destination: String,
        source: Box<SandboxError>,
    },
    #[error(transparent)]
    Sandbox(#[from] Box<SandboxError>),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error(transparent)]
    Cgroup(#[from] HostCgroupError),
    #[error(transparent)]
    Transition(#[from] IllegalTransition),
}

impl SupervisorError {
    /// The sandbox error underneath, for callers that classify by it.
    pub fn sandbox(&self) -> Option<&SandboxError> {
        match self {
            SupervisorError::Mount { source, .. } | SupervisorError::Sandbox(source) => {
                Some(source.as_ref())
            }
            _ => None,
        }
    }
}

/// What the guest needs to find a container's files in the share.
#[derive(Debug, Clone, Default)]
pub struct SharedFiles {
    /// The rootfs, relative to the shared directory.
    pub rootfs_rel: String,
    /// Destination in the container -> path relative to the shared directory.
    pub mounts: HashMap<String, String>,
}

/// Shares a container's rootfs (read-only on the host when `root.readonly`)
/// and its bind mounts into `sandbox`. Host-side only: no guest call. On
/// failure, whatever was shared for `id` is left for
/// [`Sandbox::unshare_container`].
pub fn share_container(
    sandbox: &Sandbox,
    id: &str,
    bundle: &Bundle,
) -> Result<SharedFiles, SupervisorError> {
    let readonly = bundle.readonly_rootfs();
    let rootfs_rel = sandbox
        .share_rootfs(id, &bundle.rootfs, readonly.as_deref())
        .map_err(Box::new)?;
    let mut mounts = HashMap::new();
    for m in bundle.bind_mounts() {
        let rel = sandbox
            .share_path(id, m.index, &m.source, m.mode)
            .map_err(|source| SupervisorError::Mount {
                index: m.index,
                destination: m.destination.clone(),
                source: Box::new(source),
            })?;
        mounts.insert(m.destination, rel);
    }
    Ok(SharedFiles { rootfs_rel, mounts })
}

/// The host cgroup of a VM-owning container: its `linux.cgroupsPath`,
/// created in every hierarchy, bounded by the VM's memory plus the host
/// overhead and the pids maximum, with `pids` (the supervising process
/// and whoever stands for the container) moved in before the VM's
/// helpers are spawned, so they inherit it and the cgroup's memory counts
/// the VM. With `cpu_limits`, the container's CPU limits are mirrored on
/// it (a plain container; a pod's sandbox container carries the pause
/// process's limits, not the pod's, which kubelet sets on the parent).
/// None when the spec names no cgroup.
pub fn sandbox_cgroup(
    bundle: &Bundle,
    size: VmSize,
    config: &Config,
    cpu_limits: bool,
    pids: &[u32],
) -> Result<Option<HostCgroup>, HostCgroupError> {
    let Some(path) = bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.display().to_string())
        .filter(|p| !p.is_empty())
    else {
        return Ok(None);
    };
    let cg = HostCgroup::create(&path)?;
    let result = (|| {
        if cpu_limits {
            if let Some(cpu) = bundle
                .spec
                .linux()
                .as_ref()
                .and_then(|l| l.resources().as_ref())
                .and_then(|r| r.cpu().as_ref())
            {
                cg.mirror_cpu(cpu)?;
            }
        }
        let host_mib =
            u64::from(size.memory_mib).saturating_add(u64::from(config.host_overhead_mib));
        cg.limit_sandbox(host_mib.saturating_mul(1 << 20), config.host_pids_max)?;
        for pid in pids {
            cg.add(*pid)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(Some(cg)),
        Err(e) => {
            let mut cg = cg;
            cg.remove(std::process::id());
            Err(e)
        }
    }
}

/// How a process ended, as the host records it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessEnd {
    /// The shell's way: the exit code, or 128 + the signal.
    pub code: i32,
    /// The signal that killed it, 0 if none.
    pub signal: i32,
    pub oom_killed: bool,
    /// The guest's time of the exit (Unix ns), 0 if unknown.
    pub exited_at_unix_ns: u64,
    /// Why it ended when it was not its own doing (the VM died).
    pub cause: Option<String>,
    /// The guest's steps from the end to its answer (display only).
    pub guest_phases: crate::phases::Phases,
}

impl ProcessEnd {
    /// The end of a process in a VM that is gone: SIGKILL, with the cause.
    pub fn vm_gone(cause: String) -> ProcessEnd {
        ProcessEnd {
            code: 128 + libc::SIGKILL,
            signal: libc::SIGKILL,
            oom_killed: false,
            exited_at_unix_ns: 0,
            cause: Some(cause),
            guest_phases: Default::default(),
        }
    }

    /// Never started: "killed" by `signal` before it ran.
    pub fn killed_before_start(signal: i32) -> ProcessEnd {
        ProcessEnd {
            code: 128 + signal,
            signal,
            oom_killed: false,
            exited_at_unix_ns: 0,
            cause: None,
            guest_phases: Default::default(),
        }
    }
}

/// Waits in the guest for a process's end, through `agent` (a connection
/// that no one else blocks on). A failed wait means the VM or its agent is
/// gone: the process is reported killed, with `explain`'s cause. The
/// guest's numbers are not trusted: [`crate::agent::ProcessExit`] checks
/// them.
pub fn wait_process_end(
    agent: &crate::agent::AgentClient,
    id: &str,
    exec_id: &str,
    explain: impl FnOnce(crate::agent::AgentError) -> String,
) -> ProcessEnd {
    match agent.wait_process(id, exec_id) {
        Ok(r) => {
            let exit = crate::agent::ProcessExit::from_guest(r.exit_code, r.signal);
            ProcessEnd {
                code: exit.code,
                signal: exit.signal,
                oom_killed: r.oom_killed,
                exited_at_unix_ns: r.exited_at_unix_ns,
                cause: None,
                guest_phases: {
                    let mut p = crate::phases::Phases::default();
                    p.push_guest("guest: ", r.phases.iter().map(|s| (s.name.as_str(), s.ns)));
                    p
                },
            }
        }
        Err(e) => ProcessEnd::vm_gone(explain(e)),
    }
}
