//! The per-sandbox monitor: `husk create` starts it as a daemon. It owns the
//! VM, its device backends and the agent connection, holds the container
//! process's stdio, and serves the CLI's requests on `monitor.sock`: every
//! command that reaches into the guest (start, kill, delete, exec and its
//! wait, ps, pause, resume, stats, update) comes through here, in the typed
//! messages of `monitor_protocol`, so the CLI never talks to the agent. It
//! is also the one writer of state.json once `husk create` has written the
//! first record, and runs the host hooks (poststart after start, poststop
//! at delete) from the hooks saved in that record. When the container's
//! process ends it records the status and tells the shadow process
//! (state.pid) how to exit. Its death takes the VM with it (the VMM and
//! backends die with their parent), so nothing outlives it.
//!
//! File descriptors from `husk create`: 3, 4, 5 the container's stdin,
//! stdout and stderr; 6 the link to the shadow; 7 the ready pipe.

use super::console;
use super::monitor_protocol::{
    self as proto, ContainerStats, ExecStdio, GuestProcess, MonitorError, MonitorErrorKind,
    MonitorReply, MonitorRequest, MonitorResponse, ReadyMessage, ToMonitor, ToShadow,
};
use super::state::{self, ContainerState, Status};
use anyhow::{bail, Context};
use husk_protocol::agent::ExecProcessRequest;
use husk_runtime::agent::AgentClient;
use husk_runtime::config::Config;
use husk_runtime::host_cgroup::HostCgroup;
use husk_runtime::phases::Stopwatch;
use husk_runtime::sandbox::{HostStdio, NewContainer, Sandbox, SandboxConfig, StdioPumps};
use husk_runtime::supervisor::network::{self, SandboxNetwork};
use husk_runtime::supervisor::{self, hooks, Bundle, Event, HookKind};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub const FD_STDIN: i32 = 3;
pub const FD_STDOUT: i32 = 4;
pub const FD_STDERR: i32 = 5;
pub const FD_LINK: i32 = 6;
pub const FD_READY: i32 = 7;

#[derive(clap::Args, Debug)]
pub struct MonitorArgs {
    #[arg(long)]
    pub bundle: PathBuf,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    #[arg(long)]
    pub no_pivot: bool,
    /// The shadow process standing for the container's process (state.pid).
    #[arg(long)]
    pub shadow_pid: i32,
    pub id: String,
}

/// An exec the monitor runs for a `husk exec`: its output pumps, and the
/// switch that stops its stdin pump once the process ended.
struct RunningExec {
    pumps: StdioPumps,
    stop_stdin: Arc<AtomicBool>,
}

struct Monitor {
    root: PathBuf,
    id: String,
    sandbox: Mutex<Option<Sandbox>>,
    agent: AgentClient,
    pumps: Mutex<Option<StdioPumps>>,
    link: Mutex<UnixStream>,
    host_pty_master: Mutex<Option<OwnedFd>>,
    host_cgroup: Mutex<Option<HostCgroup>>,
    /// The client's interfaces wired to the VM's taps, unwired at teardown.
    network: Mutex<Option<SandboxNetwork>>,
    execs: Mutex<HashMap<String, RunningExec>>,
    /// Held by the requests that change the container's state, so that
    /// they run one at a time as they did when the monitor served one
    /// connection at a time (execs, waits and queries run beside them).
    lifecycle: Mutex<()>,
}

fn take_fd(fd: i32) -> Option<File> {
    // SAFETY: fcntl(F_GETFD) only asks whether `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // The VMM and the backends this process spawns must not inherit it: a
    // copy held by QEMU would keep the container's stdout (or the ready
    // pipe) open after we close it.
    // SAFETY: fcntl(F_SETFD) on an fd we are taking ownership of.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: `husk create` placed this fd here for us; we own it now.
    Some(unsafe { File::from_raw_fd(fd) })
}

fn say_failed(ready: &mut File, message: String) {
    let _ = proto::write_message(ready, &ReadyMessage::Failed { message });
}

