//! A sandbox: one microVM with its device backends, the agent client and a
//! directory on disk, holding one or more containers.
//!
//! Directory layout (`<state_root>/<id>/`, 0700): `host/` and `shared/` (the
//! share: mounts are made in `host/<cid>/`, virtiofsd exports the read-only
//! view `shared/`; see `share`), `vhost-fs.sock`, `vsock.sock` (a link to
//! the hybrid vsock socket in the jailed backend's directory, see `jail`),
//! `api.sock` (husk-vmm), `console.log`, `vmm.log`, `virtiofsd.log`,
//! `vsock.log`.

use crate::agent::{new_token, AgentClient, AgentError};
use crate::backends::{
    log_tail, virtiofs, virtiofs::VirtioFsBackend, vsock::VsockBackend, BackendError,
};
use crate::child::HelperProcess;
use crate::config::Config;
use crate::console::ConsoleLog;
use crate::event::{EventError, Flag, PidFd};
use crate::hypervisor::{self, HypervisorError, VmConfig};
use crate::jail::JailRoot;
use crate::share::{ReadOnly, Share};
use crate::stream_pump;
use husk_protocol::agent::{CreateContainerRequest, Stdio as StdioTokens, WaitProcessResponse};
use husk_protocol::{StreamKind, GUEST_CID};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default parent of sandbox directories.
pub const DEFAULT_STATE_ROOT: &str = "/run/husk/sandbox";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox id {0:?} is invalid: use 1-64 characters of [A-Za-z0-9_.-], not starting with . or -")]
    InvalidId(String),
    #[error("sandbox {0} already exists")]
    Exists(String),
    #[error("shared directory {0} does not exist")]
    MissingSharedDir(PathBuf),
    #[error(transparent)]
    Artifact(#[from] crate::artifacts::ArtifactError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("{name} (pid {pid}) {status}{detail}")]
    ComponentDied {
        name: &'static str,
        pid: u32,
        status: String,
        detail: String,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("the guest agent did not start within {timeout:?}; console: {console}")]
    AgentNotStarted { timeout: Duration, console: String },
    #[error("the guest agent did not answer within {timeout:?} (last attempt: {last}); console: {console}; vsock backend: {vsock}")]
    AgentNotReady {
        timeout: Duration,
        last: String,
        console: String,
        vsock: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("container rootfs {0} does not exist")]
    MissingRootfs(PathBuf),
    #[error("cleaning up {path}: {reason}")]
    Cleanup { path: PathBuf, reason: String },
    #[error(transparent)]
    Share(#[from] crate::share::ShareError),
    #[error("this sandbox exports a directory it was given: containers cannot be shared into it")]
    NoShare,
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
    #[error(transparent)]
    Event(#[from] EventError),
}

/// The part of starting a sandbox that failed, named in a boot's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootPhase {
    /// Preparing the directory, jail, share or artifacts.
    Setup,
    /// Starting a device backend (virtiofsd, the vsock backend).
    Backend,
    /// Starting or running the VMM.
    Vmm,
    /// The guest agent never announced itself.
    AgentStart,
    /// The guest agent announced itself but never answered the host.
    AgentNotReady,
}

impl std::fmt::Display for BootPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootPhase::Setup => "setting up the sandbox",
            BootPhase::Backend => "device backend",
            BootPhase::Vmm => "VMM",
            BootPhase::AgentStart => "guest agent did not start",
            BootPhase::AgentNotReady => "guest agent not ready",
        })
    }
}

impl SandboxError {
    /// The phase of [`Sandbox::start`] this error ends.
    pub fn boot_phase(&self) -> BootPhase {
        match self {
            SandboxError::Backend(_) => BootPhase::Backend,
            SandboxError::Hypervisor(_) => BootPhase::Vmm,
            SandboxError::ComponentDied { name, .. } if *name == "qemu" || *name == "husk-vmm" => {
                BootPhase::Vmm
            }
            SandboxError::ComponentDied { .. } => BootPhase::Backend,
            SandboxError::AgentNotStarted { .. } => BootPhase::AgentStart,
            SandboxError::AgentNotReady { .. } | SandboxError::Agent(_) => BootPhase::AgentNotReady,
            _ => BootPhase::Setup,
        }
    }

    /// The ttrpc status code a front end reports this error with, by its
    /// kind (an agent's error keeps the agent's kind).
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            SandboxError::InvalidId(_) => Code::INVALID_ARGUMENT,
            SandboxError::Exists(_) => Code::ALREADY_EXISTS,
            SandboxError::MissingSharedDir(_) | SandboxError::MissingRootfs(_) => Code::NOT_FOUND,
            SandboxError::Agent(e) => e.code(),
            SandboxError::ComponentDied { .. }
            | SandboxError::AgentNotStarted { .. }
            | SandboxError::AgentNotReady { .. } => Code::UNAVAILABLE,
            SandboxError::NoShare => Code::FAILED_PRECONDITION,
            SandboxError::Artifact(_)
            | SandboxError::Backend(_)
            | SandboxError::Hypervisor(_)
            | SandboxError::Io { .. }
            | SandboxError::Cleanup { .. }
            | SandboxError::Share(_)
            | SandboxError::Jail(_)
            | SandboxError::Console(_)
            | SandboxError::Event(_) => Code::INTERNAL,
        }
    }
}

/// A container to create in a sandbox's guest.
pub struct NewContainer {
    pub id: String,
    /// config.json as the client gave it.
    pub spec_json: Vec<u8>,
    /// The rootfs, relative to the shared directory (from `share_rootfs`).
    pub rootfs_rel: String,
    /// Destination in the container -> path relative to the shared directory.
    pub shared_mounts: HashMap<String, String>,
    pub stdio: StdioTokens,
    /// runc's --no-pivot.
    pub no_pivot: bool,
    /// The bundle's host path (for the state the in-guest hooks read).
    pub bundle: PathBuf,
    /// The container owns the sandbox's network: where its spec asks for a
    /// new network namespace it takes the guest's own, where the VM's
    /// virtio-net devices already are (no namespace made, no device
    /// moved). For the sandbox's first container only (the agent grants
    /// it once).
    pub guest_network_namespace: bool,
}

impl NewContainer {
    /// The agent's CreateContainer request for this container (for a
    /// caller that makes the RPC without holding the sandbox).
    pub fn into_request(self) -> CreateContainerRequest {
        CreateContainerRequest {
            no_pivot: self.no_pivot,
            guest_network_namespace: self.guest_network_namespace,
            bundle: self.bundle.display().to_string(),
            container_id: self.id,
            oci_spec_json: self.spec_json,
            rootfs: self.rootfs_rel,
            stdio: Some(self.stdio).into(),
            shared_mounts: self.shared_mounts,
            ..Default::default()
        }
    }
}

/// How a sandbox is made.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub id: String,
    pub state_root: PathBuf,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Share this existing directory instead of the sandbox's own `shared/`.
    pub shared_dir: Option<PathBuf>,
    /// Taps the VM gets as virtio-net devices (see [`crate::network`]).
    pub network: Vec<crate::network::VmTap>,
}

impl SandboxConfig {
    pub fn new(id: &str, config: &Config) -> Self {
        SandboxConfig {
            id: id.to_string(),
            state_root: PathBuf::from(DEFAULT_STATE_ROOT),
            memory_mib: config.default_memory_mib,
            vcpus: config.default_vcpus,
            shared_dir: None,
            network: Vec::new(),
        }
    }
}

/// Where the time of a sandbox start went.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// Spawning virtiofsd and the vsock backend until their sockets exist.
    pub backends_ms: f64,
    /// From spawning the VMM to the guest kernel starting (host time to
    /// agent ready minus the guest's own boot-to-ready).
    pub vmm_start_ms: f64,
    /// Guest kernel start to agent serving, on the guest's clock (the boot
    /// marker the agent reports).
    pub kernel_boot_to_agent_ms: f64,
    /// VMM spawn to the first answered RPC, on the host's clock.
    pub vmm_spawn_to_agent_ms: f64,
    /// The first Health RPC's round trip.
    pub first_rpc_ms: f64,
    /// Everything: from the start call to a sandbox ready for work.
    pub total_start_ms: f64,
}

