//! The task service: containerd's task API on top of husk sandboxes.
//!
//! Task pids: every task and exec of this shim reports the shim's own pid.
//! The container's processes live in the guest, where host pids mean
//! nothing; the shim lives exactly as long as the VM serving them, and
//! `Pids` lists the real (guest) pids. containerd never signals the pid
//! itself: it asks the shim (`Kill`).

use crate::error::{self, TaskError};
use crate::io::host_stdio;
use crate::publisher::Publisher;
use crate::runtime_options;
use crate::spec::{self, Role};
use crate::state::{self, Record};
use containerd_shim::api;
use containerd_shim::protos::events::task::*;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::topics;
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use husk_protocol::agent::{ExecProcessRequest as AgentExec, Stdio as StdioTokens};
use husk_runtime::agent::{AgentClient, AgentError};
use husk_runtime::config::Config;
use husk_runtime::host_cgroup::HostCgroup;
use husk_runtime::sandbox::{
    connect_stdio_via, BootPhase, NewContainer, Sandbox, SandboxConfig, SandboxError, StdioPumps,
};
use husk_runtime::supervisor::network::{self, SandboxNetwork};
use husk_runtime::supervisor::{self, hooks, Bundle, Event, HookKind, Next, SupervisorError};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use ttrpc::Code;

fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    err(Code::INTERNAL, e.to_string())
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

fn ts_from_ns(ns: u64) -> Timestamp {
    Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
        ..Default::default()
    }
}

/// How a process ended.
#[derive(Clone)]
struct Exit {
    status: u32,
    at: Timestamp,
}

/// A process's place in its life: the supervisor's state machine (named
/// `Phase` here, where containerd's task `Status` is also in scope).
use husk_runtime::supervisor::Status as Phase;

/// The container's init process or an exec.
struct Proc {
    cid: String,
    exec_id: String,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    state: Mutex<ProcState>,
    exited: Condvar,
}

struct ProcState {
    phase: Phase,
    guest_pid: u32,
    exit: Option<Exit>,
    pumps: Option<StdioPumps>,
    /// An exec's OCI process, until it starts.
    exec_spec: Option<Vec<u8>>,
}