pub fn monitor(root: &Path, args: MonitorArgs) -> anyhow::Result<i32> {
    let mut ready =
        take_fd(FD_READY).context("no ready pipe: __monitor is started by husk create")?;
    let link = take_fd(FD_LINK).context("no shadow link")?;
    // SAFETY: FD_LINK is one end of a socketpair made by husk create.
    let link = unsafe { UnixStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(link)) };
    let stdio = [take_fd(FD_STDIN), take_fd(FD_STDOUT), take_fd(FD_STDERR)];
    let mut watch = Stopwatch::new();
    let monitor = match setup(root, &args, stdio, link, &mut watch) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            say_failed(&mut ready, super::one_line(&e));
            return Ok(1);
        }
    };
    let listener = match UnixListener::bind(state::monitor_socket(root, &args.id)) {
        Ok(l) => l,
        Err(e) => {
            say_failed(&mut ready, format!("binding the monitor socket: {e}"));
            monitor.teardown(&mut Stopwatch::new());
            return Ok(1);
        }
    };
    watch.lap("monitor socket");
    let phases = watch.finish();
    let _ = proto::write_message(&mut ready, &ReadyMessage::Ready { phases });
    drop(ready);
    let m = Arc::clone(&monitor);
    std::thread::spawn(move || m.watch_shadow());
    let m = Arc::clone(&monitor);
    std::thread::spawn(move || m.watch_sandbox());
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if monitor.serve(conn) {
            break;
        }
    }
    Ok(0)
}

fn setup(
    root: &Path,
    args: &MonitorArgs,
    stdio: [Option<File>; 3],
    link: UnixStream,
    watch: &mut Stopwatch,
) -> anyhow::Result<Monitor> {
    let mut bundle = Bundle::load(&args.bundle)?;
    let config = Config::load()?;
    let size = bundle.vm_size(&config)?;
    watch.lap("bundle and config");
    // Into the host cgroup first: the VMM and backends inherit it.
    let host_cgroup = supervisor::sandbox_cgroup(
        &bundle,
        size,
        &config,
        true,
        &[std::process::id(), args.shadow_pid as u32],
    )
    .context("config.json: linux.cgroupsPath: the sandbox's host cgroup")?;
    // Saved before anything can go wrong, for a `delete` after this
    // monitor died (the directories go with it otherwise).
    if let Some(cg) = host_cgroup.as_ref().filter(|cg| !cg.created().is_empty()) {
        state::update(root, &args.id, |s| s.host_cgroup = cg.created().to_vec())?;
    }
    watch.lap("host cgroup");
    let mut sc = SandboxConfig::new(&args.id, &config);
    sc.state_root = state::sandbox_root(root);
    sc.memory_mib = size.memory_mib;
    sc.vcpus = size.vcpus;
    // The client's interfaces, wired to taps before the VM boots with them.
    let network = match network::namespace_path(&bundle.spec) {
        Some(path) => {
            let (network, taps) = SandboxNetwork::wire(&path)?;
            sc.network = taps;
            network::guest_spec_without_network_path(&mut bundle.value);
            Some(network)
        }
        // Its own namespace, where a hook may put interfaces before start:
        // the shadow's (husk create made it), with a tap slot the VM boots with.
        None if network::interfaces_may_come_late(&bundle.spec) => {
            let path = PathBuf::from(format!("/proc/{}/ns/net", args.shadow_pid));
            let (network, tap) = SandboxNetwork::reserve_slot(&path)?;
            sc.network = vec![tap];
            Some(network)
        }
        None => {
            log::info!("{}: no network namespace path: loopback only", args.id);
            None
        }
    };
    watch.lap("network wiring");
    let mut sandbox = start_or_claim(&config, &sc, host_cgroup.as_ref())?;
    watch.lap("sandbox start or claim");
    // A claimed sandbox was booted by the pool: no boot steps here.
    if sandbox.timings.total_start_ms > 0.0 {
        watch.add(sandbox.timings.phases());
    }
    let shared = supervisor::share_container(&sandbox, &args.id, &bundle)?;
    watch.lap("share rootfs and mounts");
    let terminal = bundle
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let mut host_pty_master = None;
    let host_stdio = if terminal {
        let socket = args
            .console_socket
            .as_ref()
            .context("process.terminal is true but no --console-socket was given")?;
        let (stdio, master) = console::console_stdio(socket)?;
        host_pty_master = Some(master);
        stdio
    } else {
        let [stdin, stdout, stderr] = stdio;
        HostStdio {
            stdin: stdin.map(|f| Box::new(f) as Box<dyn std::io::Read + Send>),
            stdout: stdout.map(|f| Box::new(f) as Box<dyn Write + Send>),
            stderr: stderr.map(|f| Box::new(f) as Box<dyn Write + Send>),
            terminal: false,
        }
    };
    let (tokens, pumps) = sandbox.connect_stdio(host_stdio)?;
    watch.lap("stdio streams");
    let guest_create = sandbox.create_container(NewContainer {
        id: args.id.clone(),
        spec_json: bundle.spec_json(),
        rootfs_rel: shared.rootfs_rel,
        shared_mounts: shared.mounts,
        stdio: tokens,
        no_pivot: args.no_pivot,
        bundle: bundle.dir.clone(),
        // The container is its sandbox's only one. Not with a tap slot: the
        // interface a hook may add later is moved into a new namespace then,
        // so a slot that stays empty is never seen by the container.
        guest_network_namespace: !network.as_ref().is_some_and(|n| n.has_slot()),
    })?;
    watch.lap("CreateContainer RPC");
    watch.add(guest_create);
    let agent = sandbox.agent_client();
    if let Some(network) = network.as_ref().filter(|n| !n.is_empty()) {
        agent
            .update_network(&network.request(&args.id))
            .map_err(|e| sandbox.explain(e))
            .context("configuring the guest's network")?;
    }
    let st = state::update(root, &args.id, |s| {
        s.status = Status::Created;
        s.pid = args.shadow_pid;
        s.monitor_pid = std::process::id() as i32;
        s.monitor_start = state::process_start(std::process::id() as i32).unwrap_or(0);
    })?;
    watch.lap("network RPC and state");
    // The container exists in the guest, its process not yet started.
    hooks::run(
        bundle.spec.hooks().as_ref(),
        &st.oci(),
        HookKind::CreateRuntime,
    )?;
    hooks::run(bundle.spec.hooks().as_ref(), &st.oci(), HookKind::Prestart)?;
    watch.lap("createRuntime and prestart hooks");
    // An interface a hook put in the container's own namespace: wired to
    // the slot the VM booted with, and given to the guest before start.
    let mut network = network;
    if let Some(slotted) = network.as_mut().filter(|n| n.has_slot()) {
        slotted.fill_slot()?;
        if !slotted.is_empty() {
            agent
                .update_network(&slotted.request(&args.id))
                .map_err(|e| sandbox.explain(e))
                .context("configuring the guest's network")?;
        }
    }
    Ok(Monitor {
        root: root.to_path_buf(),
        id: args.id.clone(),
        sandbox: Mutex::new(Some(sandbox)),
        agent,
        pumps: Mutex::new(Some(pumps)),
        link: Mutex::new(link),
        host_pty_master: Mutex::new(host_pty_master),
        host_cgroup: Mutex::new(host_cgroup),
        network: Mutex::new(network),
        execs: Mutex::new(HashMap::new()),
        lifecycle: Mutex::new(()),
    })
}