impl Timings {
    /// The start's steps, for `husk --debug` and `make bench`: the host's
    /// set-up, the backends, the VMM up to the guest kernel (host clock
    /// less the guest's), the guest's boot to its agent (guest clock).
    pub fn phases(&self) -> crate::phases::Phases {
        use crate::phases::Clock;
        let d = |ms: f64| Duration::from_secs_f64(ms.max(0.0) / 1000.0);
        let mut p = crate::phases::Phases::default();
        let setup = self.total_start_ms - self.backends_ms - self.vmm_spawn_to_agent_ms;
        p.push(Clock::Host, "  sandbox: dir, share, jail", d(setup));
        p.push(Clock::Host, "  sandbox: backends", d(self.backends_ms));
        p.push(
            Clock::Host,
            "  sandbox: VMM spawn to guest kernel",
            d(self.vmm_start_ms),
        );
        p.push(
            Clock::Guest,
            "  sandbox: kernel to agent ready",
            d(self.kernel_boot_to_agent_ms),
        );
        p
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Host ends of a container process's stdio.
#[derive(Default)]
pub struct HostStdio {
    pub stdin: Option<Box<dyn Read + Send>>,
    pub stdout: Option<Box<dyn Write + Send>>,
    pub stderr: Option<Box<dyn Write + Send>>,
    pub terminal: bool,
}

/// Output pumps of a started process; join them to be sure every byte the
/// process wrote has been delivered.
pub struct StdioPumps {
    outputs: Vec<JoinHandle<()>>,
    /// The stdin stream (a second handle on the pump's socket), shut down
    /// once the process's output has ended: the stdin pump may be blocked
    /// on it for good (a guest that never acknowledges what it took, or
    /// never reads), and nothing it would send can reach a process that is
    /// gone. The pump then ends and lets go of the caller's stdin.
    stdin: Option<stream_pump::StdinStop>,
}

impl StdioPumps {
    pub fn finish(self) {
        for h in self.outputs {
            let _ = h.join();
        }
        if let Some(stdin) = self.stdin {
            stdin.stop();
        }
    }
}

pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    /// What virtiofsd exports (the guest's view of the share).
    shared_dir: PathBuf,
    /// The thread copying the console into `console_log`, capped.
    console: Option<ConsoleLog>,
    /// The uid its jailed backend runs as, and that backend's directory.
    jail: Option<(crate::jail::JailId, PathBuf)>,
    /// The share this sandbox made (None when the caller gave a directory
    /// to export as it is, as `husk check --shared-dir` does).
    share: Option<Share>,
    pub hypervisor: &'static str,
    pub acceleration: &'static str,
    pub hypervisor_reason: String,
    vm: Option<HelperProcess>,
    fs: Option<VirtioFsBackend>,
    vsock: Option<VsockBackend>,
    agent: Option<AgentClient>,
    /// A pooled sandbox's connection to its agent made for its tenant while
    /// it idles (see `park_agent`), handed over at the claim.
    parked_agent: Option<std::os::unix::net::UnixStream>,
    pub timings: Timings,
    console_log: PathBuf,
    /// Raised when the sandbox is torn down: ends the waits of its
    /// `DeathWatch`es.
    teardown: Flag,
    cleaned: bool,
}

/// Which component of a sandbox died (see `DeathWatch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentDeath {
    pub name: &'static str,
    pub pid: u32,
}

/// Learns of the death of a sandbox's VMM or device backends without the
/// sandbox: it owns its own pidfds of them, so a thread can block on it
/// while others hold (or tear down) the sandbox.
#[derive(Debug)]
pub struct DeathWatch {
    components: Vec<(&'static str, PidFd)>,
    /// Which deaths were reported: each is reported once, so a caller that
    /// waits again waits for the others (a pidfd stays readable).
    reported: Vec<std::sync::atomic::AtomicBool>,
    teardown: Flag,
}

impl DeathWatch {
    /// Blocks until a component dies (Some; `Sandbox::check_components`
    /// then has its status and logs at once) or the sandbox is torn down
    /// (None: a component that dies then is being stopped). Each death is
    /// reported once.
    pub fn wait(&self) -> Result<Option<ComponentDeath>, EventError> {
        self.wait_until(None)
    }

    /// As `wait`, but also None once `deadline` passes.
    pub fn wait_until(
        &self,
        deadline: Option<Instant>,
    ) -> Result<Option<ComponentDeath>, EventError> {
        use std::os::fd::AsFd;
        use std::sync::atomic::Ordering;
        let mut fds = vec![self.teardown.as_fd()];
        let mut which = Vec::new();
        for (i, (_, pidfd)) in self.components.iter().enumerate() {
            if !self.reported[i].load(Ordering::Relaxed) {
                fds.push(pidfd.as_fd());
                which.push(i);
            }
        }
        Ok(match crate::event::wait_any(&fds, deadline)? {
            Some(f) if f > 0 => {
                let i = which[f - 1];
                if self.reported[i].swap(true, Ordering::Relaxed) {
                    // Another thread reported this one meanwhile.
                    return self.wait_until(deadline);
                }
                let (name, pidfd) = &self.components[i];
                Some(ComponentDeath {
                    name,
                    pid: pidfd.pid(),
                })
            }
            _ => None,
        })
    }
}

/// The longest socket name in a sandbox directory.
const LONGEST_SOCKET: &str = "vhost-vsock.sock";
/// sun_path holds 108 bytes with the NUL.
const MAX_SOCKET_PATH: usize = 107;

/// The directory of sandbox `id` under `state_root`: named after the id,
/// unless its sockets would not fit in a Unix socket address (long ids such
/// as podman's 64 hex digits under a long root); then a prefix of the id and
/// a hash of all of it, so every caller finds the same directory.
/// FNV-1a, 64 bits: a short, stable name for a long id (not a defence: the
/// ids it names are checked before they get here).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

pub fn sandbox_dir(state_root: &Path, id: &str) -> PathBuf {
    let plain = state_root.join(id);
    if plain.join(LONGEST_SOCKET).as_os_str().len() <= MAX_SOCKET_PATH {
        return plain;
    }
    let hash = fnv1a(id.as_bytes());
    let prefix: String = id.chars().take(8).collect();
    state_root.join(format!("{prefix}-{hash:016x}"))
}

/// Creates `dir` (and its missing parents) as root's alone: 0700 whatever
/// the caller's umask, as runc makes its state root. Sockets, state and
/// logs below it are then out of reach of other users.
pub fn private_dir_all(dir: &Path) -> Result<(), SandboxError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let existed = dir.is_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| SandboxError::Io {
            what: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
    if !existed {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| SandboxError::Io {
                what: "setting the mode of",
                path: dir.to_path_buf(),
                source,
            },
        )?;
    }
    Ok(())
}

