//! The per-sandbox monitor: `husk create` starts it as a daemon. It owns the
//! VM, its device backends and the agent connection, holds the container
//! process's stdio, and serves lifecycle requests on `monitor.sock`. When the
//! container's process ends it records the status and tells the shadow
//! process (state.pid) how to exit. Its death takes the VM with it (the VMM
//! and backends die with their parent), so nothing outlives it.
//!
//! File descriptors from `husk create`: 3, 4, 5 the container's stdin,
//! stdout and stderr; 6 the link to the shadow; 7 the ready pipe.

use super::bundle::Bundle;
use super::console;
use super::state::{self, ContainerState, Status};
use anyhow::{bail, Context};
use husk_runtime::agent::AgentClient;
use husk_runtime::config::Config;
use husk_runtime::host_cgroup::HostCgroup;
use husk_runtime::sandbox::{HostStdio, NewContainer, Sandbox, SandboxConfig, StdioPumps};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
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

struct Monitor {
    root: PathBuf,
    id: String,
    sandbox: Mutex<Option<Sandbox>>,
    agent: AgentClient,
    pumps: Mutex<Option<StdioPumps>>,
    link: Mutex<UnixStream>,
    host_pty_master: Mutex<Option<OwnedFd>>,
    host_cgroup: Mutex<Option<HostCgroup>>,
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

pub fn monitor(root: &Path, args: MonitorArgs) -> anyhow::Result<i32> {
    let mut ready =
        take_fd(FD_READY).context("no ready pipe: __monitor is started by husk create")?;
    let link = take_fd(FD_LINK).context("no shadow link")?;
    // SAFETY: FD_LINK is one end of a socketpair made by husk create.
    let link = unsafe { UnixStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(link)) };
    let stdio = [take_fd(FD_STDIN), take_fd(FD_STDOUT), take_fd(FD_STDERR)];
    let monitor = match setup(root, &args, stdio, link) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            let _ = writeln!(ready, "error {}", super::one_line(&e));
            return Ok(1);
        }
    };
    let listener = match UnixListener::bind(state::monitor_socket(root, &args.id)) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(ready, "error binding the monitor socket: {e}");
            monitor.teardown();
            return Ok(1);
        }
    };
    let _ = writeln!(ready, "ok");
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
) -> anyhow::Result<Monitor> {
    let bundle = Bundle::load(&args.bundle)?;
    let config = Config::load()?;
    let vm_memory_mib = bundle.memory_mib(&config)?;
    // Into the host cgroup first: the VMM and backends inherit it.
    let host_cgroup = match bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
    {
        Some(path) => {
            let cg = HostCgroup::create(&path.display().to_string())?;
            if let Some(cpu) = bundle
                .spec
                .linux()
                .as_ref()
                .and_then(|l| l.resources().as_ref())
                .and_then(|r| r.cpu().as_ref())
            {
                cg.mirror_cpu(cpu)
                    .context("config.json: linux.resources.cpu on the host cgroup")?;
            }
            let host_mib =
                u64::from(vm_memory_mib).saturating_add(u64::from(config.host_overhead_mib));
            cg.limit_sandbox(host_mib.saturating_mul(1 << 20), config.host_pids_max)
                .context("the sandbox's memory and pids bounds on the host cgroup")?;
            cg.add(std::process::id())?;
            cg.add(args.shadow_pid as u32)?;
            Some(cg)
        }
        None => None,
    };
    let mut sc = SandboxConfig::new(&args.id, &config);
    sc.state_root = state::sandbox_root(root);
    sc.memory_mib = vm_memory_mib;
    sc.vcpus = bundle.vcpus(&config)?;
    let mut sandbox = Sandbox::start(&config, &sc).context("starting the sandbox")?;
    let readonly_rootfs = bundle.readonly_rootfs();
    let rootfs = sandbox.share_rootfs(
        &args.id,
        &bundle.rootfs,
        readonly_rootfs.is_some(),
        readonly_rootfs.as_deref().unwrap_or(&[]),
    )?;
    let mut shared = HashMap::new();
    for (index, source, destination, mode) in bundle.bind_mounts() {
        let source = bundle.host_source(&source);
        let rel = sandbox
            .share_path(&args.id, index, &source, mode)
            .with_context(|| format!("config.json: mounts[{index}] ({destination})"))?;
        shared.insert(destination, rel);
    }
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
    sandbox.create_container(NewContainer {
        id: args.id.clone(),
        spec_json: bundle.spec_json.clone(),
        rootfs_rel: rootfs,
        shared_mounts: shared,
        stdio: tokens,
        no_pivot: args.no_pivot,
        bundle: bundle.dir.clone(),
    })?;
    let agent = sandbox.agent_client();
    let st = state::update(root, &args.id, |s| {
        s.status = Status::Created;
        s.pid = args.shadow_pid;
        s.monitor_pid = std::process::id() as i32;
        s.monitor_start = state::process_start(std::process::id() as i32).unwrap_or(0);
    })?;
    // The container exists in the guest, its process not yet started.
    super::hooks::run_spec_hooks(&bundle.spec, &st.oci(), "createRuntime")?;
    super::hooks::run_spec_hooks(&bundle.spec, &st.oci(), "prestart")?;
    Ok(Monitor {
        root: root.to_path_buf(),
        id: args.id.clone(),
        sandbox: Mutex::new(Some(sandbox)),
        agent,
        pumps: Mutex::new(Some(pumps)),
        link: Mutex::new(link),
        host_pty_master: Mutex::new(host_pty_master),
        host_cgroup: Mutex::new(host_cgroup),
    })
}