impl Proc {
    fn new(
        cid: &str,
        exec_id: &str,
        stdin: &str,
        stdout: &str,
        stderr: &str,
        terminal: bool,
    ) -> Arc<Proc> {
        Arc::new(Proc {
            cid: cid.into(),
            exec_id: exec_id.into(),
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal,
            state: Mutex::new(ProcState {
                phase: Phase::Created,
                guest_pid: 0,
                exit: None,
                pumps: None,
                exec_spec: None,
            }),
            exited: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the exit once, calling `before_wake` first (under the lock,
    /// before any waiter wakes); a second exit is ignored.
    fn set_exit(&self, exit: Exit, before_wake: impl FnOnce()) {
        let mut st = self.lock();
        if st.exit.is_some() {
            return;
        }
        before_wake();
        st.exit = Some(exit);
        if let Ok(Next::Is(next)) = st.phase.next(Event::Exit) {
            st.phase = next;
        }
        self.exited.notify_all();
    }

    fn wait(&self) -> Exit {
        let mut st = self.lock();
        loop {
            if let Some(e) = &st.exit {
                return e.clone();
            }
            st = self.exited.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Boots of one VM, at most: a second only after an agent that announced
/// itself and never answered.
const MAX_BOOT_ATTEMPTS: u32 = 2;

/// One VM: a pod's or a plain container's.
struct Pod {
    id: String,
    sandbox: Arc<Mutex<Option<Sandbox>>>,
    /// A second agent connection for the blocking WaitProcess calls, so
    /// they never hold the sandbox lock.
    waiter: AgentClient,
    dir: PathBuf,
    shared_dir: PathBuf,
    /// Tells the owner thread to shut the VM down: dropped, through the
    /// agent; `true` sent, without it (the guest did not answer).
    stop: Mutex<Option<std::sync::mpsc::Sender<bool>>>,
    owner: Mutex<Option<std::thread::JoinHandle<()>>>,
    dead: Mutex<Option<String>>,
    /// Guest pid of the sandbox container's process (pods).
    pause_pid: Mutex<Option<u32>>,
    /// The pod's host cgroup (the sandbox container's cgroupsPath), which
    /// holds this shim and the VM's helpers, with the VM's memory and pids
    /// bounds: kubelet's accounting of the pod sees the VM.
    host_cgroup: Mutex<Option<HostCgroup>>,
    /// The client's interfaces (CNI's, for a pod) wired to the VM's taps.
    network: Mutex<Option<SandboxNetwork>>,
}

impl Pod {
    /// Boots a VM on a thread of its own that lives as long as the VM: the
    /// VM's helper processes die with the thread that spawned them.
    fn boot(
        config: Config,
        sc: SandboxConfig,
        id: String,
        host_cgroup: Option<&HostCgroup>,
    ) -> anyhow::Result<Arc<Pod>> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<bool>();
        let slot: Arc<Mutex<Option<Sandbox>>> = Arc::new(Mutex::new(None));
        let owner_slot = slot.clone();
        let owner = std::thread::Builder::new()
            .name(format!("vm-{}", sc.id))
            .spawn(move || {
                // A guest whose agent announced itself but never answered
                // the host's connect is booted once more (a vsock backend
                // flake under load): by the error's phase, logged, and
                // counted in the error if the second boot fails too.
                let mut attempts = 1;
                // A warm sandbox from the pool when the pod's size fits a
                // class of it; its keeper stays the helpers' parent.
                let mut keeper = None;
                let mut started = match husk_runtime::pool::claim(&config, &sc) {
                    Some(claimed) => {
                        log::info!(
                            "VM {}: pooled sandbox {} claimed in {:.1} ms",
                            sc.id,
                            claimed.pooled_id,
                            claimed.claim_ms
                        );
                        keeper = Some(claimed.keeper_pid);
                        Ok(claimed.sandbox)
                    }
                    None => Sandbox::start(&config, &sc),
                };
                if let Err(e) = &started {
                    if e.boot_phase() == BootPhase::AgentNotReady {
                        log::warn!(
                            "VM {}: boot attempt {attempts} of {MAX_BOOT_ATTEMPTS} failed ({}): {e}; booting again",
                            sc.id,
                            e.boot_phase()
                        );
                        attempts += 1;
                        started = Sandbox::start(&config, &sc);
                    }
                }
                match started {
                    Ok(sb) => {
                        let dir = sb.dir.clone();
                        // Where the mounts are made, for cleanup after a
                        // dead shim (the guest's view is read-only).
                        let shared = sb
                            .share_host_dir()
                            .unwrap_or_else(|| sb.shared_dir())
                            .to_path_buf();
                        *owner_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(sb);
                        let _ = ready_tx.send(Ok((dir, shared, keeper)));
                    }
                    Err(source) => {
                        let _ = ready_tx.send(Err(TaskError::Boot {
                            phase: source.boot_phase(),
                            attempts,
                            source,
                        }));
                        return;
                    }
                }
                // Until told to stop (or the shim drops the pod).
                let without_agent = matches!(stop_rx.recv(), Ok(true));
                let sb = owner_slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                match sb {
                    // Dropping it stops the VMM and the backends.
                    Some(sb) if without_agent => drop(sb),
                    Some(sb) => {
                        if let Err(e) = sb.shutdown() {
                            log::warn!("shutting down the VM: {e}");
                        }
                    }
                    None => {}
                }
            })?;
        let (dir, shared_dir, keeper) = match ready_rx.recv() {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let _ = owner.join();
                return Err(e.into());
            }
            Err(_) => {
                let _ = owner.join();
                anyhow::bail!("the VM thread died while starting");
            }
        };
        // A claimed sandbox's host processes (its keeper and everything
        // under it) join the pod's host cgroup, as if spawned there.
        if let (Some(keeper), Some(cg)) = (keeper, host_cgroup) {
            let moved = husk_runtime::pool::process_tree(keeper)
                .into_iter()
                .try_for_each(|pid| cg.add(pid));
            if let Err(e) = moved {
                drop(stop_tx);
                let _ = owner.join();
                return Err(anyhow::Error::new(e).context("moving the pooled sandbox"));
            }
        }
        let waiter =
            match AgentClient::connect(&dir.join("vsock.sock"), Duration::from_secs(10), || Ok(()))
            {
                Ok(w) => w,
                Err(e) => {
                    drop(stop_tx);
                    let _ = owner.join();
                    return Err(anyhow::Error::new(e).context("second agent connection"));
                }
            };
        Ok(Arc::new(Pod {
            id,
            sandbox: slot,
            waiter,
            dir,
            shared_dir,
            stop: Mutex::new(Some(stop_tx)),
            owner: Mutex::new(Some(owner)),
            dead: Mutex::new(None),
            pause_pid: Mutex::new(None),
            host_cgroup: Mutex::new(None),
            network: Mutex::new(None),
        }))
    }

    /// Runs `f` on the live sandbox, under its lock: for host-side work
    /// only (the share's mounts), never for a call into the guest.
    fn try_with<T>(
        &self,
        f: impl FnOnce(&mut Sandbox) -> Result<T, SandboxError>,
    ) -> Result<T, (Code, String)> {
        if let Some(why) = self.dead.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err((Code::UNAVAILABLE, format!("the VM is gone: {why}")));
        }
        let mut guard = self.sandbox.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(sb) => f(sb).map_err(|e| (error::code_of_sandbox(&e), e.to_string())),
            None => Err((Code::UNAVAILABLE, "the VM is shut down".to_string())),
        }
    }

    /// [`Self::try_with`] for an RPC's answer.
    fn with<T>(&self, f: impl FnOnce(&mut Sandbox) -> Result<T, SandboxError>) -> TtrpcResult<T> {
        self.try_with(f).map_err(|(code, msg)| err(code, msg))
    }

    /// Calls into the guest without holding the sandbox lock: the agent's
    /// handle is taken under the lock, the lock is dropped, and `f` runs
    /// with every RPC bounded by the agent client's timeout. A stalled
    /// guest then holds only the request that asked it something, for at
    /// most that timeout, never the pod: state, other containers' requests
    /// and teardown go on. A failed call is explained by a dead VM
    /// component when there is one.
    fn try_call<T>(
        &self,
        f: impl FnOnce(&AgentClient) -> Result<T, AgentError>,
    ) -> Result<T, (Code, String)> {
        let agent = self.try_with(|sb| Ok(sb.agent_client()))?;
        f(&agent).map_err(|e| {
            let mut guard = self.sandbox.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_mut() {
                Some(sb) => {
                    let explained = sb.explain(e);
                    (error::code_of_sandbox(&explained), explained.to_string())
                }
                None => (error::code_of_kind(e.kind()), e.to_string()),
            }
        })
    }

    /// [`Self::try_call`] for an RPC's answer.
    fn call<T>(&self, f: impl FnOnce(&AgentClient) -> Result<T, AgentError>) -> TtrpcResult<T> {
        self.try_call(f).map_err(|(code, msg)| err(code, msg))
    }

    /// Checks whether a component of the VM died; returns the reason once.
    fn check(&self) -> Option<String> {
        if self
            .dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return None;
        }
        let mut guard = self.sandbox.lock().unwrap_or_else(|p| p.into_inner());
        let sb = guard.as_mut()?;
        let reason = sb.check_components().err()?.to_string();
        drop(guard);
        *self.dead.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        Some(reason)
    }

    /// Stops the VM without asking its agent (which did not answer), and
    /// waits until its processes are gone; the rest of the teardown (the
    /// host cgroup) is left to [`Self::teardown`].
    fn kill_vm(&self) {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(stop) = stop {
            let _ = stop.send(true);
        }
        let owner = self.owner.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = owner {
            let _ = h.join();
        }
    }

    fn teardown(&self) {
        self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        let owner = self.owner.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = owner {
            let _ = h.join();
        }
        // The taps went with QEMU; the filters on the client's interfaces
        // are removed here (the interfaces are the client's: CNI DEL).
        if let Some(mut network) = self
            .network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            network.unwire();
        }
        // The VM's processes are gone: leave the cgroup and remove it.
        if let Some(mut cg) = self
            .host_cgroup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            cg.remove(std::process::id());
        }
    }
}