/// A sandbox from the warm pool when the spec fits one of its classes,
/// else one booted here. A claimed sandbox's host processes (its keeper,
/// the VMM, the backends) move into the container's host cgroup, and its
/// directory (the pool's) is bound where this container's would be, so
/// its sockets and logs are found where every command looks for them.
fn start_or_claim(
    config: &Config,
    sc: &SandboxConfig,
    host_cgroup: Option<&HostCgroup>,
) -> anyhow::Result<Sandbox> {
    if let Some(claimed) = husk_runtime::pool::claim(config, sc) {
        let here = husk_runtime::sandbox::sandbox_dir(&sc.state_root, &sc.id);
        let taken = (|| -> anyhow::Result<()> {
            if let Some(cg) = host_cgroup {
                claimed
                    .move_into(cg)
                    .context("moving the pooled sandbox into the host cgroup")?;
            }
            husk_runtime::sandbox::private_dir_all(&sc.state_root)?;
            std::fs::create_dir(&here).with_context(|| format!("creating {}", here.display()))?;
            nix::mount::mount(
                Some(claimed.sandbox.dir.as_path()),
                &here,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("binding the pooled sandbox at {}", here.display()))?;
            Ok(())
        })();
        match taken {
            Ok(()) => {
                log::info!(
                    "{}: pooled sandbox {} claimed in {:.1} ms",
                    sc.id,
                    claimed.pooled_id,
                    claimed.claim_ms
                );
                return Ok(claimed.sandbox);
            }
            Err(e) => {
                log::warn!("{}: {e:#}: booting a sandbox of its own", sc.id);
                drop(claimed);
                let _ = husk_runtime::sandbox::unmount_below(&here);
                let _ = husk_runtime::sandbox::remove_tree_same_fs(&here);
            }
        }
    }
    Sandbox::start(config, sc).context("starting the sandbox")
}