/// `[A-Za-z0-9_.-]{1,64}`, not starting with `.` or `-` (so never `..`).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['.', '-'])
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl Sandbox {
    /// Boots a sandbox and waits for its agent. On failure nothing is left
    /// behind: processes are killed and the directory removed.
    pub fn start(config: &Config, sc: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        let t0 = Instant::now();
        if !valid_id(&sc.id) {
            return Err(SandboxError::InvalidId(sc.id.clone()));
        }
        if let Some(shared) = &sc.shared_dir {
            if !shared.is_dir() {
                return Err(SandboxError::MissingSharedDir(shared.clone()));
            }
        }
        // Check every input before creating anything.
        let kernel = crate::artifacts::kernel(config.kernel.as_deref())?;
        let initramfs = crate::artifacts::initramfs(config.initramfs.as_deref())?;
        let virtiofsd = crate::artifacts::virtiofsd(config.virtiofsd.as_deref())?;
        let vsock_backend = crate::artifacts::vsock_backend(config.vsock_backend.as_deref())?;
        let selection = hypervisor::select(config.hypervisor, config)?;
        if !sc.network.is_empty() && !selection.hypervisor.has_virtio_net() {
            return Err(HypervisorError::NoVirtioNet(selection.hypervisor.name()).into());
        }

        let dir = sandbox_dir(&sc.state_root, &sc.id);
        private_dir_all(&sc.state_root)?;
        let made = {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(&dir)
        };
        match made {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists(sc.id.clone()))
            }
            Err(source) => {
                return Err(SandboxError::Io {
                    what: "creating",
                    path: dir,
                    source,
                })
            }
        }
        if let Err(source) = mount_sandbox_fs(&dir) {
            let _ = std::fs::remove_dir(&dir);
            return Err(SandboxError::Io {
                what: "mounting the sandbox's own file system on",
                path: dir,
                source,
            });
        }
        let (shared_dir, owns_shared_dir) = match &sc.shared_dir {
            Some(d) => (d.clone(), false),
            None => (Share::at(&dir).guest_view().to_path_buf(), true),
        };
        let mut sandbox = Sandbox {
            id: sc.id.clone(),
            dir: dir.clone(),
            shared_dir: shared_dir.clone(),
            share: None,
            console: None,
            jail: None,
            hypervisor: selection.hypervisor.name(),
            acceleration: selection.hypervisor.acceleration(),
            hypervisor_reason: selection.reason.clone(),
            vm: None,
            fs: None,
            vsock: None,
            agent: None,
            parked_agent: None,
            timings: Timings::default(),
            console_log: dir.join("console.log"),
            teardown: Flag::new()?,
            cleaned: false,
        };
        // From here on, dropping `sandbox` cleans up whatever was made.
        if owns_shared_dir {
            sandbox.share = Some(Share::create(&dir)?);
        }
        let tb = Instant::now();
        // Both backends start before either is waited for.
        sandbox.fs = Some(VirtioFsBackend::start(
            &virtiofsd,
            &shared_dir,
            &dir.join("vhost-fs.sock"),
            &config.virtiofs_cache,
            &dir.join("virtiofsd.log"),
        )?);
        let (uid, vsock_dir) = sandbox.claim_jail(config)?;
        let vsock_jail = crate::jail::Jail::for_backend(uid)?.isolated().with_root(
            &JailRoot::system()
                .read_only(&vsock_backend)
                .writable(&vsock_dir),
            &sandbox.jail_root_dir("vsock")?,
        )?;
        sandbox.vsock = Some(VsockBackend::start(
            &vsock_backend,
            GUEST_CID,
            &vsock_dir.join("vhost-vsock.sock"),
            &vsock_dir.join("vsock.sock"),
            &dir.join("vsock.log"),
            Some(vsock_jail),
        )?);
        if let Some(fs) = sandbox.fs.as_mut() {
            fs.wait_ready(&dir.join("virtiofsd.log"))?;
        }
        if let Some(vsock) = sandbox.vsock.as_mut() {
            vsock.wait_ready(&dir.join("vsock.log"))?;
        }
        sandbox.lock_jail_dir(&vsock_dir)?;
        sandbox.timings.backends_ms = ms(tb.elapsed());

        // no_timer_check: the kernel's IO-APIC timer check counts timer
        // ticks during a short busy-wait; a guest starved of host CPU (many
        // VMs booting at once, under TCG) misses them, reports "MP-BIOS bug:
        // 8254 timer not connected to IO-APIC" and stalls in fallbacks. The
        // VMM's timer is known to work, so the check only costs (Kata passes
        // the same).
        // rcupdate.rcu_expedited=1: the guest kernel waits for RCU grace
        // periods in what containers are made of (namespaces made and
        // left, mounts and pivot_root's unmount, cgroup moves, a network
        // device moved between namespaces); expedited, a grace period on
        // the guest's few vCPUs is a short IPI round instead of timer ticks.
        // Measured under TCG: create, exit and delete each a few tens of
        // ms shorter (Kata passes the same).
        let mut cmdline = String::from(
            "console=ttyS0 reboot=t panic=-1 quiet no_timer_check rcupdate.rcu_expedited=1",
        );
        if !config.kernel_params.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&config.kernel_params);
        }
        // The VMM writes the console into a FIFO; a thread here copies it
        // into console.log, capped (see `console`).
        let console = ConsoleLog::start(
            &dir.join("console.fifo"),
            &sandbox.console_log,
            crate::console::CONSOLE_CAP,
            READY_MARKER,
        )?;
        let console_fifo = console.fifo().to_path_buf();
        sandbox.console = Some(console);
        let vm_config = VmConfig {
            kernel,
            initramfs,
            cmdline,
            memory_mib: sc.memory_mib,
            vcpus: sc.vcpus,
            fs_socket: dir.join("vhost-fs.sock"),
            fs_tag: virtiofs::TAG.to_string(),
            vsock_socket: vsock_dir.join("vhost-vsock.sock"),
            guest_cid: GUEST_CID,
            console_log: console_fifo,
            vmm_log: dir.join("vmm.log"),
            net_devices: sc.network.iter().map(|t| t.vm_device()).collect(),
        };
        let vmm_jail = sandbox.vmm_jail(uid, &vm_config, selection.hypervisor.as_ref())?;
        let tv = Instant::now();
        sandbox.vm = Some(selection.hypervisor.launch(&vm_config, vmm_jail)?);
        let uds = dir.join("vsock.sock");
        let timeout = Duration::from_secs(config.boot_timeout_secs);
        // vhost-device-vsock 0.3 loses a host connection made before the
        // guest driver set up its queues, and then answers no CONNECT again:
        // connect only once the agent has announced itself on the console
        // (it listens on vsock by then, so its driver is up).
        sandbox.wait_for_ready(timeout)?;
        let agent = {
            let sb = &mut sandbox;
            AgentClient::connect(&uds, timeout, || {
                sb.check_components().map_err(|e| e.to_string())
            })
        };
        let agent = match agent {
            Ok(a) => a,
            Err(AgentError::NotReady(timeout, last)) => {
                return Err(SandboxError::AgentNotReady {
                    timeout,
                    last,
                    console: log_tail(&sandbox.console_log),
                    vsock: log_tail(&dir.join("vsock.log")),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let tr = Instant::now();
        let health = agent.health()?;
        sandbox.timings.first_rpc_ms = ms(tr.elapsed());
        let host_ready = tv.elapsed();
        sandbox.timings.vmm_spawn_to_agent_ms = ms(host_ready);
        sandbox.timings.kernel_boot_to_agent_ms = health.ready_boottime_ns as f64 / 1e6;
        sandbox.timings.vmm_start_ms =
            (ms(host_ready) - sandbox.timings.kernel_boot_to_agent_ms).max(0.0);
        sandbox.agent = Some(agent);
        sandbox.timings.total_start_ms = ms(t0.elapsed());
        Ok(sandbox)
    }

    /// The agent of a running sandbox.
    pub fn agent(&self) -> &AgentClient {
        // Only a started sandbox is ever handed out.
        self.agent
            .as_ref()
            .unwrap_or_else(|| unreachable!("sandbox without agent"))
    }

    /// A handle on the agent for another thread (e.g. one blocked in
    /// WaitProcess while others keep calling).
    pub fn agent_client(&self) -> AgentClient {
        self.agent().clone()
    }

    pub fn shared_dir(&self) -> &Path {
        &self.shared_dir
    }

    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    pub fn vm_pid(&self) -> Option<u32> {
        self.vm.as_ref().map(HelperProcess::pid)
    }

    /// Pids of the device backends (virtiofsd, vsock backend).
    pub fn backend_pids(&self) -> Vec<(&'static str, u32)> {
        let mut pids = Vec::new();
        if let Some(fs) = &self.fs {
            pids.push((fs.process.name, fs.process.pid()));
        }
        if let Some(v) = &self.vsock {
            pids.push((v.process.name, v.process.pid()));
        }
        pids
    }

    /// Reports the first component (VMM or backend) that has died.
    pub fn check_components(&mut self) -> Result<(), SandboxError> {
        let console = self.console_log.clone();
        let dir = self.dir.clone();
        let mut parts: Vec<(&mut HelperProcess, PathBuf)> = Vec::new();
        if let Some(vm) = self.vm.as_mut() {
            parts.push((vm, dir.join("vmm.log")));
        }
        if let Some(fs) = self.fs.as_mut() {
            parts.push((&mut fs.process, dir.join("virtiofsd.log")));
        }
        if let Some(v) = self.vsock.as_mut() {
            parts.push((&mut v.process, dir.join("vsock.log")));
        }
        for (p, log) in parts {
            if let Some(status) = p.ended() {
                let mut detail = format!("; its log: {}", log_tail(&log));
                if p.name == "qemu" || p.name == "husk-vmm" {
                    detail.push_str(&format!("; console: {}", log_tail(&console)));
                }
                return Err(SandboxError::ComponentDied {
                    name: p.name,
                    pid: p.pid(),
                    status,
                    detail,
                });
            }
        }
        Ok(())
    }

    /// Turns an agent error into the cause the user needs: a dead component
    /// explains a failed RPC better than the RPC error does.
    pub fn explain(&mut self, e: AgentError) -> SandboxError {
        // A VMM killed mid-call may exit a moment after the call failed:
        // wait a little for a death (woken by it at once).
        if let Ok(watch) = self.death_watch() {
            let _ = watch.wait_until(Some(Instant::now() + Duration::from_millis(100)));
        }
        if let Err(dead) = self.check_components() {
            return dead;
        }
        SandboxError::Agent(e)
    }

    /// A watch on the death of the VMM and the backends running now, for a
    /// thread that does not hold the sandbox (see `DeathWatch`).
    pub fn death_watch(&self) -> Result<DeathWatch, SandboxError> {
        let mut components = Vec::new();
        let procs = [
            self.vm.as_ref(),
            self.fs.as_ref().map(|f| &f.process),
            self.vsock.as_ref().map(|v| &v.process),
        ];
        for p in procs.into_iter().flatten() {
            components.push((p.name, p.pidfd().try_clone()?));
        }
        Ok(DeathWatch {
            reported: components.iter().map(|_| Default::default()).collect(),
            components,
            teardown: self.teardown.try_clone()?,
        })
    }

    /// Waits for the agent's ready line on the console (raised by the
    /// console's copy) or the death of the VMM or a backend, whichever
    /// comes first, up to `timeout`.
    fn wait_for_ready(&mut self, timeout: Duration) -> Result<(), SandboxError> {
        use std::os::fd::AsFd;
        let deadline = Instant::now() + timeout;
        let watch = self.death_watch()?;
        let Some(console) = self.console.as_ref() else {
            return Err(SandboxError::AgentNotStarted {
                timeout,
                console: "(no console)".into(),
            });
        };
        let ready = console.marker_seen().try_clone()?;
        let mut fds = vec![ready.as_fd()];
        fds.extend(watch.components.iter().map(|(_, p)| p.as_fd()));
        let woken = crate::event::wait_any(&fds, Some(deadline))?;
        if woken == Some(0) {
            return Ok(());
        }
        self.check_components()
            .map_err(|e| SandboxError::Agent(AgentError::Aborted(e.to_string())))?;
        // Woken by a death not yet reapable is not expected (a pidfd is
        // readable once the process has exited): report what was seen.
        match woken {
            Some(i) => {
                let (name, pidfd) = &watch.components[i - 1];
                Err(SandboxError::Agent(AgentError::Aborted(format!(
                    "{name} (pid {}) exited",
                    pidfd.pid()
                ))))
            }
            None => Err(SandboxError::AgentNotStarted {
                timeout,
                console: log_tail(&self.console_log),
            }),
        }
    }

    /// Claims this sandbox's jail uid and makes the directory its jailed
    /// vsock backend owns, `<JAIL_ROOT>/<uid>`.
    fn claim_jail(&mut self, config: &Config) -> Result<(u32, PathBuf), SandboxError> {
        use crate::jail::{JailId, JAIL_ROOT};
        let root = Path::new(JAIL_ROOT);
        let id = JailId::claim(
            &root.join("uids"),
            config.jail_uid_base,
            config.jail_uid_count,
            &self.dir,
        )?;
        let uid = id.uid;
        // Whatever a crashed sandbox's helpers forked under this uid.
        crate::jail::kill_uid(uid)?;
        let dir = root.join(uid.to_string());
        self.jail = Some((id, dir.clone()));
        // Searchable by the jailed uids, listable by nobody but root.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711));
        }
        // A directory a crashed sandbox left under this uid goes first.
        let _ = std::fs::remove_dir_all(&dir);
        crate::jail::own_dir(&dir, uid)?;
        Ok((uid, dir))
    }

    /// An empty directory in the sandbox's own that becomes the root of a
    /// jailed helper (in the helper's mount namespace only).
    fn jail_root_dir(&self, helper: &str) -> Result<PathBuf, SandboxError> {
        let d = self.dir.join(format!("root-{helper}"));
        std::fs::create_dir(&d).map_err(|source| SandboxError::Io {
            what: "creating",
            path: d.clone(),
            source,
        })?;
        Ok(d)
    }

    /// The VMM's jail: the sandbox's uid, namespaces of its own, and a root
    /// holding the kernel, the initramfs, the two vhost-user sockets, the
    /// console FIFO and (with KVM) its own /dev/kvm. The sockets and the
    /// FIFO become the jailed uid's to connect to and write.
    fn vmm_jail(
        &self,
        uid: u32,
        vm: &VmConfig,
        hypervisor: &dyn hypervisor::Hypervisor,
    ) -> Result<crate::jail::Jail, SandboxError> {
        for own in [&vm.fs_socket, &vm.console_log] {
            std::os::unix::fs::lchown(own, Some(uid), Some(uid)).map_err(|source| {
                SandboxError::Io {
                    what: "giving the VMM",
                    path: own.clone(),
                    source,
                }
            })?;
        }
        let mut root = JailRoot::system()
            .read_only(hypervisor.program())
            .read_only(&vm.kernel)
            .read_only(&vm.initramfs)
            .writable(&vm.fs_socket)
            .writable(&vm.vsock_socket)
            .writable(&vm.console_log);
        if hypervisor.uses_kvm() {
            root = root.device("/dev/kvm", uid);
        }
        let taps: Vec<_> = vm.net_devices.iter().map(|d| d.tap_fd).collect();
        Ok(crate::jail::Jail::for_backend(uid)?
            .isolated()
            .keep_fds(&taps)
            .with_root(&root, &self.jail_root_dir("vmm")?)?)
    }

    /// Once the jailed backend has made its sockets, its directory becomes
    /// root's: the backend can no longer swap a socket for a symlink that
    /// would send the host's connections elsewhere. The host reaches the
    /// agent's socket through `<sandbox>/vsock.sock`, a link to it.
    fn lock_jail_dir(&self, vsock_dir: &Path) -> Result<(), SandboxError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |source| SandboxError::Io {
            what: "locking the jail directory",
            path: vsock_dir.to_path_buf(),
            source,
        };
        std::os::unix::fs::chown(vsock_dir, Some(0), Some(0)).map_err(err)?;
        std::fs::set_permissions(vsock_dir, std::fs::Permissions::from_mode(0o711)).map_err(err)?;
        let link = self.dir.join("vsock.sock");
        std::os::unix::fs::symlink(vsock_dir.join("vsock.sock"), &link).map_err(|source| {
            SandboxError::Io {
                what: "linking",
                path: link,
                source,
            }
        })
    }

    /// The share this sandbox made, where containers' paths are bound.
    fn share(&self) -> Result<&Share, SandboxError> {
        self.share.as_ref().ok_or(SandboxError::NoShare)
    }

    /// The host-only side of the share (where the mounts are made), for a
    /// caller that must clean up after this process died.
    pub fn share_host_dir(&self) -> Option<&Path> {
        self.share.as_ref().map(Share::host_dir)
    }

    /// Bind-mounts a container's rootfs into the share (nosuid, nodev on
    /// the host) and returns its path relative to the share.
    ///
    /// A read-only rootfs (`root.readonly`: `readonly` names the mount
    /// points the guest will need in it, see `share::rootfs_mount_points`)
    /// is read-only on the host from the first instant the guest can see
    /// it, as a `ro` volume is: the host first makes those mount points,
    /// since the guest cannot.
    pub fn share_rootfs(
        &self,
        container_id: &str,
        rootfs: &Path,
        readonly: Option<&[crate::share::MountPoint]>,
    ) -> Result<String, SandboxError> {
        if !rootfs.is_dir() {
            return Err(SandboxError::MissingRootfs(rootfs.to_path_buf()));
        }
        let rel = format!("{container_id}/rootfs");
        let access = match readonly {
            Some(mount_points) => {
                crate::share::make_mount_points(rootfs, mount_points)?;
                ReadOnly::Top
            }
            None => ReadOnly::No,
        };
        let mode = crate::share::BindMode {
            readonly: access,
            propagation: crate::share::Propagation::Private,
        };
        Ok(self.share()?.bind(rootfs, &rel, mode)?)
    }

    /// Shares a host path (file or directory) for a bind mount of
    /// `container_id`, read-only and propagated on the host as `mode` says;
    /// returns its path relative to the share.
    pub fn share_path(
        &self,
        container_id: &str,
        index: usize,
        source: &Path,
        mode: crate::share::BindMode,
    ) -> Result<String, SandboxError> {
        let rel = format!("{container_id}/mounts/{index}");
        Ok(self.share()?.bind(source, &rel, mode)?)
    }

    /// Opens the stdio streams of a process and starts the host-side pumps.
    pub fn connect_stdio(
        &self,
        stdio: HostStdio,
    ) -> Result<(StdioTokens, StdioPumps), SandboxError> {
        connect_stdio_via(self.agent(), stdio)
    }

    /// Creates a container in the guest from a bundle's spec.
    /// Returns the guest's steps of the create, for display.
    pub fn create_container(
        &mut self,
        c: NewContainer,
    ) -> Result<crate::phases::Phases, SandboxError> {
        let req = c.into_request();
        let result = self.agent().create_container(&req);
        result.map_err(|e| self.explain(e))
    }

    pub fn start_container(&mut self, container_id: &str) -> Result<u32, SandboxError> {
        let result = self.agent().start_container(container_id);
        result.map_err(|e| self.explain(e))
    }

    pub fn wait_process(
        &mut self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse, SandboxError> {
        let result = self.agent().wait_process(container_id, exec_id);
        result.map_err(|e| self.explain(e))
    }

    /// Unshares a container's host paths (rootfs and bind mounts).
    pub fn unshare_container(&self, container_id: &str) -> Result<(), SandboxError> {
        Ok(self.share()?.remove_below(container_id)?)
    }

    /// Asks the guest to sync its file systems, then ends the sandbox
    /// (`cleanup`). Returns how long the guest's part took.
    pub fn shutdown(mut self) -> Result<Duration, SandboxError> {
        let t = Instant::now();
        // An unclaimed pooled sandbox calls its agent on the parked
        // connection, or on a new one if it offered that one to a claimant;
        // failing both, it ends as a guest that does not answer.
        let _ = self.unpark_agent();
        self.teardown.raise();
        // The agent answers once the guest's file systems are synced: then
        // nothing in the VM is needed, and the VMM is stopped at once
        // rather than awaited through the guest's own restart. A guest that
        // does not answer gets the same end after the RPC's timeout.
        let synced = match &self.agent {
            // A guest that is already gone is not an error at shutdown.
            Some(agent) => agent.shutdown().is_ok(),
            None => false,
        };
        self.agent = None;
        // A synced guest has nothing left to keep: `cleanup` kills the VMM
        // with its backends. One that did not answer may be ending on its
        // own (a guest powering off); it gets a moment first.
        if !synced {
            if let Some(vm) = self.vm.as_mut() {
                vm.wait_timeout(Duration::from_secs(5));
            }
        }
        let elapsed = t.elapsed();
        self.cleanup()?;
        Ok(elapsed)
    }

    /// Stops every process and removes the sandbox's mounts and directory.
    pub fn cleanup(&mut self) -> Result<(), SandboxError> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        self.teardown.raise();
        self.agent = None;
        // Nothing of the VM is kept once its sandbox ends, and its guest
        // gets no more say (a SIGTERM'd QEMU quits without one either): the
        // VMM, the vsock backend and virtiofsd's worker are killed at once,
        // rather than one exit after another (virtiofsd noticing the VMM's
        // end took 5-6 ms more). The worker is pid 1 of a pid namespace of
        // its own and a child of the virtiofsd we know, which waits for it
        // and then exits: so that parent is not killed (its worker would
        // outlive it, serving queued requests into the share being torn
        // down, and end as a zombie of another process), only awaited.
        // Should no worker be found, virtiofsd ends by itself after the
        // VMM, as it does.
        let fs = self.fs.take();
        let fs_workers = fs
            .as_ref()
            .map(|f| f.process.children())
            .unwrap_or_default();
        let mut killed: Vec<HelperProcess> = self
            .vm
            .take()
            .into_iter()
            .chain(self.vsock.take().map(|b| b.process))
            .collect();
        for helper in &killed {
            helper.kill_without_waiting();
        }
        for worker in &fs_workers {
            worker.send_signal(libc::SIGKILL);
        }
        for helper in &mut killed {
            helper.stop(Duration::from_millis(500));
        }
        if let Some(mut fs) = fs {
            if fs
                .process
                .wait_timeout(Duration::from_millis(500))
                .is_none()
            {
                fs.process.stop(Duration::from_millis(500));
            }
        }
        if let Some(mut console) = self.console.take() {
            console.stop();
        }
        if let Some((id, dir)) = self.jail.take() {
            let _ = std::fs::remove_dir_all(&dir);
            // What a compromised helper forked must not meet the next
            // sandbox of this uid (the next claim sweeps again).
            if let Err(e) = crate::jail::kill_uid(id.uid) {
                log::warn!("sandbox {}: {e}", self.id);
            }
            id.release();
        }
        // Each step is tried whatever the one before gave: the first error
        // is reported.
        let share = self
            .share
            .take()
            .map(|share| share.remove())
            .unwrap_or(Ok(()));
        // The sandbox's own tmpfs (and anything a failed step left on it).
        let unmounted = unmount_below(&self.dir);
        share?;
        unmounted?;
        remove_tree_same_fs(&self.dir)
    }
}