struct Container {
    id: String,
    bundle: PathBuf,
    /// The spec's hooks, for poststart and poststop.
    hooks: Option<oci_spec::runtime::Hooks>,
    annotations: HashMap<String, String>,
    pod: Arc<Pod>,
    owns_vm: bool,
    rootfs_mount: Option<PathBuf>,
    init: Arc<Proc>,
    execs: HashMap<String, Arc<Proc>>,
}

/// What a container's late host hooks (poststart, poststop) need, taken
/// out of the registry so no lock is held while they run.
struct HookView {
    id: String,
    bundle: PathBuf,
    hooks: Option<oci_spec::runtime::Hooks>,
    annotations: HashMap<String, String>,
}

impl HookView {
    /// Runs every hook of `kind`; failures are warnings (runtime spec).
    fn run_all(&self, status: Phase, kind: HookKind) {
        let state = hooks::oci_state(
            &self.id,
            status,
            std::process::id() as i32,
            &self.bundle,
            &self.annotations,
        );
        for e in hooks::run_all(self.hooks.as_ref(), &state, kind) {
            log::warn!("{}: {e}", self.id);
        }
    }
}

impl Container {
    fn hook_view(&self) -> HookView {
        HookView {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            hooks: self.hooks.clone(),
            annotations: self.annotations.clone(),
        }
    }
}

struct Inner {
    namespace: String,
    publisher: Arc<Publisher>,
    exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Container>>,
    /// VMs by pod (or plain container) id.
    pods: Mutex<HashMap<String, Arc<Pod>>>,
    /// Container and VM ids whose Create is in progress, so two creates of
    /// one id cannot race; a Create waiting on its guest holds only its
    /// own ids, never a lock that other requests need.
    creating: Mutex<HashSet<String>>,
}

/// Ids reserved in [`Inner::creating`] until dropped.
struct Reservation<'a> {
    set: &'a Mutex<HashSet<String>>,
    keys: Vec<String>,
}

impl<'a> Reservation<'a> {
    /// Reserves every key, or none when one is already taken.
    fn take(set: &'a Mutex<HashSet<String>>, keys: Vec<String>) -> anyhow::Result<Self> {
        let mut held = set.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(busy) = keys.iter().find(|k| held.contains(*k)) {
            return Err(TaskError::CreateInProgress(busy.clone()).into());
        }
        held.extend(keys.iter().cloned());
        Ok(Reservation { set, keys })
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut held = self.set.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            held.remove(k);
        }
    }
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(namespace: String, publisher: Arc<Publisher>, exit: Arc<ExitSignal>) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace,
                publisher,
                exit,
                containers: Mutex::new(HashMap::new()),
                pods: Mutex::new(HashMap::new()),
                creating: Mutex::new(HashSet::new()),
            }),
        }
    }
}