/// What `ps` passes on of the guest's process list, in bytes.
const MAX_PS_BYTES: usize = 512 * 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request refused because of the container's state.
fn refused(message: String) -> anyhow::Error {
    MonitorError::new(MonitorErrorKind::FailedPrecondition, message).into()
}

/// The stdin of an exec, read from the descriptor `husk exec` handed over:
/// it ends (reads as EOF) once the process ended, so the monitor does not
/// go on holding, and reading, the caller's stdin.
struct ExecInput {
    fd: OwnedFd,
    stop: Arc<AtomicBool>,
}

impl Read for ExecInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(0);
            }
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => break,
                Err(e) => return Err(e.into()),
            }
        }
        loop {
            match nix::unistd::read(self.fd.as_raw_fd(), buf) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => return other.map_err(Into::into),
            }
        }
    }
}

impl Monitor {
    fn state(&self) -> anyhow::Result<ContainerState> {
        ContainerState::load(&self.root, &self.id)
    }

    /// Reads one request; a delete is served here, anything else on a
    /// thread of its own (an exec's wait lasts as long as its process).
    /// True when the monitor should exit.
    fn serve(self: &Arc<Self>, conn: UnixStream) -> bool {
        // A client that connects and says nothing does not hold the rest up.
        let _ = conn.set_read_timeout(Some(proto::REQUEST_READ));
        let (req, fds) =
            match proto::recv_with_fds::<MonitorRequest>(&conn, Some(proto::REQUEST_READ)) {
                Ok(r) => r,
                Err(e) => {
                    let e = MonitorError::new(
                        MonitorErrorKind::BadRequest,
                        format!("bad request: {e}"),
                    );
                    reply(&conn, Err(e.into()));
                    return false;
                }
            };
        let _ = conn.set_read_timeout(None);
        if matches!(req, MonitorRequest::Delete { .. }) {
            let result = self.handle(req, fds);
            let deleted = result.is_ok();
            reply(&conn, result);
            return deleted;
        }
        let m = Arc::clone(self);
        std::thread::spawn(move || reply(&conn, m.handle(req, fds)));
        false
    }

    fn handle(
        self: &Arc<Self>,
        req: MonitorRequest,
        fds: Vec<OwnedFd>,
    ) -> anyhow::Result<MonitorReply> {
        if fds.len() != req.fd_count() {
            return Err(MonitorError::new(
                MonitorErrorKind::BadRequest,
                format!(
                    "bad request: {} file descriptors came with it, {} expected",
                    fds.len(),
                    req.fd_count()
                ),
            )
            .into());
        }
        match req {
            MonitorRequest::Start => self.start(),
            MonitorRequest::Kill { signal, all } => {
                if !(1..=libc::SIGRTMAX()).contains(&signal) {
                    return Err(MonitorError::new(
                        MonitorErrorKind::BadRequest,
                        format!("bad request: {signal} is not a signal"),
                    )
                    .into());
                }
                let _serial = lock(&self.lifecycle);
                self.kill(signal, all).map(|_| MonitorReply::Done)
            }
            MonitorRequest::Delete { force } => self.delete(force),
            MonitorRequest::Exec { process, stdio } => self.exec(process, stdio, fds),
            MonitorRequest::Wait { exec_id } => self.wait_exec(&exec_id),
            MonitorRequest::Ps => self.ps(),
            MonitorRequest::Pause => self.pause(true),
            MonitorRequest::Resume => self.pause(false),
            MonitorRequest::Stats => self.stats(),
            MonitorRequest::Update { resources } => self.update(resources),
        }
    }

    fn start(self: &Arc<Self>) -> anyhow::Result<MonitorReply> {
        let _serial = lock(&self.lifecycle);
        let st = self.state()?;
        st.status
            .next(Event::Start)
            .map_err(|e| refused(e.to_string()))?;
        let mut watch = Stopwatch::new();
        let started = self.agent.start_container_timed(&self.id);
        let (pid, guest) = match started {
            Ok(started) => started,
            Err(e) => {
                let e = match lock(&self.sandbox).as_mut() {
                    Some(sb) => sb.explain(e),
                    None => husk_runtime::sandbox::SandboxError::Agent(e),
                };
                self.finish(127, 0);
                return Err(e.into());
            }
        };
        watch.lap("StartContainer RPC");
        watch.add(guest);
        let st = state::update(&self.root, &self.id, |s| {
            s.status = Status::Running;
            s.guest_pid = pid;
        })?;
        watch.lap("state");
        if let Some(master) = lock(&self.host_pty_master).take() {
            let agent = self.agent.clone();
            let id = self.id.clone();
            // The init's window is followed for as long as the monitor lives.
            let never = Arc::new(AtomicBool::new(false));
            std::thread::spawn(move || {
                console::follow_window_size(master, agent, id, String::new(), never)
            });
        }
        let m = Arc::clone(self);
        std::thread::spawn(move || m.wait_exit());
        let warnings = super::hooks::run_saved_hooks(&st, HookKind::Poststart);
        watch.lap("poststart hooks");
        Ok(MonitorReply::Started {
            pid,
            warnings,
            phases: watch.finish(),
        })
    }

