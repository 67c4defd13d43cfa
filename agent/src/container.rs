//! Containers in the guest: their cgroups, processes and stdio.

use crate::cgroup_devices::{self, DeviceFilter, DeviceFilterError};
use crate::init::{shared_dir_mounted, CGROUP_ROOT, SHARED_DIR};
use crate::process::{ExitInfo, Reaper};
use crate::spec::{self, LaunchPlan, SpecError, StagedDevice, StepNames};
use crate::userns::{self, UserNs, UsernsError};
use husk_protocol::agent::CreateContainerRequest;
use oci_spec::runtime::{LinuxResources, Spec};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;
use vsock::VsockStream;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("{0}")]
    Hook(#[from] crate::hooks::HookError),
    #[error("config.json: {0}")]
    Parse(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("process {exec_id:?} of container {id} does not exist")]
    NoProcess { id: String, exec_id: String },
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("container {0} is running: stop it first or remove it with force")]
    Running(String),
    #[error("container {0} was already started")]
    AlreadyStarted(String),
    #[error("the sandbox's shared directory ({SHARED_DIR}) is not mounted: no virtio-fs device")]
    NoShare,
    #[error("cgroup {path}: {reason}")]
    Cgroup { path: String, reason: String },
    #[error("starting {program:?}: {step}{reason}")]
    Spawn {
        program: String,
        step: String,
        reason: String,
    },
    #[error("{0}")]
    Stream(#[from] crate::streams::StreamError),
    #[error("{0}")]
    Userns(#[from] UsernsError),
    #[error("{0}")]
    Devices(#[from] DeviceFilterError),
    #[error("linux.devices: making {path} for the user namespace: {source}")]
    StageDevice {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The streams a process's stdio is wired to.
#[derive(Default)]
pub struct ProcessStreams {
    pub stdin: Option<VsockStream>,
    pub stdout: Option<VsockStream>,
    pub stderr: Option<VsockStream>,
}

/// A running (or exited) process of a container.
pub struct Proc {
    pub pid: i32,
    /// PID 1 of the container's new pid namespace (see `fork_ns_holder`).
    ns_holder: Mutex<Option<i32>>,
    stdin: Arc<Mutex<Option<File>>>,
    pty_master: Option<OwnedFd>,
    copiers: Mutex<Vec<JoinHandle<()>>>,
    exit: OnceLock<ExitInfo>,
}

/// A created container: its child is parked before exec (namespaces and
/// rootfs set up, createContainer hooks run) while the thread that spawned
/// it waits in `Command::spawn` for the exec. `start` sends
/// `spec::START` on `go` and joins the thread; `delete` sends anything else.
struct Parked {
    go: OwnedFd,
    spawning: JoinHandle<Result<Arc<Proc>, ContainerError>>,
}

/// Where the agent makes the linux.devices nodes of containers with a
/// user namespace (see `StagedDevice`): its own devtmpfs, where nodes open.
const DEVICE_STAGE_ROOT: &str = "/dev/.husk-devices";

/// The device filter of a container, kept for updates.
struct DeviceFilterState {
    cgroup_dir: OwnedFd,
    prog: OwnedFd,
}

pub struct Container {
    root: PathBuf,
    /// Directory of staged linux.devices nodes, removed with the container.
    device_stage: PathBuf,
    device_filter: Mutex<Option<DeviceFilterState>>,
    /// linux.seccomp, applied to exec'd processes too.
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    pub cgroup: PathBuf,
    parked: Mutex<Option<Parked>>,
    init: Mutex<Option<Arc<Proc>>>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

pub struct Containers {
    reaper: Arc<Reaper>,
    table: Mutex<HashMap<String, Arc<Container>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Creates `path` and every parent below the cgroup root, delegating all
/// controllers to each level so the leaf can use them.
fn ensure_cgroup(path: &Path) -> Result<(), ContainerError> {
    let root = Path::new(CGROUP_ROOT);
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let enable: Vec<String> = controllers
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    let rel = path
        .strip_prefix(root)
        .map_err(|_| ContainerError::Cgroup {
            path: path.display().to_string(),
            reason: "outside the cgroup root".into(),
        })?;
    let mut current = root.to_path_buf();
    for part in rel.components() {
        if current != root {
            // Best effort per controller: a parent may lack one.
            for c in &enable {
                let _ = std::fs::write(current.join("cgroup.subtree_control"), c);
            }
        }
        current.push(part);
        match std::fs::create_dir(&current) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(ContainerError::Cgroup {
                    path: current.display().to_string(),
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(())
}

fn write_cgroup(cgroup: &Path, file: &str, value: &str) -> Result<(), ContainerError> {
    std::fs::write(cgroup.join(file), value).map_err(|e| ContainerError::Cgroup {
        path: cgroup.join(file).display().to_string(),
        reason: format!("writing {value:?}: {e}"),
    })
}

/// Like `write_cgroup`, naming the spec field, and saying so when the
/// guest kernel has no such file.
fn write_cgroup_field(
    cgroup: &Path,
    file: &str,
    value: &str,
    field: &str,
) -> Result<(), ContainerError> {
    let path = cgroup.join(file);
    if !path.exists() {
        return Err(ContainerError::Cgroup {
            path: field.to_string(),
            reason: format!("the guest kernel has no {file} for this cgroup"),
        });
    }
    std::fs::write(&path, value).map_err(|e| ContainerError::Cgroup {
        path: field.to_string(),
        reason: format!("writing {value:?} to {}: {e}", path.display()),
    })
}

/// Compiles and loads the device filter and opens the cgroup it goes on.
fn load_device_filter(
    cgroup: &Path,
    rules: &[cgroup_devices::Rule],
) -> Result<DeviceFilter, ContainerError> {
    let prog = cgroup_devices::load(&cgroup_devices::compile(rules))?;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(cgroup)
        .map_err(|e| ContainerError::Cgroup {
            path: cgroup.display().to_string(),
            reason: format!("opening for the device filter: {e}"),
        })?;
    Ok(DeviceFilter::new(OwnedFd::from(dir), prog))
}

/// Makes the linux.devices nodes of a container with a user namespace in
/// the agent's /dev, with their mode and (mapped) owner, for the child to
/// bind-mount: the child cannot mknod in its user namespace.
fn stage_devices(stage: &Path, devices: &[StagedDevice]) -> Result<(), ContainerError> {
    use std::os::unix::fs::DirBuilderExt;
    if devices.is_empty() {
        return Ok(());
    }
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |source| ContainerError::StageDevice { path, source }
    };
    // Searchable: the child binds the nodes as the root of its user
    // namespace, which is not the guest's root.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(stage)
        .map_err(err(stage))?;
    for d in devices {
        nix::sys::stat::mknod(
            &d.path,
            nix::sys::stat::SFlag::from_bits_truncate(d.mode & libc::S_IFMT),
            nix::sys::stat::Mode::from_bits_truncate(d.mode & 0o7777),
            d.dev,
        )
        .map_err(|e| err(&d.path)(e.into()))?;
        // mknod applies the umask: set the mode exactly, then the owner.
        nix::sys::stat::fchmodat(
            None,
            &d.path,
            nix::sys::stat::Mode::from_bits_truncate(d.mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| err(&d.path)(e.into()))?;
        std::os::unix::fs::chown(&d.path, Some(d.uid), Some(d.gid)).map_err(err(&d.path))?;
    }
    Ok(())
}

/// Applies OCI `linux.resources` to a cgroup v2 directory.
pub fn apply_resources(cgroup: &Path, r: &LinuxResources) -> Result<(), ContainerError> {
    if let Some(mem) = r.memory() {
        if let Some(limit) = mem.limit() {
            write_cgroup(
                cgroup,
                "memory.max",
                &if limit < 0 {
                    "max".into()
                } else {
                    limit.to_string()
                },
            )?;
        }
        if let Some(res) = mem.reservation() {
            write_cgroup(
                cgroup,
                "memory.low",
                &if res < 0 {
                    "max".into()
                } else {
                    res.to_string()
                },
            )?;
        }
    }
    if let Some(mem) = r.memory() {
        // OCI swap is memory+swap; cgroup v2 wants swap alone.
        if let Some(swap) = mem.swap() {
            let value = match (swap, mem.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l > 0 => {
                    if s < l {
                        return Err(ContainerError::Cgroup {
                            path: "linux.resources.memory.swap".into(),
                            reason: format!("swap {s} below the memory limit {l}"),
                        });
                    }
                    (s - l).to_string()
                }
                (s, _) => s.to_string(),
            };
            // A guest kernel without swap has no memory.swap.max: the
            // guest has no swap at all, so any swap limit holds.
            if cgroup.join("memory.swap.max").exists() {
                write_cgroup_field(
                    cgroup,
                    "memory.swap.max",
                    &value,
                    "linux.resources.memory.swap",
                )?;
            }
        }
    }
    // linux.resources.blockIO does not apply in the guest: it has no block
    // devices (the rootfs and volumes come over virtio-fs), so weights and
    // throttles naming host major:minor numbers have nothing to act on.
    // See docs/oci-conformance.md.
    for h in r.hugepage_limits().iter().flatten() {
        let size = h.page_size();
        if size.is_empty() || size.contains('/') {
            return Err(ContainerError::Cgroup {
                path: "linux.resources.hugepageLimits".into(),
                reason: format!("invalid pageSize {size:?}"),
            });
        }
        let file = format!("hugetlb.{size}.max");
        // A page size the guest (CPU or kernel) does not have cannot be
        // allocated at all, so its limit holds.
        if cgroup.join(&file).exists() {
            write_cgroup_field(
                cgroup,
                &file,
                &h.limit().to_string(),
                "linux.resources.hugepageLimits",
            )?;
        }
    }
    if let Some(unified) = r.unified() {
        let mut keys: Vec<_> = unified.iter().collect();
        keys.sort();
        for (k, v) in keys {
            if k.is_empty() || k.contains('/') || k.starts_with('.') {
                return Err(ContainerError::Cgroup {
                    path: "linux.resources.unified".into(),
                    reason: format!("invalid key {k:?}"),
                });
            }
            write_cgroup_field(cgroup, k, v, "linux.resources.unified")?;
        }
    }
    if let Some(pids) = r.pids() {
        let limit = pids.limit();
        write_cgroup(
            cgroup,
            "pids.max",
            &if limit <= 0 {
                "max".into()
            } else {
                limit.to_string()
            },
        )?;
    }
    if let Some(cpu) = r.cpu() {
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            let period = cpu.period().unwrap_or(100_000);
            write_cgroup(cgroup, "cpu.max", &format!("{quota} {period}"))?;
        }
        if let Some(shares) = cpu.shares() {
            // The conversion runc and crun use from cgroup v1 shares.
            let weight = 1 + (shares.clamp(2, 262_144) - 2) * 9_999 / 262_142;
            write_cgroup(cgroup, "cpu.weight", &weight.to_string())?;
        }
        if let Some(cpus) = cpu.cpus() {
            write_cgroup(cgroup, "cpuset.cpus", cpus)?;
        }
        if let Some(mems) = cpu.mems() {
            write_cgroup(cgroup, "cpuset.mems", mems)?;
        }
        if let Some(idle) = cpu.idle() {
            write_cgroup(cgroup, "cpu.idle", &idle.to_string())?;
        }
        // realtimeRuntime/realtimePeriod: cgroup v2 has no per-group
        // real-time budget; ignored as runc does on v2 (the host runtime
        // mirrors them to a v1 host cgroup that has one).
    }
    Ok(())
}

fn cgroup_pids(cgroup: &Path) -> Vec<i32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn kill_cgroup(cgroup: &Path, signal: i32) {
    for pid in cgroup_pids(cgroup) {
        // SAFETY: kill(2) on a pid read from the container's cgroup.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Copies `from` into `to` until EOF or error, then lets `done` run.
fn pump(mut from: impl Read, mut to: impl Write, done: impl FnOnce()) {
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // EIO: the pty's last slave closed.
            Err(_) => break,
        }
    }
    let _ = to.flush();
    done();
}

/// Feeds a stream into the process's stdin until EOF, then closes stdin.
fn pump_stdin(mut from: VsockStream, stdin: Arc<Mutex<Option<File>>>) {
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut guard = lock(&stdin);
                let Some(pipe) = guard.as_mut() else { return };
                if pipe.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    lock(&stdin).take();
}

/// Receives the pty master a container child sent with SCM_RIGHTS.
fn receive_fd(sock: &UnixStream) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: the fd was just received and is ours alone.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    Err(std::io::Error::other("no terminal fd in the message"))
}

/// Points this thread's pid namespace for children at the container's, so
/// the next fork lands there (and is its PID 1 when the namespace is new);
/// returns this thread's own namespace to return to after the fork. Only
/// the calling thread is affected, and it creates no threads in between.
///
/// `made` is a new pid namespace the user namespace helper made (owned by
/// the container's user namespace), entered instead of unsharing one.
fn enter_pid_ns(
    ns: &spec::PidNs,
    made: Option<&std::ffi::CStr>,
) -> std::io::Result<Option<OwnedFd>> {
    use std::os::fd::AsFd;
    if matches!(ns, spec::PidNs::Inherit) {
        return Ok(None);
    }
    let own = OwnedFd::from(File::open("/proc/thread-self/ns/pid")?);
    let join = match ns {
        spec::PidNs::New => made,
        spec::PidNs::Join(path) => Some(path.as_c_str()),
        spec::PidNs::Inherit => None,
    };
    match join {
        None => {
            // SAFETY: unshare of the pid namespace for children only.
            if unsafe { libc::unshare(libc::CLONE_NEWPID) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Some(path) => {
            // SAFETY: open of a prepared CString path.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd was just opened and is owned here.
            let target = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: setns on an fd we own.
            if unsafe { libc::setns(target.as_fd().as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(Some(own))
}

/// Forks the init of a new pid namespace (the calling thread's namespace
/// for children must already be the new one): a process that only reaps
/// orphans of the namespace, as the `pause` process of a pod does. The
/// container's process is forked next, as PID 2: a direct child of the
/// agent that reaps it and reports its status, and an ordinary process for
/// signals (a namespace's PID 1 ignores every signal it has no handler for,
/// which would make `kill TERM` of a plain `sleep` a no-op). Killing the
/// holder ends everything left in the namespace.
fn fork_ns_holder() -> std::io::Result<i32> {
    // SAFETY: fork; the child makes only raw syscalls and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the forked child.
        unsafe { pidns_holder_main() }
    }
    Ok(pid)
}

/// The body of a pid namespace holder (see `fork_ns_holder`; the user
/// namespace helper forks one too).
///
/// # Safety
/// Only in a freshly forked child.
pub unsafe fn pidns_holder_main() -> ! {
    // SAFETY: raw syscalls only. No fds of the agent stay open in it
    // (streams must see EOF when their processes end).
    unsafe {
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        libc::prctl(libc::PR_SET_NAME, c"husk-pidns-init".as_ptr());
        loop {
            let mut status = 0;
            while libc::waitpid(-1, &mut status, libc::WNOHANG) > 0 {}
            let ts = libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            libc::nanosleep(&ts, std::ptr::null_mut());
        }
    }
}

fn kill_holder(p: &Proc) {
    if let Some(h) = lock(&p.ns_holder).take() {
        // SAFETY: kill(2) of the namespace holder this agent forked. It
        // only dies of this (once: the pid is taken), so it is not yet
        // reaped and its pid not reused.
        unsafe { libc::kill(h, libc::SIGKILL) };
    }
}

/// Spawns a container's process up to its park point (see `Parked`): returns
/// once the child reports it is parked, or with the error of its set-up or
/// createContainer hooks.
fn park(
    reaper: &Arc<Reaper>,
    mut plan: LaunchPlan,
    streams: ProcessStreams,
) -> Result<Parked, ContainerError> {
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ContainerError::Io(e.into()))
    };
    let (parked_r, parked_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    plan.park = Some(spec::ParkFds {
        parked_w: parked_w.as_raw_fd(),
        go_r: go_r.as_raw_fd(),
    });
    let reaper = Arc::clone(reaper);
    let spawning = std::thread::spawn(move || {
        let result = spawn(&reaper, plan, streams);
        // Our ends of the child's pipes: closing them lets the creating
        // thread see EOF when the child failed before parking.
        drop((parked_w, go_r));
        result
    });
    let mut byte = [0u8; 1];
    let parked = File::from(parked_r).read(&mut byte).unwrap_or(0) == 1;
    if parked {
        return Ok(Parked { go: go_w, spawning });
    }
    match spawning.join() {
        Ok(Err(e)) => Err(e),
        Ok(Ok(proc)) => {
            // Cannot happen (the child parks before exec); do not leave it.
            // SAFETY: kill(2) of a child this agent spawned and still tracks.
            unsafe { libc::kill(proc.pid, libc::SIGKILL) };
            Err(ContainerError::Io(std::io::Error::other(
                "the container process ran before start",
            )))
        }
        Err(_) => Err(ContainerError::Io(std::io::Error::other(
            "the thread spawning the container process panicked",
        ))),
    }
}

/// Sends `byte` to a parked child and waits for the spawn to finish: the
/// process when it was `spec::START` and it exec'd.
fn release(parked: Parked, byte: u8) -> Result<Arc<Proc>, ContainerError> {
    // A failed write (the child died) shows in the spawn's result.
    let _ = File::from(parked.go).write_all(&[byte]);
    parked.spawning.join().unwrap_or_else(|_| {
        Err(ContainerError::Io(std::io::Error::other(
            "the thread spawning the container process panicked",
        )))
    })
}

fn spawn(
    reaper: &Reaper,
    mut plan: LaunchPlan,
    streams: ProcessStreams,
) -> Result<Arc<Proc>, ContainerError> {
    let program = plan.args[0].clone();
    let new_pid_ns = matches!(plan.pid_ns, spec::PidNs::New);
    // Lives until the child has joined its namespaces (it has exec'd when
    // spawn returns), then is killed.
    let mut userns_helper = if userns::Helper::needed(&plan.user_ns, new_pid_ns) {
        Some(userns::Helper::start(&plan.user_ns, new_pid_ns)?)
    } else {
        None
    };
    let mut made_pid_ns = None;
    let mut ns_holder = None;
    if let Some(h) = &mut userns_helper {
        if matches!(plan.user_ns, UserNs::New { .. }) {
            plan.join.insert(0, (h.user_ns_path(), libc::CLONE_NEWUSER));
        }
        if let Some((holder, path)) = h.pid_ns() {
            ns_holder = Some(holder);
            made_pid_ns = Some(path);
        }
    }
    let mut cmd = Command::new(&plan.args[0]);
    cmd.args(&plan.args[1..])
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)));
    // With a terminal the child opens its pty in the container and sends
    // the master back over this pair.
    let console_pair = if plan.terminal {
        Some(UnixStream::pair()?)
    } else {
        None
    };
    if plan.terminal {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    } else {
        cmd.stdin(if streams.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(if streams.stdout.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stderr(if streams.stderr.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    }
    let (diag_r, diag_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ContainerError::Io(e.into()))?;
    let diag_fd = diag_w.as_raw_fd();
    let console_fd = console_pair
        .as_ref()
        .map_or(-1, |(_, child)| child.as_raw_fd());
    let plan = Arc::new(plan);
    let child_plan = Arc::clone(&plan);
    let names = StepNames::new();
    // SAFETY: apply_in_child only makes async-signal-safe syscalls on data
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || spec::apply_in_child(&child_plan, &names, diag_fd, console_fd));
    }
    let spawned = {
        let _guard = reaper.spawn_guard();
        let restore = match enter_pid_ns(&plan.pid_ns, made_pid_ns.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                if let Some(h) = ns_holder {
                    userns::kill_holder(h);
                }
                return Err(ContainerError::Spawn {
                    program: program.clone(),
                    step: "entering the pid namespace (linux.namespaces): ".into(),
                    reason: e.to_string(),
                });
            }
        };
        let spawned = if new_pid_ns && ns_holder.is_none() {
            match fork_ns_holder() {
                Ok(pid) => {
                    ns_holder = Some(pid);
                    cmd.spawn()
                }
                Err(e) => Err(e),
            }
        } else {
            cmd.spawn()
        };
        if let Some(own) = restore {
            // SAFETY: setns back to this thread's own pid namespace.
            if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
                eprintln!(
                    "husk-agent: restoring the pid namespace for children: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        if let Ok(child) = &spawned {
            reaper.track(child.id() as i32);
        }
        spawned
    };
    drop(diag_w);
    drop(userns_helper);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            if let Some(h) = ns_holder {
                // SAFETY: kill(2) of the holder forked above.
                unsafe { libc::kill(h, libc::SIGKILL) };
            }
            let mut step = String::new();
            let _ = File::from(diag_r).read_to_string(&mut step);
            if !step.is_empty() {
                step.push_str(": ");
            }
            let reason = if e.kind() == std::io::ErrorKind::NotFound {
                "executable file not found in $PATH".to_string()
            } else if e.raw_os_error() == Some(libc::ECANCELED) {
                // Only a failed in-guest hook cancels; `step` says which.
                "the container process was not started".to_string()
            } else {
                e.to_string()
            };
            return Err(ContainerError::Spawn {
                program,
                step,
                reason,
            });
        }
    };
    let pid = child.id() as i32;
    let pty_master = match console_pair {
        Some((agent_end, child_end)) => {
            drop(child_end);
            Some(receive_fd(&agent_end).map_err(|e| ContainerError::Spawn {
                program: program.clone(),
                step: "receiving the terminal from the container: ".into(),
                reason: e.to_string(),
            })?)
        }
        None => None,
    };
    let mut copiers = Vec::new();
    let stdin_pipe: Arc<Mutex<Option<File>>> = Arc::new(Mutex::new(None));
    if let Some(master) = &pty_master {
        if let Some(input) = streams.stdin {
            let master_in = File::from(master.try_clone()?);
            *lock(&stdin_pipe) = Some(master_in);
            let pipe = Arc::clone(&stdin_pipe);
            std::thread::spawn(move || pump_stdin(input, pipe));
        }
        if let Some(output) = streams.stdout {
            let master_out = File::from(master.try_clone()?);
            copiers.push(std::thread::spawn(move || {
                let out = output.try_clone();
                pump(master_out, output, move || {
                    if let Ok(o) = out {
                        let _ = o.shutdown(Shutdown::Write);
                    }
                })
            }));
        }
    } else {
        if let (Some(input), Some(pipe)) = (streams.stdin, child.stdin.take()) {
            // SAFETY: taking ownership of the pipe's fd from ChildStdin.
            let file = unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(pipe)) };
            *lock(&stdin_pipe) = Some(file);
            let pipe = Arc::clone(&stdin_pipe);
            std::thread::spawn(move || pump_stdin(input, pipe));
        }
        if let (Some(output), Some(pipe)) = (streams.stdout, child.stdout.take()) {
            copiers.push(std::thread::spawn(move || {
                let out = output.try_clone();
                pump(pipe, output, move || {
                    if let Ok(o) = out {
                        let _ = o.shutdown(Shutdown::Write);
                    }
                })
            }));
        }
        if let (Some(output), Some(pipe)) = (streams.stderr, child.stderr.take()) {
            copiers.push(std::thread::spawn(move || {
                let out = output.try_clone();
                pump(pipe, output, move || {
                    if let Ok(o) = out {
                        let _ = o.shutdown(Shutdown::Write);
                    }
                })
            }));
        }
    }
    Ok(Arc::new(Proc {
        pid,
        ns_holder: Mutex::new(ns_holder),
        stdin: stdin_pipe,
        pty_master,
        copiers: Mutex::new(copiers),
        exit: OnceLock::new(),
    }))
}

impl Containers {
    pub fn new(reaper: Arc<Reaper>) -> Self {
        Containers {
            reaper,
            table: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.table)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Proc>, ContainerError> {
        let c = self.get(id)?;
        let p = if exec_id.is_empty() {
            lock(&c.init).clone()
        } else {
            lock(&c.execs).get(exec_id).cloned()
        };
        p.ok_or_else(|| ContainerError::NoProcess {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
        })
    }

    pub fn create(
        &self,
        req: &CreateContainerRequest,
        streams: ProcessStreams,
    ) -> Result<(), ContainerError> {
        let CreateContainerRequest {
            container_id: id,
            oci_spec_json: spec_json,
            rootfs,
            shared_mounts,
            no_pivot,
            bundle,
            ..
        } = req;
        let (id, no_pivot) = (id.as_str(), *no_pivot);
        if lock(&self.table).contains_key(id) {
            return Err(ContainerError::Exists(id.to_string()));
        }
        let spec: Spec =
            serde_json::from_slice(spec_json).map_err(|e| ContainerError::Parse(e.to_string()))?;
        if !shared_dir_mounted() {
            return Err(ContainerError::NoShare);
        }
        let root = spec::join_inside(Path::new(SHARED_DIR), Path::new(rootfs));
        let cgroup = match spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) {
            Some(p) => spec::join_inside(
                Path::new(CGROUP_ROOT),
                &PathBuf::from(p.display().to_string().replace(':', "/")),
            ),
            None => Path::new(CGROUP_ROOT).join("husk").join(id),
        };
        static STAGE_SEQ: AtomicU64 = AtomicU64::new(0);
        let device_stage = Path::new(DEVICE_STAGE_ROOT)
            .join(STAGE_SEQ.fetch_add(1, Ordering::Relaxed).to_string());
        let mut plan = spec::plan_container(
            &spec,
            &root,
            shared_mounts,
            &cgroup.join("cgroup.procs"),
            no_pivot,
            &device_stage,
        )?;
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        // Checked before anything exists, like the rest of the spec.
        let device_rules = cgroup_devices::rules_from_spec(
            resources.as_ref().and_then(|r| r.devices().as_deref()),
        )?;
        plan.hooks = crate::hooks::plan(&spec, id, bundle)?;
        ensure_cgroup(&cgroup)?;
        let undo = |e: ContainerError| {
            let _ = std::fs::remove_dir_all(&device_stage);
            let _ = std::fs::remove_dir(&cgroup);
            e
        };
        if let Some(r) = &resources {
            apply_resources(&cgroup, r).map_err(undo)?;
        }
        let filter = load_device_filter(&cgroup, &device_rules).map_err(undo)?;
        let kept = DeviceFilterState {
            cgroup_dir: filter
                .cgroup_dir()
                .try_clone()
                .map_err(|e| undo(e.into()))?,
            prog: filter.prog().try_clone().map_err(|e| undo(e.into()))?,
        };
        plan.device_filter = Some(filter);
        if let Some(rootfs) = &plan.rootfs {
            stage_devices(&device_stage, &rootfs.staged_devices).map_err(undo)?;
        }
        let container = Arc::new(Container {
            root,
            device_stage: device_stage.clone(),
            device_filter: Mutex::new(Some(kept)),
            seccomp: spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
            cgroup: cgroup.clone(),
            parked: Mutex::new(None),
            init: Mutex::new(None),
            execs: Mutex::new(HashMap::new()),
        });
        {
            let mut table = lock(&self.table);
            if table.contains_key(id) {
                return Err(undo(ContainerError::Exists(id.to_string())));
            }
            table.insert(id.to_string(), Arc::clone(&container));
        }
        match park(&self.reaper, plan, streams) {
            Ok(parked) => {
                *lock(&container.parked) = Some(parked);
                Ok(())
            }
            Err(e) => {
                lock(&self.table).remove(id);
                Err(undo(e))
            }
        }
    }

    pub fn start(&self, id: &str) -> Result<u32, ContainerError> {
        let c = self.get(id)?;
        let parked = lock(&c.parked)
            .take()
            .ok_or_else(|| ContainerError::AlreadyStarted(id.to_string()))?;
        let proc = release(parked, spec::START)?;
        let pid = proc.pid;
        *lock(&c.init) = Some(proc);
        Ok(pid as u32)
    }

    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        streams: ProcessStreams,
    ) -> Result<u32, ContainerError> {
        let c = self.get(id)?;
        let init = lock(&c.init)
            .clone()
            .ok_or_else(|| ContainerError::NotRunning(id.to_string()))?;
        if self.reaper.try_wait(init.pid).is_some() {
            return Err(ContainerError::NotRunning(id.to_string()));
        }
        if lock(&c.execs).contains_key(exec_id) {
            return Err(ContainerError::Exists(format!("{id}/{exec_id}")));
        }
        let process: oci_spec::runtime::Process = serde_json::from_slice(process_json)
            .map_err(|e| ContainerError::Parse(format!("process: {e}")))?;
        let seccomp = match &c.seccomp {
            Some(s) => Some(crate::seccomp::compile(s)?),
            None => None,
        };
        let plan = spec::plan_exec(
            &process,
            init.pid,
            &c.root,
            &c.cgroup.join("cgroup.procs"),
            seccomp,
        )?;
        let proc = spawn(&self.reaper, plan, streams)?;
        let pid = proc.pid;
        lock(&c.execs).insert(exec_id.to_string(), proc);
        Ok(pid as u32)
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> Result<(ExitInfo, bool), ContainerError> {
        let c = self.get(id)?;
        let p = self.process(id, exec_id)?;
        let info = *p.exit.get_or_init(|| {
            let info = self.reaper.wait(p.pid);
            if exec_id.is_empty() {
                // The init's end ends the container, as a pid namespace would.
                kill_cgroup(&c.cgroup, libc::SIGKILL);
                kill_holder(&p);
            }
            info
        });
        let copiers: Vec<_> = std::mem::take(&mut *lock(&p.copiers));
        for h in copiers {
            let _ = h.join();
        }
        let oom = info.signal == libc::SIGKILL as u32 && oom_kills(&c.cgroup) > 0;
        Ok((info, oom))
    }

    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        if all {
            kill_cgroup(&c.cgroup, signal);
            return Ok(());
        }
        let p = self
            .process(id, exec_id)
            .map_err(|_| ContainerError::NotRunning(id.to_string()))?;
        if self.reaper.try_wait(p.pid).is_some() {
            return Err(ContainerError::NotRunning(id.to_string()));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid),
            nix::sys::signal::Signal::try_from(signal).map_err(|e| ContainerError::Io(e.into()))?,
        )
        .map_err(|e| ContainerError::Io(e.into()))
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let p = self.process(id, exec_id)?;
        lock(&p.stdin).take();
        Ok(())
    }

    pub fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<(), ContainerError> {
        let p = self.process(id, exec_id)?;
        if let Some(master) = &p.pty_master {
            let ws = libc::winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ on our pty master with a valid winsize.
            if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        Ok(())
    }

    pub fn freeze(&self, id: &str, frozen: bool) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        write_cgroup(&c.cgroup, "cgroup.freeze", if frozen { "1" } else { "0" })
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let r: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| ContainerError::Parse(format!("linux.resources: {e}")))?;
        if let Some(devices) = r.devices() {
            self.update_devices(&c, devices)?;
        }
        apply_resources(&c.cgroup, &r)
    }

    /// New device rules: a running container's filter is swapped in one
    /// step (BPF_F_REPLACE); before start the pending one is.
    fn update_devices(
        &self,
        c: &Container,
        devices: &[oci_spec::runtime::LinuxDeviceCgroup],
    ) -> Result<(), ContainerError> {
        let rules = cgroup_devices::rules_from_spec(Some(devices))?;
        let mut state = lock(&c.device_filter);
        let Some(current) = state.as_mut() else {
            return Ok(());
        };
        let new = cgroup_devices::load(&cgroup_devices::compile(&rules))?;
        if lock(&c.parked).is_some() {
            // The parked child attaches the filter it was created with just
            // before exec; there is no attached program to replace yet.
            return Err(ContainerError::Io(std::io::Error::other(
                "linux.resources.devices of a created container can be updated once it has started",
            )));
        }
        cgroup_devices::replace(
            &current.cgroup_dir,
            &current.prog,
            &new,
            &c.cgroup.display().to_string(),
        )?;
        current.prog = new;
        Ok(())
    }

    pub fn cgroup(&self, id: &str) -> Result<PathBuf, ContainerError> {
        Ok(self.get(id)?.cgroup.clone())
    }

    pub fn processes(&self, id: &str) -> Result<Vec<(u32, String)>, ContainerError> {
        let c = self.get(id)?;
        Ok(cgroup_pids(&c.cgroup)
            .into_iter()
            .map(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                (pid as u32, comm.trim().to_string())
            })
            .collect())
    }

    pub fn remove(&self, id: &str, force: bool) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        // A created container's parked child ends without exec.
        if let Some(parked) = lock(&c.parked).take() {
            let _ = release(parked, b'x');
        }
        let init = lock(&c.init).clone();
        if let Some(init) = &init {
            if self.reaper.try_wait(init.pid).is_none() {
                if !force {
                    return Err(ContainerError::Running(id.to_string()));
                }
                let _ = std::fs::write(c.cgroup.join("cgroup.freeze"), "0");
                kill_cgroup(&c.cgroup, libc::SIGKILL);
                self.reaper.wait(init.pid);
            }
        }
        kill_cgroup(&c.cgroup, libc::SIGKILL);
        // The cgroup empties once the killed processes are reaped.
        for _ in 0..100 {
            match std::fs::remove_dir(&c.cgroup) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        if let Some(init) = init {
            kill_holder(&init);
            self.reaper.forget(init.pid);
        }
        for p in lock(&c.execs).values() {
            self.reaper.forget(p.pid);
        }
        let _ = std::fs::remove_dir_all(&c.device_stage);
        lock(&self.table).remove(id);
        Ok(())
    }
}

fn oom_kills(cgroup: &Path) -> u64 {
    std::fs::read_to_string(cgroup.join("memory.events"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