/// What the keeper of a pooled sandbox (see `pool`) hands to the owner that
/// claims it, beside the descriptors sent with it: the pidfds of
/// `helpers`, in order, then the open claim file of the jail uid.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Handover {
    /// The sandbox's directory (it stays where the pool booted it).
    pub dir: PathBuf,
    pub jail_uid: u32,
    /// Names and pids of the VMM and the backends.
    pub helpers: Vec<(String, u32)>,
    /// Whether a connection to the agent follows the claim file (see
    /// `Sandbox::park_agent`).
    #[serde(default)]
    pub agent_connection: bool,
}

/// What a keeper keeps of a sandbox it handed over: the helpers it spawned
/// (it stays their parent: they are killed when their spawner dies), to
/// reap them, or end them if the new owner dies first.
pub struct HandedOver {
    pub helpers: Vec<HelperProcess>,
    pub dir: PathBuf,
    /// The jail's claim, still held through the owner's descriptor: the
    /// keeper releases it only if the owner died without doing so, and
    /// otherwise must forget it (dropping it would unlock the owner's).
    pub jail: Option<crate::jail::JailId>,
}

// The pool's two ends: a keeper hands a booted sandbox over, a claimant
// adopts it. Kept apart from `start` on purpose.
impl Sandbox {
    /// Makes the connection a tenant's owner will call the agent on, now,
    /// and closes this process's own. The guest's ttrpc server starts a
    /// connection's threads as it accepts it (five threads: several ms of
    /// the guest's one CPU under TCG); made at the claim, that work delayed
    /// the tenant's first streams and create by 10 to 20 ms. A pooled
    /// sandbox idles with its threads made and nothing else to do.
    pub fn park_agent(&mut self) -> Result<(), SandboxError> {
        let uds = self.dir.join("vsock.sock");
        self.parked_agent = Some(crate::agent::connect_port(&uds, husk_protocol::AGENT_PORT)?);
        self.agent = None;
        Ok(())
    }