    fn wait_exit(&self) {
        let end = supervisor::wait_process_end(&self.agent, &self.id, "", |e| {
            match lock(&self.sandbox).as_mut() {
                Some(sb) => sb.explain(e).to_string(),
                None => e.to_string(),
            }
        });
        if let Some(cause) = end.cause {
            // The VM is gone, and the container with it: record why
            // before the shadow exits, so `husk run` can say it.
            let _ = state::update(&self.root, &self.id, |s| {
                if s.error.is_none() {
                    s.error = Some(cause);
                }
            });
            // Output streams of a dead VM may never reach EOF: do not
            // wait for them.
            lock(&self.pumps).take();
        }
        let mut watch = Stopwatch::new();
        watch.add(end.guest_phases);
        if let Some(pumps) = lock(&self.pumps).take() {
            pumps.finish();
        }
        watch.lap("host output drained");
        self.finish(end.code, end.signal);
        watch.lap("state and shadow told");
        // Logged here: the monitor's log is `husk --debug create`'s.
        watch.finish().log("exit");
    }

    /// Watches the VMM and the device backends: the death of any of them
    /// ends the container, and the cause is recorded for the user.
    fn watch_sandbox(&self) {
        let Some(watch) = lock(&self.sandbox).as_ref().map(|sb| sb.death_watch()) else {
            return;
        };
        loop {
            // Blocks until a component dies or the sandbox is torn down.
            match watch.as_ref().map(|w| w.wait()) {
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => return,
                Ok(Err(e)) => return log::error!("{}: cannot watch the sandbox: {e}", self.id),
                Err(e) => return log::error!("{}: cannot watch the sandbox: {e}", self.id),
            }
            let died = match lock(&self.sandbox).as_mut() {
                Some(sb) => sb.check_components().err(),
                None => return,
            };
            if let Some(e) = died {
                log::error!("{}: {e}", self.id);
                let stopped = self
                    .state()
                    .map(|s| s.status == Status::Stopped)
                    .unwrap_or(true);
                let _ = state::update(&self.root, &self.id, |s| s.error = Some(e.to_string()));
                if !stopped {
                    if let Some(pumps) = lock(&self.pumps).take() {
                        drop(pumps);
                    }
                    self.finish(128 + libc::SIGKILL, libc::SIGKILL);
                }
                return;
            }
        }
    }

    /// Records the end and tells the shadow how to exit (once).
    fn finish(&self, code: i32, signal: i32) {
        let mut first = false;
        let _ = state::update(&self.root, &self.id, |s| {
            if s.status != Status::Stopped {
                first = true;
                s.status = Status::Stopped;
                s.exit_code = Some(code);
            }
        });
        if !first {
            return;
        }
        let mut link = lock(&self.link);
        let _ = proto::write_message(&mut *link, &ToShadow::Exit { code, signal });
    }

    fn kill(&self, signal: i32, all: bool) -> anyhow::Result<()> {
        match self.state()?.status {
            Status::Created => {
                // Never started: the process is "killed" before it ran.
                if let Some(pumps) = lock(&self.pumps).take() {
                    drop(pumps);
                }
                self.finish(128 + signal, signal);
                Ok(())
            }
            Status::Running | Status::Paused => self
                .agent
                .signal_process(&self.id, "", signal as u32, all)
                .map_err(Into::into),
            s => Err(refused(format!(
                "container {} is not running ({})",
                self.id,
                s.as_str()
            ))),
        }
    }

    /// Ends the VM, removes the container, then runs its poststop hooks.
    fn delete(&self, force: bool) -> anyhow::Result<MonitorReply> {
        let _serial = lock(&self.lifecycle);
        let st = self.state()?;
        st.status
            .next(Event::Delete { force })
            .map_err(|e| refused(format!("container {}: {e}", self.id)))?;
        let mut watch = Stopwatch::new();
        if matches!(st.status, Status::Running | Status::Paused) {
            let _ = self.agent.remove_container(&self.id, true);
            watch.lap("RemoveContainer RPC");
        }
        self.teardown(&mut watch);
        let warnings = super::hooks::run_saved_hooks(&st, HookKind::Poststop);
        watch.lap("poststop hooks");
        Ok(MonitorReply::DoneWithWarnings {
            warnings,
            phases: watch.finish(),
        })
    }