impl Inner {
    /// Queues an event for containerd; it is sent (and retried) in order
    /// by the publisher's own thread.
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self.publisher.publish(topic, &self.namespace, event) {
            log::warn!("publishing {topic}: {e}");
        }
    }

    fn lookup(&self, id: &str, exec_id: &str) -> TtrpcResult<(Arc<Pod>, Arc<Proc>)> {
        let containers = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        let c = containers
            .get(id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id} not found")))?;
        let p = if exec_id.is_empty() {
            c.init.clone()
        } else {
            c.execs
                .get(exec_id)
                .cloned()
                .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {exec_id} of {id} not found")))?
        };
        Ok((c.pod.clone(), p))
    }

    fn pod_of(&self, id: &str) -> TtrpcResult<Arc<Pod>> {
        let containers = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        containers
            .get(id)
            .map(|c| c.pod.clone())
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id} not found")))
    }

    /// Records an exit and publishes it (once).
    fn exited(&self, proc_: &Proc, exit: Exit, oom: bool) {
        // Every byte written before the exit reaches containerd first.
        // (bounded: after a VM's death its streams may never close).
        let pumps = proc_.lock().pumps.take();
        if let Some(p) = pumps {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                p.finish();
                let _ = tx.send(());
            });
            if rx.recv_timeout(Duration::from_secs(5)).is_err() {
                log::warn!(
                    "output of {} {} not drained within 5s",
                    proc_.cid,
                    proc_.exec_id
                );
            }
        }
        // TaskExit is queued before Wait returns: containerd deletes the
        // task once Wait returns, and its TaskDelete must not overtake the
        // TaskExit (the publisher sends in queue order).
        proc_.set_exit(exit.clone(), || {
            if oom {
                self.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(TaskOOM {
                        container_id: proc_.cid.clone(),
                        ..Default::default()
                    }),
                );
            }
            let id = if proc_.exec_id.is_empty() {
                proc_.cid.clone()
            } else {
                proc_.exec_id.clone()
            };
            self.publish(
                topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(TaskExit {
                    container_id: proc_.cid.clone(),
                    id,
                    pid: std::process::id(),
                    exit_status: exit.status,
                    exited_at: Some(exit.at.clone()).into(),
                    ..Default::default()
                }),
            );
        });
    }

    /// Waits in the guest for the process's end.
    fn spawn_waiter(self: &Arc<Self>, pod: Arc<Pod>, proc_: Arc<Proc>) {
        let inner = self.clone();
        std::thread::spawn(move || {
            let end = supervisor::wait_process_end(&pod.waiter, &proc_.cid, &proc_.exec_id, |e| {
                // The VM died (the watcher reports it) or the agent broke.
                pod.check().unwrap_or_else(|| e.to_string())
            });
            if let Some(cause) = &end.cause {
                log::warn!("waiting for {} {}: {cause}", proc_.cid, proc_.exec_id);
            } else if proc_.exec_id.is_empty() {
                // The init is gone: so is the rest of the container, as
                // when a pid namespace's init dies.
                let id = proc_.cid.clone();
                let _ = pod.try_call(move |agent| {
                    agent.signal_process(&id, "", libc::SIGKILL as u32, true)
                });
            }
            let host_now = now();
            // The guest's clock, unless it is clearly off.
            let at = if end.exited_at_unix_ns > 0
                && (ts_from_ns(end.exited_at_unix_ns).seconds - host_now.seconds).abs() < 5
            {
                ts_from_ns(end.exited_at_unix_ns)
            } else {
                host_now
            };
            inner.exited(
                &proc_,
                Exit {
                    status: end.code.unsigned_abs(),
                    at,
                },
                end.oom_killed,
            );
        });
    }

    /// Every process still running in `pod`'s VM has ended with it.
    fn vm_gone(&self, pod: &Arc<Pod>) {
        let procs: Vec<Arc<Proc>> = {
            let containers = self.containers.lock().unwrap_or_else(|p| p.into_inner());
            containers
                .values()
                .filter(|c| Arc::ptr_eq(&c.pod, pod))
                .flat_map(|c| std::iter::once(c.init.clone()).chain(c.execs.values().cloned()))
                .collect()
        };
        for p in procs {
            let running = matches!(p.lock().phase, Phase::Running | Phase::Paused);
            if running {
                let exit = Exit {
                    status: 128 + libc::SIGKILL as u32,
                    at: now(),
                };
                self.exited(&p, exit, false);
            }
        }
    }

    /// Watches a VM: when its VMM or a backend dies, every process in it has
    /// ended.
    fn spawn_monitor(self: &Arc<Self>, pod: Arc<Pod>) {
        let inner = Arc::downgrade(self);
        let watch = match pod
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(sb) => sb.death_watch(),
            None => return,
        };
        std::thread::spawn(move || {
            // Blocks until a component dies (then looks once) or the
            // sandbox is torn down.
            match watch {
                Ok(w) if matches!(w.wait(), Ok(Some(_))) => {}
                Ok(_) => return,
                Err(e) => return log::error!("VM {}: cannot watch it: {e}", pod.dir.display()),
            }
            let Some(inner) = inner.upgrade() else { return };
            if pod
                .sandbox
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none()
            {
                return;
            }
            if let Some(reason) = pod.check() {
                log::warn!("VM {} died: {reason}", pod.dir.display());
                inner.vm_gone(&pod);
            }
        });
    }

    fn create(self: &Arc<Self>, req: &api::CreateTaskRequest) -> anyhow::Result<u32> {
        let id = req.id.clone();
        if !husk_runtime::sandbox::valid_id(&id) {
            return Err(TaskError::InvalidId(id).into());
        }
        let _reserved = Reservation::take(&self.creating, vec![format!("container {id}")])?;
        if self
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
        {
            return Err(TaskError::ContainerExists(id).into());
        }
        if !req.checkpoint.is_empty() {
            return Err(TaskError::Checkpoint.into());
        }
        let config = runtime_config(req.options.as_ref())?;
        let bundle_dir = PathBuf::from(&req.bundle);
        // The rootfs containerd hands over as mounts, at the bundle's
        // `rootfs` (which the spec's root.path names for containerd).
        let mut rootfs_mount = None;
        if !req.rootfs.is_empty() && bundle_dir.is_dir() {
            let target = bundle_dir.join("rootfs");
            std::fs::create_dir_all(&target)?;
            for m in &req.rootfs {
                if let Err(e) = crate::mount::mount_one(&m.type_, &m.source, &m.options, &target) {
                    let _ = husk_runtime::sandbox::unmount_below(&target);
                    return Err(anyhow::anyhow!("mounting the rootfs: {e:#}"));
                }
                rootfs_mount = Some(target.clone());
            }
        }
        let undo_rootfs = |m: &Option<PathBuf>| {
            if let Some(m) = m {
                let _ = husk_runtime::sandbox::unmount_below(m);
            }
        };
        let mut bundle = match Bundle::load(&bundle_dir) {
            Ok(b) => b,
            Err(e) => {
                undo_rootfs(&rootfs_mount);
                return Err(e.into());
            }
        };
        if let Some(target) = &rootfs_mount {
            bundle.rootfs = target.clone();
        }
        let role = spec::role(&id, &bundle.annotations());

        // The VM: a new one, or the pod's.
        let (pod, owns_vm) = match &role {
            Role::Standalone | Role::PodSandbox { .. } => {
                let vm_id = match &role {
                    Role::PodSandbox { pod } => pod.clone(),
                    _ => id.clone(),
                };
                let vm_reserved =
                    match Reservation::take(&self.creating, vec![format!("the VM {vm_id}")]) {
                        Ok(r) => r,
                        Err(e) => {
                            undo_rootfs(&rootfs_mount);
                            return Err(e);
                        }
                    };
                if self
                    .pods
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&vm_id)
                {
                    undo_rootfs(&rootfs_mount);
                    return Err(TaskError::VmExists(vm_id).into());
                }
                let mut sc = SandboxConfig::new(&vm_id, &config);
                sc.state_root = state::state_root(&self.namespace);
                let size = match bundle.vm_size(&config) {
                    Ok(size) => size,
                    Err(e) => {
                        undo_rootfs(&rootfs_mount);
                        return Err(e.into());
                    }
                };
                sc.memory_mib = size.memory_mib;
                sc.vcpus = size.vcpus;
                // Into the pod's host cgroup before the VM's helpers are
                // spawned: they inherit it. A pod's sandbox container
                // carries the pause process's CPU limits, not the pod's.
                let cpu_limits = matches!(role, Role::Standalone);
                let host_cgroup = match supervisor::sandbox_cgroup(
                    &bundle,
                    size,
                    &config,
                    cpu_limits,
                    &[std::process::id()],
                ) {
                    Ok(cg) => cg,
                    // containerd's systemd cgroup driver: the VM stays in
                    // the shim's cgroup (husk uses the cgroupfs layout).
                    Err(e @ husk_runtime::host_cgroup::HostCgroupError::Systemd(_)) => {
                        log::warn!("{e}; the VM stays in the shim's cgroup");
                        None
                    }
                    Err(e) => {
                        undo_rootfs(&rootfs_mount);
                        return Err(e.into());
                    }
                };
                // The client's interfaces (CNI's), wired to taps the VM
                // boots with; the guest gets a new namespace in place of
                // the client's, which UpdateNetwork fills.
                let network = match network::namespace_path(&bundle.spec) {
                    Some(path) => match SandboxNetwork::wire(&path) {
                        Ok((network, taps)) => {
                            sc.network = taps;
                            Some(network)
                        }
                        Err(e) => {
                            undo_rootfs(&rootfs_mount);
                            return Err(e.into());
                        }
                    },
                    None => None,
                };
                match Pod::boot(config.clone(), sc, vm_id.clone(), host_cgroup.as_ref()) {
                    Ok(pod) => {
                        *pod.host_cgroup.lock().unwrap_or_else(|p| p.into_inner()) = host_cgroup;
                        *pod.network.lock().unwrap_or_else(|p| p.into_inner()) = network;
                        self.pods
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(vm_id, pod.clone());
                        self.spawn_monitor(pod.clone());
                        drop(vm_reserved);
                        (pod, true)
                    }
                    Err(e) => {
                        undo_rootfs(&rootfs_mount);
                        return Err(e);
                    }
                }
            }
            Role::PodMember { pod } => {
                let found = self
                    .pods
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(pod)
                    .cloned();
                match found {
                    Some(p) => (p, false),
                    None => {
                        undo_rootfs(&rootfs_mount);
                        return Err(TaskError::PodNotServed {
                            pod: pod.clone(),
                            id,
                        }
                        .into());
                    }
                }
            }
        };
        let result = self
            .create_in_vm(&id, &mut bundle, &pod, &role, req)
            .and_then(|pumps| {
                if owns_vm {
                    let request = pod
                        .network
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .filter(|n| !n.is_empty())
                        .map(|n| n.request(&id));
                    if let Some(request) = request {
                        pod.try_call(move |agent| agent.update_network(&request))
                            .map_err(|(code, message)| TaskError::Pod { code, message })?;
                    }
                }
                // The container exists in the guest, its process not yet
                // started: the host hooks of create, as the CLI runs them.
                let state = hooks::oci_state(
                    &id,
                    Phase::Created,
                    std::process::id() as i32,
                    &bundle.dir,
                    &bundle.annotations(),
                );
                let hooked = hooks::run(
                    bundle.spec.hooks().as_ref(),
                    &state,
                    HookKind::CreateRuntime,
                )
                .and_then(|()| {
                    hooks::run(bundle.spec.hooks().as_ref(), &state, HookKind::Prestart)
                });
                if let Err(e) = hooked {
                    if !owns_vm {
                        let guest_id = id.clone();
                        let _ = pod.try_call(move |agent| agent.remove_container(&guest_id, true));
                    }
                    return Err(e.into());
                }
                Ok(pumps)
            });
        match result {
            Ok(pumps) => {
                let record = Record {
                    sandbox_dir: pod.dir.clone(),
                    shared_dir: pod.shared_dir.clone(),
                    owns_vm,
                    rootfs_mount: rootfs_mount.clone(),
                    network_namespace: if owns_vm {
                        pod.network
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_ref()
                            .map(|n| n.path().to_path_buf())
                    } else {
                        None
                    },
                    host_cgroup: if owns_vm {
                        pod.host_cgroup
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_ref()
                            .map(|cg| cg.created().to_vec())
                            .unwrap_or_default()
                    } else {
                        Vec::new()
                    },
                };
                if let Err(e) = state::write_record(&bundle.dir, &record) {
                    log::warn!("writing the shim record: {e}");
                }
                let init = Proc::new(&id, "", &req.stdin, &req.stdout, &req.stderr, req.terminal);
                self.containers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        id.clone(),
                        Container {
                            id: id.clone(),
                            bundle: bundle.dir.clone(),
                            hooks: bundle.spec.hooks().clone(),
                            annotations: bundle.annotations(),
                            pod,
                            owns_vm,
                            rootfs_mount,
                            init: init.clone(),
                            execs: HashMap::new(),
                        },
                    );
                init.lock().pumps = Some(pumps);
                Ok(std::process::id())
            }
            Err(e) => {
                let _ = pod.with(|sb| sb.unshare_container(&id));
                if owns_vm {
                    self.pods
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&pod.id);
                    pod.teardown();
                }
                undo_rootfs(&rootfs_mount);
                Err(e)
            }
        }
    }
}