#[derive(serde::Deserialize)]
struct Request {
    op: String,
    #[serde(default)]
    signal: i32,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    force: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Monitor {
    fn state(&self) -> anyhow::Result<ContainerState> {
        ContainerState::load(&self.root, &self.id)
    }

    /// Handles one request; true when the monitor should exit.
    fn serve(self: &Arc<Self>, conn: UnixStream) -> bool {
        let mut line = String::new();
        // A request is one short JSON line: read no more than that.
        let mut reader = BufReader::new(match conn.try_clone() {
            Ok(c) => c,
            Err(_) => return false,
        })
        .take(MAX_LINE);
        if reader.read_line(&mut line).is_err() {
            return false;
        }
        let (reply, exit) = match serde_json::from_str::<Request>(&line) {
            Ok(req) => match self.handle(&req) {
                Ok(v) => (
                    serde_json::json!({"ok": true, "value": v}),
                    req.op == "delete",
                ),
                Err(e) => (
                    serde_json::json!({"ok": false, "error": super::one_line(&e)}),
                    false,
                ),
            },
            Err(e) => (
                serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
                false,
            ),
        };
        let mut conn = conn;
        let _ = writeln!(conn, "{reply}");
        exit
    }

    fn handle(self: &Arc<Self>, req: &Request) -> anyhow::Result<serde_json::Value> {
        match req.op.as_str() {
            "start" => self.start(),
            "kill" => self
                .kill(req.signal, req.all)
                .map(|_| serde_json::Value::Null),
            "delete" => self.delete(req.force).map(|_| serde_json::Value::Null),
            other => bail!("unknown monitor request {other:?}"),
        }
    }

    fn start(self: &Arc<Self>) -> anyhow::Result<serde_json::Value> {
        let st = self.state()?;
        if st.status != Status::Created {
            bail!("cannot start a container that is {}", st.status.as_str());
        }
        let pid = self.agent.start_container(&self.id);
        let pid = match pid {
            Ok(pid) => pid,
            Err(e) => {
                let e = match lock(&self.sandbox).as_mut() {
                    Some(sb) => sb.explain(e).to_string(),
                    None => e.to_string(),
                };
                self.finish(127, 0);
                bail!("{e}");
            }
        };
        state::update(&self.root, &self.id, |s| {
            s.status = Status::Running;
            s.guest_pid = pid;
        })?;
        if let Some(master) = lock(&self.host_pty_master).take() {
            let agent = self.agent.clone();
            let id = self.id.clone();
            std::thread::spawn(move || {
                console::follow_window_size(master, agent, id, String::new())
            });
        }
        let m = Arc::clone(self);
        std::thread::spawn(move || m.wait_exit());
        Ok(serde_json::json!(pid))
    }

    fn wait_exit(&self) {
        let (code, signal) = match self.agent.wait_process(&self.id, "") {
            Ok(s) => {
                let exit = husk_runtime::agent::ProcessExit::from_guest(s.exit_code, s.signal);
                (exit.code, exit.signal)
            }
            Err(e) => {
                // The VM is gone, and the container with it: record why
                // before the shadow exits, so `husk run` can say it.
                let cause = match lock(&self.sandbox).as_mut() {
                    Some(sb) => sb.explain(e).to_string(),
                    None => e.to_string(),
                };
                let _ = state::update(&self.root, &self.id, |s| {
                    if s.error.is_none() {
                        s.error = Some(cause);
                    }
                });
                // Output streams of a dead VM may never reach EOF: do not
                // wait for them.
                lock(&self.pumps).take();
                (128 + libc::SIGKILL, libc::SIGKILL)
            }
        };
        if let Some(pumps) = lock(&self.pumps).take() {
            pumps.finish();
        }
        self.finish(code, signal);
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
        let _ = writeln!(link, "exit {code} {signal}");
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
            s => bail!("container {} is not running ({})", self.id, s.as_str()),
        }
    }