    /// Ends the VM and removes every trace of the container.
    fn teardown(&self, watch: &mut Stopwatch) {
        if let Some(sandbox) = lock(&self.sandbox).take() {
            match sandbox.shutdown() {
                Ok(guest) => {
                    let mut p = husk_runtime::phases::Phases::default();
                    p.push(
                        husk_runtime::phases::Clock::Host,
                        "  of which the Shutdown RPC",
                        guest,
                    );
                    watch.lap("sandbox shutdown");
                    watch.add(p);
                }
                Err(e) => log::warn!("{}: {e}", self.id),
            }
        }
        // A pooled sandbox's directory was bound here (`start_or_claim`);
        // a sandbox booted here has removed its own already.
        let here = husk_runtime::sandbox::sandbox_dir(&state::sandbox_root(&self.root), &self.id);
        let _ = husk_runtime::sandbox::unmount_below(&here);
        let _ = husk_runtime::sandbox::remove_tree_same_fs(&here);
        if let Some(mut network) = lock(&self.network).take() {
            network.unwire();
            watch.lap("network unwiring");
        }
        if let Some(mut cg) = lock(&self.host_cgroup).take() {
            cg.remove(std::process::id());
            watch.lap("host cgroup");
        }
        let dir = state::container_dir(&self.root, &self.id);
        let _ = std::fs::remove_dir_all(dir);
        watch.lap("state");
    }