    /// Takes the parked connection back for this process's own calls (a
    /// keeper ending its sandbox unclaimed asks the guest to shut down), or
    /// connects anew when it was offered to a claimant (which may still
    /// hold it: two readers on one socket would take each other's replies).
    pub fn unpark_agent(&mut self) -> Result<(), SandboxError> {
        if self.agent.is_some() {
            return Ok(());
        }
        let uds = self.dir.join("vsock.sock");
        let stream = match self.parked_agent.take() {
            Some(stream) => stream,
            None => crate::agent::connect_port(&uds, husk_protocol::AGENT_PORT)?,
        };
        self.agent = Some(AgentClient::over(stream, &uds)?);
        Ok(())
    }

    /// Closes this process's copy of the parked connection once it was
    /// offered (not shut down: the claimant's copy stays connected).
    pub fn forget_parked_agent(&mut self) {
        self.parked_agent = None;
    }

    /// The record and descriptors an adopting owner needs (see `Handover`).
    /// The sandbox stays whole here until `hand_over`.
    pub fn handover(&self) -> Result<(Handover, Vec<std::os::fd::OwnedFd>), SandboxError> {
        use std::os::fd::AsFd;
        let procs = [
            self.vm.as_ref(),
            self.fs.as_ref().map(|f| &f.process),
            self.vsock.as_ref().map(|v| &v.process),
        ];
        let mut helpers = Vec::new();
        let mut fds = Vec::new();
        for p in procs.into_iter().flatten() {
            helpers.push((p.name.to_string(), p.pid()));
            fds.push(
                p.pidfd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| SandboxError::Event(EventError::Dup(e)))?,
            );
        }
        let (jail, _) = self.jail.as_ref().ok_or(SandboxError::NoShare)?;
        fds.push(
            jail.lock_fd()
                .try_clone_to_owned()
                .map_err(|e| SandboxError::Event(EventError::Dup(e)))?,
        );
        if let Some(parked) = &self.parked_agent {
            fds.push(
                parked
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| SandboxError::Event(EventError::Dup(e)))?,
            );
        }
        Ok((
            Handover {
                dir: self.dir.clone(),
                jail_uid: jail.uid,
                helpers,
                agent_connection: self.parked_agent.is_some(),
            },
            fds,
        ))
    }

    /// Gives the sandbox up to the owner that adopted it: stops this
    /// process's console copy (the owner runs its own), leaves the jail's
    /// claim held (through the owner's descriptor), and cleans nothing.
    /// The helpers come back, still this process's children.
    pub fn hand_over(mut self) -> HandedOver {
        self.cleaned = true;
        self.agent = None;
        // Closed here, not shut down: the owner's copy stays connected.
        self.parked_agent = None;
        if let Some(mut console) = self.console.take() {
            console.detach();
        }
        let jail = self.jail.take().map(|(id, _)| id);
        self.share = None;
        let helpers = [
            self.vm.take(),
            self.fs.take().map(|f| f.process),
            self.vsock.take().map(|v| v.process),
        ]
        .into_iter()
        .flatten()
        .collect();
        HandedOver {
            helpers,
            dir: self.dir.clone(),
            jail,
        }
    }

    /// A sandbox booted by another process (a pool keeper), taken over from
    /// what it handed over: its helpers by their pidfds, its jail claim,
    /// its console copy and a connection to its agent, which must answer.
    /// The result behaves as one `start` made (teardown, death watch,
    /// shares); nothing here cleans up on error: the keeper does.
    pub fn adopt(
        config: &Config,
        id: &str,
        record: Handover,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Sandbox, SandboxError> {
        let t0 = Instant::now();
        let refused = |why: String| SandboxError::Io {
            what: "adopting the pooled sandbox at",
            path: record.dir.clone(),
            source: std::io::Error::other(why),
        };
        if !valid_id(id) {
            return Err(SandboxError::InvalidId(id.to_string()));
        }
        let want_fds = 4 + usize::from(record.agent_connection);
        if record.helpers.len() != 3 || fds.len() != want_fds {
            return Err(refused(format!(
                "{} helpers and {} descriptors handed over (3 and {want_fds} expected)",
                record.helpers.len(),
                fds.len()
            )));
        }
        let selection = hypervisor::select(config.hypervisor, config)?;
        let expected = [
            selection.hypervisor.name(),
            "virtiofsd",
            "vhost-device-vsock",
        ];
        let mut fds = fds.into_iter();
        let mut helpers = Vec::new();
        for ((name, pid), want) in record.helpers.iter().zip(expected) {
            let Some(fd) = fds.next() else {
                return Err(refused("a pidfd is missing".into()));
            };
            let pidfd = PidFd::from_owned(fd, *pid);
            if name != want {
                return Err(refused(format!(
                    "helper {name:?} where {want} was expected"
                )));
            }
            let record = HelperProcess::exit_record(&record.dir, *pid);
            helpers.push(HelperProcess::adopt(want, pidfd, record));
        }
        let Some(claim) = fds.next() else {
            return Err(refused("the jail claim is missing".into()));
        };
        let parked = fds.next().map(std::os::unix::net::UnixStream::from);
        if let Some(stream) = &parked {
            // The vsock backend's own connection, not any socket: its peer
            // is the backend process named in the record.
            let backend = record.helpers.get(2).map(|(_, pid)| *pid);
            let peer =
                nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
                    .map_err(|e| refused(format!("the agent connection handed over: {e}")))?;
            if u32::try_from(peer.pid()).ok() != backend {
                return Err(refused(format!(
                    "the agent connection handed over leads to pid {}, not the vsock backend",
                    peer.pid()
                )));
            }
        }
        let claims = Path::new(crate::jail::JAIL_ROOT).join("uids");
        let jail_id = crate::jail::JailId::adopt(&claims, record.jail_uid, claim.into())?;
        let jail_dir = Path::new(crate::jail::JAIL_ROOT).join(record.jail_uid.to_string());
        let dir = record.dir.clone();
        let console = ConsoleLog::attach(
            &dir.join("console.fifo"),
            &dir.join("console.log"),
            crate::console::CONSOLE_CAP,
            "",
        )?;
        let mut helpers = helpers.into_iter();
        let (vm, fs, vsock) = (helpers.next(), helpers.next(), helpers.next());
        let mut sandbox = Sandbox {
            id: id.to_string(),
            dir: dir.clone(),
            shared_dir: Share::at(&dir).guest_view().to_path_buf(),
            console: Some(console),
            jail: Some((jail_id, jail_dir.clone())),
            share: Some(Share::at(&dir)),
            hypervisor: selection.hypervisor.name(),
            acceleration: selection.hypervisor.acceleration(),
            hypervisor_reason: selection.reason.clone(),
            vm,
            fs: fs.map(|process| VirtioFsBackend {
                process,
                socket: dir.join("vhost-fs.sock"),
            }),
            vsock: vsock.map(|process| VsockBackend {
                process,
                vhost_socket: jail_dir.join("vhost-vsock.sock"),
                uds: jail_dir.join("vsock.sock"),
            }),
            agent: None,
            parked_agent: None,
            timings: Timings::default(),
            console_log: dir.join("console.log"),
            teardown: Flag::new()?,
            // Until adopted whole, the keeper cleans up.
            cleaned: true,
        };
        let answered = (|| {
            sandbox.check_components()?;
            let timeout = Duration::from_secs(config.boot_timeout_secs.min(10));
            let uds = dir.join("vsock.sock");
            let agent = match parked {
                // Made by the keeper while the VM idled: the guest set the
                // connection up then, not now.
                Some(stream) => AgentClient::over(stream, &uds)?,
                None => {
                    let sb = &mut sandbox;
                    AgentClient::connect(&uds, timeout, || {
                        sb.check_components().map_err(|e| e.to_string())
                    })?
                }
            };
            let tr = Instant::now();
            agent.health()?;
            sandbox.timings.first_rpc_ms = ms(tr.elapsed());
            sandbox.agent = Some(agent);
            Ok::<(), SandboxError>(())
        })();
        if let Err(e) = answered {
            // The jail's claim stays the keeper's: dropping it here would
            // unlock the keeper's too (one open file) before its teardown
            // released the uid.
            if let Some((id, _)) = sandbox.jail.take() {
                std::mem::forget(id);
            }
            return Err(e);
        }
        sandbox.timings.total_start_ms = ms(t0.elapsed());
        sandbox.cleaned = false;
        Ok(sandbox)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            log::warn!("sandbox {}: {e}", self.id);
        }
    }
}