impl Inner {
    fn create_in_vm(
        &self,
        id: &str,
        bundle: &mut Bundle,
        pod: &Arc<Pod>,
        role: &Role,
        req: &api::CreateTaskRequest,
    ) -> anyhow::Result<StdioPumps> {
        let pause_pid = match role {
            Role::PodMember { pod: pod_id } => {
                let pid = *pod.pause_pid.lock().unwrap_or_else(|p| p.into_inner());
                Some(pid.ok_or_else(|| TaskError::PodNotStarted(pod_id.clone()))?)
            }
            _ => None,
        };
        spec::rewrite_for_guest(&mut bundle.value, pause_pid);
        let stdio = host_stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal)?;
        // The host-side mounts under the sandbox lock (no guest call)...
        let shared = pod
            .try_with(|sb| Ok(supervisor::share_container(sb, id, bundle)))
            .and_then(|shared| {
                shared.map_err(|e: SupervisorError| {
                    let code = e
                        .sandbox()
                        .map_or(Code::INVALID_ARGUMENT, error::code_of_sandbox);
                    (code, e.to_string())
                })
            })
            .map_err(|(code, message)| TaskError::Pod { code, message })?;
        // ...the guest's part without it.
        let request = NewContainer {
            id: id.to_string(),
            spec_json: bundle.spec_json(),
            rootfs_rel: shared.rootfs_rel,
            shared_mounts: shared.mounts,
            stdio: Default::default(),
            no_pivot: false,
            bundle: bundle.dir.clone(),
            // The VM's first container (a pod's sandbox container, or a
            // container with a VM of its own) owns its network; a pod's
            // other containers join the sandbox container's namespaces.
            guest_network_namespace: !matches!(role, Role::PodMember { .. }),
        };
        let result = pod.try_call(move |agent| {
            let (tokens, pumps) = connect_stdio_via(agent, stdio).map_err(stdio_error)?;
            let req = NewContainer {
                stdio: tokens,
                ..request
            }
            .into_request();
            // The guest's steps are only shown by the CLI's --debug.
            agent.create_container(&req)?;
            Ok(pumps)
        });
        result.map_err(|(code, message)| TaskError::Pod { code, message }.into())
    }
}