    /// Starts a process in the container with the stdio `husk exec` handed
    /// over; its pumps live here until its `Wait` is answered.
    fn exec(
        &self,
        process: serde_json::Value,
        stdio: ExecStdio,
        fds: Vec<OwnedFd>,
    ) -> anyhow::Result<MonitorReply> {
        let status = self.state()?.status;
        if status != Status::Running {
            return Err(refused(format!(
                "cannot exec in a container that is {}",
                status.as_str()
            )));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let input = |fd: OwnedFd| {
            Box::new(ExecInput {
                fd,
                stop: Arc::clone(&stop),
            }) as Box<dyn Read + Send>
        };
        let output = |fd: OwnedFd| Box::new(File::from(fd)) as Box<dyn Write + Send>;
        let mut fds = fds.into_iter();
        let (host_stdio, master) = match stdio {
            ExecStdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                // In the order the request names them (fd_count checked).
                let stdin = stdin.then(|| fds.next()).flatten();
                let stdout = stdout.then(|| fds.next()).flatten();
                let stderr = stderr.then(|| fds.next()).flatten();
                let stdio = HostStdio {
                    stdin: stdin.map(input),
                    stdout: stdout.map(output),
                    stderr: stderr.map(output),
                    terminal: false,
                };
                (stdio, None)
            }
            ExecStdio::Terminal => {
                let (Some(slave), Some(master)) = (fds.next(), fds.next()) else {
                    bail!("a terminal exec needs the pty's slave and master");
                };
                let slave_in = slave.try_clone().context("duplicating the pty slave")?;
                let stdio = HostStdio {
                    stdin: Some(input(slave_in)),
                    stdout: Some(output(slave)),
                    stderr: None,
                    terminal: true,
                };
                (stdio, Some(master))
            }
        };
        let mut watch = Stopwatch::new();
        let (tokens, pumps) = husk_runtime::sandbox::connect_stdio_via(&self.agent, host_stdio)
            .with_context(|| format!("exec in {}", self.id))?;
        watch.lap("stdio streams");
        let exec_id = format!("exec-{:016x}", husk_runtime::agent::new_token());
        let req = ExecProcessRequest {
            container_id: self.id.clone(),
            exec_id: exec_id.clone(),
            process_json: serde_json::to_vec(&process)?,
            stdio: Some(tokens).into(),
            ..Default::default()
        };
        let (pid, guest) = match self.agent.exec_process_timed(&req) {
            Ok(started) => started,
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                return Err(anyhow::Error::from(e).context(format!("exec in {}", self.id)));
            }
        };
        if let Some(master) = master {
            let (agent, id, eid) = (self.agent.clone(), self.id.clone(), exec_id.clone());
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || console::follow_window_size(master, agent, id, eid, stop));
        }
        lock(&self.execs).insert(
            exec_id.clone(),
            RunningExec {
                pumps,
                stop_stdin: stop,
            },
        );
        watch.lap("ExecProcess RPC");
        watch.add(guest);
        Ok(MonitorReply::ExecStarted {
            exec_id,
            pid,
            phases: watch.finish(),
        })
    }

    /// Waits for an exec to end; its output is all delivered before the
    /// answer goes out.
    fn wait_exec(&self, exec_id: &str) -> anyhow::Result<MonitorReply> {
        if !lock(&self.execs).contains_key(exec_id) {
            return Err(MonitorError::new(
                MonitorErrorKind::BadRequest,
                format!("container {} has no exec {exec_id:?}", self.id),
            )
            .into());
        }
        let status = self.agent.wait_process(&self.id, exec_id);
        let exec = lock(&self.execs).remove(exec_id);
        if let Some(exec) = &exec {
            exec.stop_stdin.store(true, Ordering::Relaxed);
        }
        let status = status.with_context(|| format!("waiting for {exec_id} in {}", self.id))?;
        if let Some(exec) = exec {
            exec.pumps.finish();
        }
        let exit = husk_runtime::agent::ProcessExit::from_guest(status.exit_code, status.signal);
        Ok(MonitorReply::Exited {
            code: exit.code,
            signal: exit.signal,
        })
    }

    fn running_or_paused(&self) -> anyhow::Result<()> {
        match self.state()?.status {
            Status::Stopped => Err(refused(format!("container {} is not running", self.id))),
            _ => Ok(()),
        }
    }

    fn ps(&self) -> anyhow::Result<MonitorReply> {
        self.running_or_paused()?;
        // The list and its command lines are the guest's to choose: never
        // raw, and never more than half a reply frame in all, so a guest
        // that claims huge lists cannot make the reply unsendable.
        let mut budget = MAX_PS_BYTES;
        let processes = self
            .agent
            .list_processes(&self.id)?
            .into_iter()
            .map_while(|p| {
                let command = husk_runtime::agent::printable(&p.command, 4096);
                budget = budget.checked_sub(command.len() + 16)?;
                Some(GuestProcess {
                    pid: p.pid,
                    command,
                })
            })
            .collect();
        Ok(MonitorReply::Processes { processes })
    }

    fn stats(&self) -> anyhow::Result<MonitorReply> {
        self.running_or_paused()?;
        let s = self.agent.stats(&self.id)?;
        let stats = ContainerStats {
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            cpu_nr_periods: s.cpu_nr_periods,
            cpu_nr_throttled: s.cpu_nr_throttled,
            cpu_throttled_usec: s.cpu_throttled_usec,
            memory_current_bytes: s.memory_current_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            memory_oom_kill_events: s.memory_oom_kill_events,
            memory_stat: s
                .memory_stat
                .into_iter()
                .map(|(k, v)| (husk_runtime::agent::printable(&k, 64), v))
                .collect(),
            pids_current: s.pids_current,
            pids_limit: s.pids_limit,
            io_read_bytes: s.io_read_bytes,
            io_write_bytes: s.io_write_bytes,
        };
        Ok(MonitorReply::Stats { stats })
    }

    fn pause(&self, pause: bool) -> anyhow::Result<MonitorReply> {
        let _serial = lock(&self.lifecycle);
        let (want, to) = if pause {
            (Status::Running, Status::Paused)
        } else {
            (Status::Paused, Status::Running)
        };
        let status = self.state()?.status;
        if status != want {
            return Err(refused(format!(
                "container {} is {}, not {}",
                self.id,
                status.as_str(),
                want.as_str()
            )));
        }
        if pause {
            self.agent.pause(&self.id)?
        } else {
            self.agent.resume(&self.id)?
        }
        // Only from the state checked above: a container that stopped in
        // between stays stopped, never "paused" over its exit.
        let mut now = want;
        state::update(&self.root, &self.id, |s| {
            now = s.status;
            if s.status == want {
                s.status = to;
            }
        })?;
        if now != want {
            return Err(refused(format!(
                "container {} is {}, not {}",
                self.id,
                now.as_str(),
                want.as_str()
            )));
        }
        Ok(MonitorReply::Done)
    }

    fn update(
        &self,
        resources: Box<oci_spec::runtime::LinuxResources>,
    ) -> anyhow::Result<MonitorReply> {
        let _serial = lock(&self.lifecycle);
        self.running_or_paused()?;
        self.agent
            .update_resources(&self.id, serde_json::to_vec(&resources)?)?;
        // The host side carries the CPU limits too (host_cgroup's module comment).
        if let (Some(cg), Some(cpu)) = (lock(&self.host_cgroup).as_ref(), resources.cpu()) {
            cg.mirror_cpu(cpu)
                .context("linux.resources.cpu on the host cgroup")?;
        }
        Ok(MonitorReply::Done)
    }

    /// The shadow is state.pid: if it is killed from the host (its end of
    /// the link closes before the container ended), the container dies too.
    /// Signals it catches arrive as `ToMonitor::Signal` and are forwarded.
    fn watch_shadow(&self) {
        let mut link = match lock(&self.link).try_clone() {
            Ok(l) => l,
            Err(_) => return,
        };
        loop {
            match proto::read_message::<ToMonitor>(&mut link, None) {
                Ok(ToMonitor::Signal { signal }) => {
                    let _ = self.kill(signal, false);
                }
                // A whole frame that is not a message: the link is still in step.
                Err(proto::ProtocolError::Malformed(e)) => {
                    log::warn!("{}: from the shadow: {e}", self.id)
                }
                Err(_) => break,
            }
        }
        if let Ok(st) = self.state() {
            if matches!(
                st.status,
                Status::Running | Status::Paused | Status::Created
            ) {
                let _ = self.kill(libc::SIGKILL, true);
            }
        }
    }
}