/// Opens the stdio streams of a process through `agent` and starts the
/// host-side pumps (stdin in, stdout and stderr out).
pub fn connect_stdio_via(
    agent: &AgentClient,
    stdio: HostStdio,
) -> Result<(StdioTokens, StdioPumps), SandboxError> {
    let mut tokens = StdioTokens {
        terminal: stdio.terminal,
        ..Default::default()
    };
    // Each stream is a CONNECT answered from inside the guest: a round
    // trip through the vsock backend and the guest's scheduler (1 to 4 ms
    // under TCG). The two or three a process needs are opened at once.
    let wanted = [
        stdio.stdin.is_some(),
        stdio.stdout.is_some(),
        stdio.stderr.is_some(),
    ];
    type Opened = Option<Result<(u64, std::os::unix::net::UnixStream), AgentError>>;
    let opened: [Opened; 3] = std::thread::scope(|s| {
        // Every thread is started before the first is joined.
        let opening = wanted.map(|want| {
            want.then(|| {
                std::thread::Builder::new()
                    .name("stdio-connect".into())
                    .spawn_scoped(s, || {
                        let token = new_token();
                        agent
                            .open_stream(StreamKind::Process, token)
                            .map(|stream| (token, stream))
                    })
            })
        });
        opening.map(|h| {
            h.map(|spawned| match spawned {
                Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                // No thread to be had: this process serves other
                // containers too, so an error, not a panic.
                Err(source) => Err(AgentError::Connect {
                    uds: agent.uds().to_path_buf(),
                    source,
                }),
            })
        })
    });
    let [stdin_stream, stdout_stream, stderr_stream] = opened.map(Option::transpose);
    let (stdin_stream, stdout_stream, stderr_stream) =
        (stdin_stream?, stdout_stream?, stderr_stream?);
    let mut outputs = Vec::new();
    let mut stdin = None;
    if let (Some(input), Some((token, stream))) = (stdio.stdin, stdin_stream) {
        tokens.stdin = token;
        let stop = stream_pump::StdinStop::new(&stream).map_err(|source| SandboxError::Io {
            what: "keeping a handle on the stdin stream of",
            path: agent.uds().to_path_buf(),
            source,
        })?;
        stdin = Some(stop.clone());
        std::thread::spawn(move || stream_pump::pump_in(input, stream, stop));
    }
    for (output, opened, slot) in [
        (stdio.stdout, stdout_stream, &mut tokens.stdout),
        (stdio.stderr, stderr_stream, &mut tokens.stderr),
    ] {
        if let (Some(output), Some((token, stream))) = (output, opened) {
            *slot = token;
            outputs.push(std::thread::spawn(move || {
                stream_pump::pump_out(stream, output)
            }));
        }
    }
    Ok((tokens, StdioPumps { outputs, stdin }))
}

/// The line the agent writes to the console once it serves (boot marker).
pub const READY_MARKER: &str = "husk-agent: ready";

/// Removes what the jail of the sandbox at `dir` left when its owner died
/// without cleaning up (a crashed monitor or shim): any process still
/// running as the jail's uid, the backend's directory `<JAIL_ROOT>/<uid>`
/// and the uid claim, for every claim that is still this sandbox's (its
/// file names `dir`) and that nobody holds. Found by the claims, not by the
/// `vsock.sock` link: an owner killed between its claim and that link
/// leaves the claim too. The helpers die with their owner (PDEATHSIG), but
/// not one whose owner died while spawning it, before that was armed.
pub fn remove_jail_of(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let root = Path::new(crate::jail::JAIL_ROOT);
    let claims = root.join("uids");
    let Ok(entries) = std::fs::read_dir(&claims) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(uid) = name
            .to_str()
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let claim = claims.join(&name);
        // Only a claim this sandbox made, or an empty one (a claimant that
        // died before naming itself); read again under the lock below.
        // Another's is left alone without waiting.
        let wait = match std::fs::read(&claim) {
            Ok(owner) if owner == dir.as_os_str().as_bytes() => DEAD_OWNER_LOCK_WAIT,
            Ok(owner) if owner.is_empty() => std::time::Duration::ZERO,
            _ => continue,
        };
        // Only once nobody holds it any more (its owner died). Waited for,
        // briefly: a killed owner is gone from /proc (its memory released)
        // a moment before the kernel closes its files and with them the
        // flock, and a caller that saw it gone may already be here. Taken,
        // not just tested: while this holds it nobody can claim the uid, so
        // nothing of a new sandbox of that uid is killed or removed.
        let Some(held) = lock_claim_of_dead_owner(&claim, wait) else {
            continue;
        };
        match std::fs::read(&claim) {
            Ok(owner) if owner == dir.as_os_str().as_bytes() => {
                if let Err(e) = crate::jail::kill_uid(uid) {
                    log::warn!("{}: {e}", dir.display());
                }
                let _ = std::fs::remove_dir_all(root.join(uid.to_string()));
                let _ = std::fs::remove_file(&claim);
            }
            // Made empty by the lock just taken (a claim removed meanwhile).
            Ok(owner) if owner.is_empty() => {
                let _ = std::fs::remove_file(&claim);
            }
            _ => {}
        }
        drop(held);
    }
}

/// The claim's lock, taken once its holder let go, waiting up to `wait`
/// for that; None when it is still held then (a live owner: the uid is not
/// the caller's to clean up).
fn lock_claim_of_dead_owner(
    claim: &Path,
    wait: std::time::Duration,
) -> Option<crate::lockfile::HeldLock> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match crate::lockfile::lock_exclusive(claim, false) {
            Ok(Some(held)) => return Some(held),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Ok(None) | Err(_) => return None,
        }
    }
}

/// How long a crash cleanup waits for a dead owner's claim to be released
/// by the kernel: far more than the exit of a process takes.
const DEAD_OWNER_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The size of a sandbox's own file system: its logs (the console's two
/// capped files, the VMM's and the backends' own), its sockets, the jailed
/// helpers' empty root directories and the share's mount points. A guest
/// that makes a helper log without end fills this, not the host's /run.
pub const SANDBOX_FS_OPTIONS: &str = "size=16m,nr_inodes=4096,mode=0700";

/// Mounts the sandbox's own size-limited tmpfs on `dir` (nosuid, nodev,
/// noexec: nothing is run from it).
fn mount_sandbox_fs(dir: &Path) -> std::io::Result<()> {
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some(SANDBOX_FS_OPTIONS),
    )
    .map_err(std::io::Error::from)
}

/// Detaches every mount at or below `dir` (deepest first, never following a
/// symlink at a mount point).
pub fn unmount_below(dir: &Path) -> Result<(), SandboxError> {
    Ok(crate::share::unmount_below(dir)?)
}

/// How deep [`remove_tree_same_fs`] goes: far below what a sandbox's tree
/// holds, and a bound on the descriptors the walk keeps open at once.
const REMOVE_TREE_MAX_DEPTH: usize = 64;