/// The husk configuration for a new VM: the file named by the runtime
/// options (`ConfigPath`), else the default one.
fn runtime_config(options: Option<&Any>) -> anyhow::Result<Config> {
    let Some(any) = options.filter(|a| !a.type_url.is_empty()) else {
        return Ok(Config::load()?);
    };
    let name = any.type_url.rsplit('/').next().unwrap_or(&any.type_url);
    match name {
        runtime_options::TYPE_NAME => {
            let config_path = runtime_options::config_path(&any.value)?;
            if config_path.is_empty() {
                Ok(Config::load()?)
            } else {
                Ok(Config::from_file(Path::new(&config_path))?)
            }
        }
        "containerd.runc.v1.Options" => {
            let o = api::Options::parse_from_bytes(&any.value)?;
            if o != api::Options::default() {
                return Err(TaskError::RuntimeOptions(format!("husk does not take runc options ({o:?}); use runtimeoptions.v1.Options with ConfigPath naming a husk config file")).into());
            }
            Ok(Config::load()?)
        }
        other => Err(TaskError::RuntimeOptions(format!("type {other:?} is not supported: husk takes runtimeoptions.v1.Options (ConfigPath = a husk config file)")).into()),
    }
}

fn status_of(phase: Phase) -> Status {
    match phase {
        Phase::Creating | Phase::Created => Status::CREATED,
        Phase::Running => Status::RUNNING,
        Phase::Paused => Status::PAUSED,
        Phase::Stopped => Status::STOPPED,
    }
}

/// A failure to connect a process's stdio streams, as an agent error: an
/// agent's own error keeps its kind; anything else means the guest's
/// streams could not be reached.
fn stdio_error(e: SandboxError) -> AgentError {
    match e {
        SandboxError::Agent(agent) => agent,
        other => AgentError::Aborted(other.to_string()),
    }
}

/// An error chain as containerd's status: its code by the type of its
/// cause (see `error::code_of`), the whole chain as the message.
fn any_err(e: anyhow::Error) -> ttrpc::Error {
    err(error::code_of(&e), format!("{e:#}"))
}