    fn delete(&self, force: bool) -> anyhow::Result<()> {
        let st = self.state()?;
        if matches!(st.status, Status::Running | Status::Paused) && !force {
            bail!(
                "cannot delete container {} that is not stopped: {}",
                self.id,
                st.status.as_str()
            );
        }
        if matches!(st.status, Status::Running | Status::Paused) {
            let _ = self.agent.remove_container(&self.id, true);
        }
        self.teardown();
        Ok(())
    }

    /// Ends the VM and removes every trace of the container.
    fn teardown(&self) {
        if let Some(sandbox) = lock(&self.sandbox).take() {
            if let Err(e) = sandbox.shutdown() {
                log::warn!("{}: {e}", self.id);
            }
        }
        if let Some(mut cg) = lock(&self.host_cgroup).take() {
            cg.remove(std::process::id());
        }
        let dir = state::container_dir(&self.root, &self.id);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The shadow is state.pid: if it is killed from the host (its end of
    /// the link closes before the container ended), the container dies too.
    /// Signals it catches arrive as `signal N` lines and are forwarded.
    fn watch_shadow(&self) {
        let link = match lock(&self.link).try_clone() {
            Ok(l) => l,
            Err(_) => return,
        };
        for line in BufReader::new(link).lines() {
            let Ok(line) = line else { break };
            if let Some(sig) = line
                .strip_prefix("signal ")
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                let _ = self.kill(sig, false);
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

/// The longest line read from the monitor's socket, either way.
pub const MAX_LINE: u64 = 64 * 1024;

/// Sends one request to a container's monitor and returns its value.
pub fn request(root: &Path, id: &str, req: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let st = ContainerState::load(root, id)?;
    if !st.monitor_alive() {
        bail!("container {id} is stopped (its monitor is gone)");
    }
    let sock = st.monitor_socket(root);
    let mut conn =
        UnixStream::connect(&sock).with_context(|| format!("connecting to the monitor of {id}"))?;
    writeln!(conn, "{req}")?;
    let mut line = String::new();
    BufReader::new(conn).take(MAX_LINE).read_line(&mut line)?;
    let reply: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("monitor of {id}: bad reply"))?;
    if reply["ok"] == true {
        Ok(reply["value"].clone())
    } else {
        bail!("{}", reply["error"].as_str().unwrap_or("monitor error"))
    }
}