/// Removes `dir` recursively without ever crossing into another mount, so
/// a mount that failed to detach keeps its contents (a user's rootfs is
/// never deleted through a bind mount, even one from the same file system).
///
/// Walked by descriptor: each directory is opened relative to its parent's
/// descriptor with `openat2(RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS)` and its
/// entries are unlinked relative to it, so nothing is resolved by a path
/// that a concurrent writer could change: a directory swapped for a symlink
/// mid-walk is unlinked as the link it then is, and a mount point (a bind
/// from the same file system included) fails the open with EXDEV before
/// anything below it is touched.
pub fn remove_tree_same_fs(dir: &Path) -> Result<(), SandboxError> {
    use nix::fcntl::{OFlag, OpenHow};
    // The top is opened relative to its parent (the caller's path) as its
    // entries are: a top that is a link (a trailing slash does not make it
    // followed) is unlinked, and a top that is a mount point, which would
    // make the whole walk one inside that mount, is refused (EXDEV).
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(cleanup_error(dir, "not a path below a directory"));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let how = OpenHow::new().flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC);
    let parent_fd = match openat2_owned(libc::AT_FDCWD, parent, how) {
        Ok(fd) => fd,
        Err(nix::Error::ENOENT) => return Ok(()),
        Err(e) => return Err(cleanup_error(parent, e)),
    };
    let top = std::iter::once(name.to_os_string());
    remove_named(&parent_fd, parent, top, 0)
}

/// A failed step of a tree removal, naming the path it was at.
fn cleanup_error(path: &Path, reason: impl ToString) -> SandboxError {
    SandboxError::Cleanup {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// `openat2` whose descriptor is owned at once.
fn openat2_owned(
    dirfd: std::os::fd::RawFd,
    path: &(impl nix::NixPath + ?Sized),
    how: nix::fcntl::OpenHow,
) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let fd = nix::fcntl::openat2(dirfd, path, how)?;
    // SAFETY: openat2 just returned this descriptor; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Removes the entries `names` of the directory open at `dir` (named
/// `path` in errors), `depth` levels below the top's parent: each
/// directory's contents first, by descriptor, then the directory.
fn remove_named(
    dir: &std::os::fd::OwnedFd,
    path: &Path,
    names: impl Iterator<Item = std::ffi::OsString>,
    depth: usize,
) -> Result<(), SandboxError> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    use nix::unistd::UnlinkatFlags;
    use std::os::fd::AsRawFd;
    let how = || {
        OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_XDEV | ResolveFlag::RESOLVE_NO_SYMLINKS)
    };
    for name in names {
        let child = path.join(&name);
        let unlink = |flag| {
            gone_is_ok(
                nix::unistd::unlinkat(Some(dir.as_raw_fd()), name.as_os_str(), flag)
                    .map_err(std::io::Error::from),
            )
            .map_err(|e| cleanup_error(&child, e))
        };
        match openat2_owned(dir.as_raw_fd(), name.as_os_str(), how()) {
            Ok(sub) => {
                remove_entries(&sub, &child, depth + 1)?;
                drop(sub);
                unlink(UnlinkatFlags::RemoveDir)?;
            }
            // Not a directory (a link included, never followed).
            Err(nix::Error::ENOTDIR | nix::Error::ELOOP) => unlink(UnlinkatFlags::NoRemoveDir)?,
            Err(nix::Error::ENOENT) => {}
            Err(nix::Error::EXDEV) => return Err(cleanup_error(&child, "still a mount point")),
            Err(e) => return Err(cleanup_error(&child, e)),
        }
    }
    Ok(())
}