/// Answers a request; an answer too large for a frame is answered with
/// an error that says so instead.
fn reply(conn: &UnixStream, result: anyhow::Result<MonitorReply>) {
    let response = match result {
        Ok(r) => MonitorResponse::Ok(r),
        Err(e) => MonitorResponse::Err(MonitorError::of(&e)),
    };
    let mut conn = conn;
    if let Err(e) = proto::write_message(&mut conn, &response) {
        if matches!(e, proto::ProtocolError::TooLarge { .. }) {
            let e = MonitorError::new(MonitorErrorKind::Internal, format!("the answer: {e}"));
            let _ = proto::write_message(&mut conn, &MonitorResponse::Err(e));
        }
    }
}

/// Sends one request to a container's monitor and returns its answer.
pub fn request(root: &Path, id: &str, req: &MonitorRequest) -> anyhow::Result<MonitorReply> {
    request_with_fds(root, id, req, &[])
}

/// Sends one request with file descriptors (an exec's stdio) to a
/// container's monitor and returns its answer.
pub fn request_with_fds(
    root: &Path,
    id: &str,
    req: &MonitorRequest,
    fds: &[std::os::fd::RawFd],
) -> anyhow::Result<MonitorReply> {
    let st = ContainerState::load(root, id)?;
    if !st.monitor_alive() {
        bail!("container {id} is stopped (its monitor is gone)");
    }
    let sock = st.monitor_socket(root);
    let conn =
        UnixStream::connect(&sock).with_context(|| format!("connecting to the monitor of {id}"))?;
    proto::send_with_fds(&conn, req, fds)
        .with_context(|| format!("sending a request to the monitor of {id}"))?;
    // One request per connection: the monitor reads nothing after it, and a
    // peer that waits for more (a monitor of an older husk, reading a line)
    // sees the end instead of hanging.
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let timeout = req.reply_timeout();
    conn.set_read_timeout(timeout)?;
    let response: MonitorResponse =
        proto::read_message(&mut &conn, timeout).map_err(|e| match e {
            proto::ProtocolError::Timeout(t) => anyhow::anyhow!(
                "the monitor of container {id} (pid {}) did not answer within {t:?}",
                st.monitor_pid
            ),
            proto::ProtocolError::Closed => {
                anyhow::anyhow!("the monitor of container {id} closed the connection unanswered")
            }
            e => anyhow::Error::from(e).context(format!("the monitor of container {id}")),
        })?;
    match response {
        MonitorResponse::Ok(reply) => Ok(reply),
        MonitorResponse::Err(e) => Err(e.into()),
    }
}

/// Prints the warnings an answer carries (host hooks that failed).
pub fn print_warnings(reply: &MonitorReply) {
    let warnings = match reply {
        MonitorReply::Started {
            warnings, phases, ..
        } => {
            phases.log("start");
            warnings
        }
        MonitorReply::DoneWithWarnings { warnings, phases } => {
            phases.log("delete");
            warnings
        }
        _ => return,
    };
    for w in warnings {
        eprintln!("husk: warning: {w}");
    }
}