impl containerd_shim::Task for Service {
    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let (_pod, p) = self.inner.lookup(&req.id, &req.exec_id)?;
        let bundle = {
            let containers = self
                .inner
                .containers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            containers
                .get(&req.id)
                .map(|c| c.bundle.display().to_string())
                .unwrap_or_default()
        };
        let st = p.lock();
        Ok(api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle,
            pid: std::process::id(),
            status: status_of(st.phase).into(),
            stdin: p.stdin.clone(),
            stdout: p.stdout.clone(),
            stderr: p.stderr.clone(),
            terminal: p.terminal,
            exit_status: st.exit.as_ref().map(|e| e.status).unwrap_or(0),
            exited_at: st.exit.as_ref().map(|e| e.at.clone()).into(),
            ..Default::default()
        })
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.inner.create(&req).map_err(any_err)?;
        self.inner.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let (pod, p) = self.inner.lookup(&req.id, &req.exec_id)?;
        let phase = p.lock().phase;
        if let Err(e) = phase.next(Event::Start) {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("{} {}: {e}", req.id, req.exec_id),
            ));
        }
        let guest_pid = if req.exec_id.is_empty() {
            let id = req.id.clone();
            pod.call(move |agent| agent.start_container(&id))?
        } else {
            let process_json = p.lock().exec_spec.take().unwrap_or_default();
            let stdio = host_stdio(&p.stdin, &p.stdout, &p.stderr, p.terminal).map_err(internal)?;
            let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
            let started = pod.call(move |agent| {
                let (tokens, pumps): (StdioTokens, StdioPumps) =
                    connect_stdio_via(agent, stdio).map_err(stdio_error)?;
                let r = AgentExec {
                    container_id: id,
                    exec_id,
                    process_json,
                    stdio: Some(tokens).into(),
                    ..Default::default()
                };
                let pid = agent.exec_process(&r)?;
                Ok((pid, pumps))
            });
            // An exec that could not start never will: its Wait (ctr and
            // CRI wait before they start) returns now, not never.
            let (pid, pumps) = started.inspect_err(|_| {
                p.set_exit(
                    Exit {
                        status: 255,
                        at: now(),
                    },
                    || {},
                )
            })?;
            p.lock().pumps = Some(pumps);
            pid
        };
        {
            let mut st = p.lock();
            st.phase = Phase::Running;
            st.guest_pid = guest_pid;
        }
        if req.exec_id.is_empty() {
            let is_vm_owner = {
                let containers = self
                    .inner
                    .containers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                containers.get(&req.id).is_some_and(|c| c.owns_vm)
            };
            if is_vm_owner {
                *pod.pause_pid.lock().unwrap_or_else(|p| p.into_inner()) = Some(guest_pid);
            }
        }
        self.inner.spawn_waiter(pod, p);
        if req.exec_id.is_empty() {
            let containers = self
                .inner
                .containers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(c) = containers.get(&req.id) {
                let c = c.hook_view();
                drop(containers);
                c.run_all(Phase::Running, HookKind::Poststart);
            }
        }
        let pid = std::process::id();
        if req.exec_id.is_empty() {
            self.inner.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            self.inner.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (pod, p) = self.inner.lookup(&req.id, &req.exec_id)?;
        let (phase, exit) = {
            let st = p.lock();
            (st.phase, st.exit.clone())
        };
        if let Err(e) = phase.next(Event::Delete { force: false }) {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("{} {}: {e}; kill it first", req.id, req.exec_id),
            ));
        }
        let exit = exit.unwrap_or(Exit {
            status: 0,
            at: now(),
        });
        // A process that never ran ends with its deletion: a Wait on it
        // returns instead of holding a server thread (and the shim's exit)
        // forever.
        p.set_exit(exit.clone(), || {});
        if !req.exec_id.is_empty() {
            let mut containers = self
                .inner
                .containers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(c) = containers.get_mut(&req.id) {
                c.execs.remove(&req.exec_id);
            }
            return Ok(api::DeleteResponse {
                pid: std::process::id(),
                exit_status: exit.status,
                exited_at: Some(exit.at).into(),
                ..Default::default()
            });
        }
        let container = self
            .inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.id);
        let Some(container) = container else {
            return Err(err(
                Code::NOT_FOUND,
                format!("container {} not found", req.id),
            ));
        };
        // Nothing of it stays in the guest or shared into it. (The VM's own
        // container goes with the VM: the guest is not asked.)
        let id = container.id.clone();
        let guest_id = id.clone();
        if !container.owns_vm {
            if let Err(e) = pod.call(move |agent| agent.remove_container(&guest_id, true)) {
                log::warn!("removing {id} in the guest: {e}");
            }
        }
        let _ = pod.with(move |sb| sb.unshare_container(&id));
        if container.owns_vm {
            self.inner
                .pods
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&pod.id);
            pod.teardown();
            // Containers of the pod still left ended with its VM.
            self.inner.vm_gone(&pod);
        }
        if let Some(m) = &container.rootfs_mount {
            if let Err(e) = husk_runtime::sandbox::unmount_below(m) {
                log::warn!("unmounting {}: {e}", m.display());
            }
        }
        state::remove_record(&container.bundle);
        container
            .hook_view()
            .run_all(Phase::Stopped, HookKind::Poststop);
        self.inner.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid: std::process::id(),
                exit_status: exit.status,
                exited_at: Some(exit.at.clone()).into(),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid: std::process::id(),
            exit_status: exit.status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pod = self.inner.pod_of(&req.id)?;
        let id = req.id.clone();
        let list = pod.call(move |agent| agent.list_processes(&id))?;
        Ok(api::PidsResponse {
            processes: list
                .into_iter()
                .map(|p| ProcessInfo {
                    pid: p.pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let (pod, p) = self.inner.lookup(&req.id, "")?;
        let paused = p.lock().phase.next(Event::Pause);
        let Ok(Next::Is(paused)) = paused else {
            let why = paused.err().map(|e| e.to_string()).unwrap_or_default();
            return Err(err(Code::FAILED_PRECONDITION, format!("{}: {why}", req.id)));
        };
        let id = req.id.clone();
        pod.call(move |agent| agent.pause(&id))?;
        p.lock().phase = paused;
        self.inner.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let (pod, p) = self.inner.lookup(&req.id, "")?;
        let id = req.id.clone();
        pod.call(move |agent| agent.resume(&id))?;
        {
            let mut st = p.lock();
            if let Ok(Next::Is(next)) = st.phase.next(Event::Resume) {
                st.phase = next;
            }
        }
        self.inner.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            "checkpoint is not supported by husk (the container's state lives inside a VM)",
        ))
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (pod, p) = self.inner.lookup(&req.id, &req.exec_id)?;
        let phase = p.lock().phase;
        match phase {
            Phase::Stopped => {
                return Err(err(
                    Code::NOT_FOUND,
                    format!("process {} {} already finished", req.id, req.exec_id),
                ))
            }
            Phase::Creating | Phase::Created => {
                // Never started: it ends without running (as with runc).
                if req.exec_id.is_empty() {
                    let id = req.id.clone();
                    let _ = pod.call(move |agent| agent.remove_container(&id, true));
                }
                self.inner.exited(
                    &p,
                    Exit {
                        status: 128 + req.signal,
                        at: now(),
                    },
                    false,
                );
                return Ok(api::Empty::default());
            }
            Phase::Running | Phase::Paused => {}
        }
        let (id, exec_id, signal, all) = (req.id.clone(), req.exec_id.clone(), req.signal, req.all);
        let sent = pod.call(move |agent| agent.signal_process(&id, &exec_id, signal, all));
        if let Err(e) = sent {
            // SIGKILL of a VM's own container (a pod's sandbox, a plain
            // container) ends everything in the VM: if the guest cannot be
            // told, the VM is stopped from the host, so a guest that hangs
            // can still be torn down.
            let owns_vm = self
                .inner
                .containers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&req.id)
                .is_some_and(|c| c.owns_vm);
            if req.signal != libc::SIGKILL as u32 || !req.exec_id.is_empty() || !owns_vm {
                return Err(e);
            }
            log::warn!(
                "SIGKILL for {} did not reach the guest ({e}); stopping its VM",
                req.id
            );
            pod.kill_vm();
            self.inner.vm_gone(&pod);
        }
        Ok(api::Empty::default())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        if req.exec_id.is_empty() || !husk_runtime::sandbox::valid_id(&req.exec_id) {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!("invalid exec id {:?}", req.exec_id),
            ));
        }
        let process_json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if serde_json::from_slice::<oci_spec::runtime::Process>(&process_json).is_err() {
            return Err(err(
                Code::INVALID_ARGUMENT,
                "exec: the process spec is not a valid OCI process",
            ));
        }
        {
            let mut containers = self
                .inner
                .containers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let c = containers
                .get_mut(&req.id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
            if c.execs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            let p = Proc::new(
                &req.id,
                &req.exec_id,
                &req.stdin,
                &req.stdout,
                &req.stderr,
                req.terminal,
            );
            p.lock().exec_spec = Some(process_json);
            c.execs.insert(req.exec_id.clone(), p);
        }
        self.inner.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let (pod, _p) = self.inner.lookup(&req.id, &req.exec_id)?;
        let (id, exec_id, rows, cols) =
            (req.id.clone(), req.exec_id.clone(), req.height, req.width);
        pod.call(move |agent| agent.resize_tty(&id, &exec_id, rows, cols))?;
        Ok(api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let (pod, _p) = self.inner.lookup(&req.id, &req.exec_id)?;
        if req.stdin {
            let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
            pod.call(move |agent| agent.close_stdin(&id, &exec_id))?;
        }
        Ok(api::Empty::default())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let pod = self.inner.pod_of(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources).is_err() {
            return Err(err(
                Code::INVALID_ARGUMENT,
                "update: resources are not valid OCI linux.resources JSON",
            ));
        }
        let id = req.id.clone();
        pod.call(move |agent| agent.update_resources(&id, resources))?;
        Ok(api::Empty::default())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (_pod, p) = self.inner.lookup(&req.id, &req.exec_id)?;
        let exit = p.wait();
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let pod = self.inner.pod_of(&req.id)?;
        let id = req.id.clone();
        let s = pod.call(move |agent| agent.stats(&id))?;
        let metrics = crate::metrics::to_cgroup2(&s);
        let any = Any {
            type_url: metrics.descriptor_dyn().full_name().to_string(),
            value: metrics.write_to_bytes().map_err(internal)?,
            ..Default::default()
        };
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: std::process::id(),
            version: format!("husk {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // A pod's shim serves all its containers: stay while any is left.
        if !self
            .inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return Ok(api::Empty::default());
        }
        let pods: Vec<Arc<Pod>> = self
            .inner
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in pods {
            p.teardown();
        }
        self.inner.exit.signal();
        Ok(api::Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime_options(config_path: &str) -> Any {
        let options = runtime_options::Options {
            config_path: config_path.into(),
            ..Default::default()
        };
        Any {
            type_url: runtime_options::TYPE_NAME.into(),
            value: options.write_to_bytes().unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn a_reservation_holds_its_ids_until_dropped() {
        let set = Mutex::new(HashSet::new());
        let a = Reservation::take(&set, vec!["container a".into()]).unwrap();
        let e = Reservation::take(&set, vec!["container b".into(), "container a".into()])
            .err()
            .expect("a taken id");
        assert!(e.to_string().contains("container a already exists"), "{e}");
        assert_eq!(error::code_of(&e), Code::ALREADY_EXISTS);
        // Nothing of a refused reservation is held.
        let b = Reservation::take(&set, vec!["container b".into()]).unwrap();
        drop(a);
        let a = Reservation::take(&set, vec!["container a".into()]).unwrap();
        drop((a, b));
        assert!(set.lock().unwrap().is_empty());
    }

    #[test]
    fn runtime_options_name_a_config_file() {
        let dir = std::env::temp_dir().join(format!("husk-shim-opts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "default_memory_mib = 300\n").unwrap();
        let c = runtime_config(Some(&runtime_options(good.to_str().unwrap()))).unwrap();
        assert_eq!(c.default_memory_mib, 300);
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "hypervisr = \"qemu\"\n").unwrap();
        let e = runtime_config(Some(&runtime_options(bad.to_str().unwrap()))).unwrap_err();
        assert!(format!("{e:#}").contains("hypervisr"), "{e:#}");
        assert_eq!(error::code_of(&e), Code::INVALID_ARGUMENT);
        let other = Any {
            type_url: "example.com/Other".into(),
            ..Default::default()
        };
        let e = runtime_config(Some(&other)).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
        assert_eq!(error::code_of(&e), Code::INVALID_ARGUMENT);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