/// Another cleaner may remove the same tree at the same time (a pooled
/// sandbox's keeper and `shim delete` both clean up after a dead shim):
/// what is already gone is not an error.
fn gone_is_ok(result: std::io::Result<()>) -> std::io::Result<()> {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes everything in the directory open at `dir` (named `path` in
/// errors), `depth` levels below the top.
fn remove_entries(
    dir: &std::os::fd::OwnedFd,
    path: &Path,
    depth: usize,
) -> Result<(), SandboxError> {
    use nix::fcntl::OFlag;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let cleanup = |e: nix::Error| cleanup_error(path, e);
    if depth >= REMOVE_TREE_MAX_DEPTH {
        return Err(cleanup_error(
            path,
            format!("more than {REMOVE_TREE_MAX_DEPTH} directories deep"),
        ));
    }
    // The names first, then the removals: the listing is not changed under
    // its own iteration.
    let names: Vec<std::ffi::OsString> = {
        let mut listing = nix::dir::Dir::openat(
            Some(dir.as_raw_fd()),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(cleanup)?;
        let mut names = Vec::new();
        for entry in listing.iter() {
            let entry = entry.map_err(cleanup)?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(std::ffi::OsStr::from_bytes(name).to_os_string());
            }
        }
        names
    };
    remove_named(dir, path, names.into_iter(), depth)
}

#[cfg(test)]
mod tests {

    /// A bind mount from the same file system (same `st_dev`) left in the
    /// tree stops the removal before anything of the bind's source goes.
    #[test]
    fn a_bind_from_the_same_file_system_is_not_walked_into() {
        let base = std::env::temp_dir().join(format!("husk-same-fs-bind-{}", std::process::id()));
        let source = base.join("rootfs");
        let tree = base.join("sandbox");
        let point = tree.join("inner").join("rootfs");
        std::fs::create_dir_all(&source).unwrap();
        std::fs::create_dir_all(&point).unwrap();
        std::fs::write(source.join("precious"), b"x").unwrap();
        std::fs::write(tree.join("inner").join("log"), b"x").unwrap();
        let kept = removed_with_a_bind(&source, &point, &tree, &source.join("precious"));
        std::fs::remove_dir_all(&base).unwrap();
        kept.expect("the bind's source keeps its file");
    }

    /// Binds `source` on `point`, removes `tree` and detaches the bind:
    /// Ok when the removal was refused as a mount point and `precious`
    /// is still there.
    fn removed_with_a_bind(
        source: &Path,
        point: &Path,
        tree: &Path,
        precious: &Path,
    ) -> Result<(), String> {
        nix::mount::mount(
            Some(source),
            point,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind mount (needs root)");
        let result = super::remove_tree_same_fs(tree);
        let kept = precious.exists();
        let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
        match result {
            _ if !kept => Err("the bind's source lost its file".into()),
            Ok(()) => Err("a mount point in the tree was not reported".into()),
            Err(e) if e.to_string().contains("still a mount point") => Ok(()),
            Err(e) => Err(format!("not reported as a mount point: {e}")),
        }
    }

    /// A helper still running as a dead owner's jail uid (one that missed
    /// its PDEATHSIG) goes with the crash cleanup of its sandbox.
    #[test]
    fn the_crash_cleanup_ends_what_still_runs_as_the_jail_uid() {
        use std::os::unix::process::CommandExt;
        // Outside the default jail range: no live sandbox has this uid.
        let uid = 1_700_000_000 + std::process::id() % 100_000;
        let claims = std::path::Path::new(crate::jail::JAIL_ROOT).join("uids");
        std::fs::create_dir_all(&claims).unwrap();
        let dir = std::env::temp_dir().join(format!("husk-crashed-owner-{}", std::process::id()));
        std::fs::write(
            claims.join(uid.to_string()),
            dir.as_os_str().as_encoded_bytes(),
        )
        .unwrap();
        let mut leftover = std::process::Command::new("sleep")
            .arg("60")
            .uid(uid)
            .gid(uid)
            .spawn()
            .unwrap();
        super::remove_jail_of(&dir);
        let pidfd = crate::event::PidFd::open(leftover.id()).unwrap();
        let ended = pidfd.wait_timeout(Duration::from_secs(5)).unwrap();
        let _ = leftover.kill();
        let _ = leftover.wait();
        let claim_left = claims.join(uid.to_string()).exists();
        let _ = std::fs::remove_file(claims.join(uid.to_string()));
        assert!(ended, "the process of the jail uid still runs");
        assert!(!claim_left, "the claim is left");
    }

    /// A claim whose dead owner's flock the kernel has not yet dropped when
    /// the cleanup starts (the owner is gone from /proc a moment before its
    /// files are closed) is still removed: the cleanup waits for the lock.
    /// Another sandbox's claim, held, is left without a wait.
    #[test]
    fn the_crash_cleanup_waits_for_the_dead_owners_lock() {
        let uid = 1_710_000_000 + std::process::id() % 100_000;
        let claims = std::path::Path::new(crate::jail::JAIL_ROOT).join("uids");
        std::fs::create_dir_all(&claims).unwrap();
        let claim = claims.join(uid.to_string());
        let other = claims.join((uid + 1).to_string());
        let dir = std::env::temp_dir().join(format!("husk-slow-owner-{}", std::process::id()));
        std::fs::write(&claim, dir.as_os_str().as_encoded_bytes()).unwrap();
        std::fs::write(&other, b"/run/another-sandbox").unwrap();
        let held = crate::lockfile::lock_exclusive(&claim, false)
            .unwrap()
            .expect("free");
        let other_held = crate::lockfile::lock_exclusive(&other, false)
            .unwrap()
            .expect("free");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let started = std::time::Instant::now();
        super::remove_jail_of(&dir);
        let took = started.elapsed();
        release.join().unwrap();
        let claim_left = claim.exists();
        let other_left = other.exists();
        let _ = std::fs::remove_file(&claim);
        drop(other_held);
        let _ = std::fs::remove_file(&other);
        assert!(!claim_left, "the claim released late is left");
        assert!(other_left, "another sandbox's claim was removed");
        assert!(took < Duration::from_secs(1), "waited {took:?}");
    }

    /// Links in the tree, to a directory and to a file outside it, are
    /// removed as links: nothing they name is touched.
    #[test]
    fn links_in_the_tree_are_removed_not_followed() {
        let base = std::env::temp_dir().join(format!("husk-tree-links-{}", std::process::id()));
        let outside = base.join("outside");
        let tree = base.join("tree");
        std::fs::create_dir_all(outside.join("dir")).unwrap();
        std::fs::write(outside.join("dir/precious"), b"x").unwrap();
        std::fs::write(outside.join("file"), b"x").unwrap();
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::os::unix::fs::symlink(outside.join("dir"), tree.join("a/b/to-dir")).unwrap();
        std::os::unix::fs::symlink(outside.join("file"), tree.join("a/to-file")).unwrap();
        std::os::unix::fs::symlink("../../../outside", tree.join("a/b/relative")).unwrap();
        super::remove_tree_same_fs(&tree).expect("removed");
        let kept = (
            tree.exists(),
            outside.join("dir/precious").exists(),
            outside.join("file").exists(),
        );
        let _ = std::fs::remove_dir_all(&base);
        assert_eq!(kept, (false, true, true), "(tree, dir/precious, file)");
        // A top that is itself a link is removed as one.
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, &tree).unwrap();
        // Named with a trailing slash, which would make a path lookup
        // follow it.
        let mut with_slash = tree.clone().into_os_string();
        with_slash.push("/");
        super::remove_tree_same_fs(std::path::Path::new(&with_slash)).expect("removed");
        let kept = (
            tree.symlink_metadata().is_ok(),
            outside.join("precious").exists(),
        );
        let _ = std::fs::remove_dir_all(&base);
        assert_eq!(kept, (false, true), "(link, precious)");
    }

    /// A top that is itself a mount point (a bind of another directory,
    /// from the same file system) is refused before anything in it goes.
    #[test]
    fn a_top_that_is_a_mount_point_is_refused_whole() {
        let base = std::env::temp_dir().join(format!("husk-tree-top-bind-{}", std::process::id()));
        let source = base.join("pool");
        let here = base.join("here");
        std::fs::create_dir_all(source.join("inner")).unwrap();
        std::fs::write(source.join("inner/precious"), b"x").unwrap();
        std::fs::create_dir_all(&here).unwrap();
        let kept = removed_with_a_bind(&source, &here, &here, &source.join("inner/precious"));
        let _ = std::fs::remove_dir_all(&base);
        kept.expect("the bind's source keeps its file");
    }

    /// A writer that swaps a directory of the tree for a link to another
    /// directory while the tree is removed never gets the walk to follow
    /// it: what the link names survives every round (a walk by path, which
    /// looked at the entry and then listed it by name, could be led there).
    #[test]
    fn a_directory_swapped_for_a_link_mid_walk_is_not_followed() {
        let base = std::env::temp_dir().join(format!("husk-tree-swap-{}", std::process::id()));
        let outside = base.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        for round in 0..300 {
            for p in 0..50 {
                std::fs::write(outside.join(format!("precious{p}")), b"x").unwrap();
            }
            let tree = base.join(format!("tree{round}"));
            let sub = tree.join("sub");
            std::fs::create_dir_all(&sub).unwrap();
            for f in 0..20 {
                std::fs::write(tree.join(format!("f{f}")), b"x").unwrap();
            }
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            // The link waits beside the tree; the writer exchanges it with
            // the directory, atomically (renameat2 RENAME_EXCHANGE), back
            // and forth until the removal ends.
            let spare = base.join(format!("spare{round}"));
            std::os::unix::fs::symlink(&outside, &spare).unwrap();
            let swapper = {
                let (sub, spare, stop) = (sub.clone(), spare.clone(), stop.clone());
                std::thread::spawn(move || {
                    use std::os::unix::ffi::OsStrExt;
                    let a = std::ffi::CString::new(sub.as_os_str().as_bytes()).unwrap();
                    let b = std::ffi::CString::new(spare.as_os_str().as_bytes()).unwrap();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // SAFETY: two NUL-terminated paths valid for the call.
                        unsafe {
                            libc::renameat2(
                                libc::AT_FDCWD,
                                a.as_ptr(),
                                libc::AT_FDCWD,
                                b.as_ptr(),
                                libc::RENAME_EXCHANGE,
                            )
                        };
                    }
                })
            };
            // Errors are allowed (the writer races the removal); following
            // the link is not.
            let _ = super::remove_tree_same_fs(&tree);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            swapper.join().unwrap();
            let survived = (0..50).all(|p| outside.join(format!("precious{p}")).exists());
            for p in [&sub, &spare] {
                let _ = std::fs::remove_file(p);
                let _ = std::fs::remove_dir(p);
            }
            let _ = std::fs::remove_dir_all(&tree);
            if !survived {
                let _ = std::fs::remove_dir_all(&base);
                panic!("round {round}: the walk followed the link and removed what it names");
            }
        }
        let _ = std::fs::remove_dir_all(&base);
    }

    /// A tree deeper than the walk goes is an error naming it, not a
    /// descriptor per level without end.
    #[test]
    fn a_tree_too_deep_is_refused() {
        let base = std::env::temp_dir().join(format!("husk-tree-deep-{}", std::process::id()));
        let mut deepest = base.clone();
        for _ in 0..super::REMOVE_TREE_MAX_DEPTH + 2 {
            deepest = deepest.join("d");
        }
        std::fs::create_dir_all(&deepest).unwrap();
        let result = super::remove_tree_same_fs(&base);
        let _ = std::fs::remove_dir_all(&base);
        let err = result.expect_err("too deep");
        assert!(err.to_string().contains("directories deep"), "{err}");
    }

    /// Two cleaners removing one tree at once (a pooled sandbox's keeper
    /// and `shim delete`) both succeed: what the other removed first is not
    /// an error.
    #[test]
    fn two_cleaners_of_one_tree_both_succeed() {
        let base = std::env::temp_dir().join(format!("husk-two-cleaners-{}", std::process::id()));
        for round in 0..5 {
            let root = base.join(round.to_string());
            for d in 0..100 {
                let dir = root.join(d.to_string()).join("inner");
                std::fs::create_dir_all(&dir).unwrap();
                for f in 0..5 {
                    std::fs::write(dir.join(f.to_string()), b"x").unwrap();
                }
            }
            let cleaners: Vec<_> = (0..2)
                .map(|_| {
                    let root = root.clone();
                    std::thread::spawn(move || super::remove_tree_same_fs(&root))
                })
                .collect();
            for cleaner in cleaners {
                let result = cleaner.join().unwrap();
                assert!(result.is_ok(), "round {round}: {result:?}");
            }
            assert!(!root.exists(), "round {round}: the tree is gone");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_death_watch_reports_each_death_once_and_ends_at_teardown() {
        use crate::event::{Flag, PidFd};
        let spawn = |script: &str| {
            std::process::Command::new("/bin/sh")
                .args(["-c", script])
                .spawn()
                .unwrap()
        };
        let (mut quick, mut slow) = (spawn("sleep 0.1"), spawn("sleep 30"));
        let teardown = Flag::new().unwrap();
        let watch = DeathWatch {
            components: vec![
                ("quick", PidFd::open(quick.id()).unwrap()),
                ("slow", PidFd::open(slow.id()).unwrap()),
            ],
            reported: vec![Default::default(), Default::default()],
            teardown: teardown.try_clone().unwrap(),
        };
        // Sent to another thread, which blocks until the first death.
        let waiter = std::thread::spawn(move || (watch.wait().unwrap(), watch));
        let (died, watch) = waiter.join().unwrap();
        assert_eq!(
            died,
            Some(ComponentDeath {
                name: "quick",
                pid: quick.id()
            })
        );
        // Reported once: waiting again waits for the other.
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(watch.wait_until(Some(soon)).unwrap(), None);
        assert!(Instant::now() >= soon);
        teardown.raise();
        assert_eq!(watch.wait().unwrap(), None);
        let _ = slow.kill();
        let _ = slow.wait();
        let _ = quick.wait();
    }
    use super::*;

    #[test]
    fn long_ids_get_short_directories() {
        let root = Path::new("/tmp/husk-test-podman-12345/husk-root/sandbox");
        assert_eq!(sandbox_dir(root, "short"), root.join("short"));
        let long = "a".repeat(64);
        let dir = sandbox_dir(root, &long);
        assert!(dir.join(LONGEST_SOCKET).as_os_str().len() <= MAX_SOCKET_PATH);
        assert_eq!(dir, sandbox_dir(root, &long), "stable");
        assert_ne!(dir, sandbox_dir(root, &"b".repeat(64)));
    }

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("abc-1_2.3"));
        for bad in ["", "../x", "a/b", ".hidden", "-x", &"x".repeat(65), "a b"] {
            assert!(!valid_id(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn remove_tree_removes_plain_trees() {
        let dir = std::env::temp_dir().join(format!("husk-rm-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("a/link")).unwrap();
        remove_tree_same_fs(&dir).unwrap();
        assert!(!dir.exists());
        assert!(Path::new("/etc").exists());
    }
}
