//! The launcher: one explicit fork of a container's process from a
//! [`Launch`], the pid namespace and user namespace helper around it, the
//! park between `create` and `start` (a pipe the child blocks on, as runc's
//! exec fifo and youki's process channel), and the process's stdio once it
//! runs. No lock is held while a child sets up, parks or execs: only the
//! fork itself and the registration of its pid are under the reaper's
//! spawn guard.

use super::stdio::{pump, pump_stdin, receive_fd, ProcessStreams};
use super::{lock, ContainerError};
use crate::child::{self, ChildFds, Launch, ParkFds, StepNames};
use crate::pidns;
use crate::process::{ExitInfo, Reaper};
use crate::userns;
use husk_agent::plan::userns::UserNs;
use husk_agent::plan::PidNs;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

/// A running (or exited) process of a container.
pub struct Proc {
    pub pid: i32,
    /// PID 1 of the container's new pid namespace (see `pidns::fork_holder`).
    ns_holder: Mutex<Option<i32>>,
    pub(super) stdin: Arc<Mutex<Option<File>>>,
    pub(super) pty_master: Option<OwnedFd>,
    pub(super) copiers: Mutex<Vec<JoinHandle<()>>>,
    pub(super) exit: OnceLock<ExitInfo>,
}

/// A created container: its child is parked before exec (namespaces and
/// rootfs set up, createContainer hooks run), blocked reading `go`; the
/// agent holds no lock and no thread waits on it. `start` sends
/// `child::START` on `go` and waits for the exec; `delete` sends anything
/// else.
pub(super) struct Parked {
    go: OwnedFd,
    forked: Forked,
    /// The agent's clock just before the fork, and the child's stamps.
    forked_at: u64,
    stamps: child::ChildStamps,
}

/// A forked child on its way to exec: what the agent keeps of it until it
/// knows whether the exec happened.
pub(super) struct Forked {
    pid: i32,
    program: String,
    /// Takes the child's errno if a step or the exec fails; EOF once it
    /// has exec'd (close-on-exec).
    errno: OwnedFd,
    /// Takes the description of the step that failed.
    diag: OwnedFd,
    /// The agent's end of the terminal socket.
    console: Option<UnixStream>,
    ns_holder: Option<i32>,
    /// Lives until the child has joined its namespaces.
    userns_helper: Option<userns::Helper>,
    /// The agent's ends of the stdio pipes: stdin's write end, stdout's and
    /// stderr's read ends.
    pipes: [Option<OwnedFd>; 3],
    streams: ProcessStreams,
}

/// Kills the process's pid namespace holder, once.
pub(super) fn kill_holder(p: &Proc) {
    if let Some(h) = lock(&p.ns_holder).take() {
        // SAFETY: kill(2) of the namespace holder this agent forked. It
        // only dies of this (once: the pid is taken), so it is not yet
        // reaped and its pid not reused.
        unsafe { libc::kill(h, libc::SIGKILL) };
    }
}

/// Forks a container's process up to its park point (see `Parked`):
/// returns once the child reports it is parked, or with the error of its
/// set-up or createContainer hooks.
pub(super) fn park(
    reaper: &Arc<Reaper>,
    launch: Launch,
    streams: ProcessStreams,
) -> Result<Parked, ContainerError> {
    let forked_at = child::now_ns();
    let (forked, park) = fork_child(reaper, launch, streams, true)?;
    let Some(ParkEnds { parked, go }) = park else {
        // Cannot happen (asked for above); do not leave the child.
        // SAFETY: kill(2) of a child this agent forked and still tracks.
        unsafe { libc::kill(forked.pid, libc::SIGKILL) };
        reaper.forget(forked.pid);
        return Err(ContainerError::Io(std::io::Error::other(
            "the container process was forked without its start pipe",
        )));
    };
    let mut message = [0u8; child::PARKED_MESSAGE_LEN];
    // EOF (short): the child ended, or exec'd, without parking.
    if read_retrying(&parked, &mut message) == message.len() {
        let mut stamps: child::ChildStamps = [0; child::CHILD_STEPS];
        for (stamp, chunk) in stamps.iter_mut().zip(message[1..].chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *stamp = u64::from_ne_bytes(b);
        }
        return Ok(Parked {
            go,
            forked,
            forked_at,
            stamps,
        });
    }
    drop(go);
    let pid = forked.pid;
    match forked.finish(reaper) {
        Err(e) => Err(e),
        Ok(_) => {
            // Cannot happen (the child parks before exec); do not leave it.
            if reaper.try_wait(pid).is_none() {
                // SAFETY: kill(2) of a child this agent forked and tracks,
                // not reaped yet: its pid is its own.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            reaper.forget(pid);
            Err(ContainerError::Io(std::io::Error::other(
                "the container process ran before start",
            )))
        }
    }
}

/// Sends `byte` to a parked child and waits for it to exec (when it was
/// `child::START`) or end.
pub(super) fn release(
    reaper: &Reaper,
    parked: Parked,
    byte: u8,
) -> Result<Arc<Proc>, ContainerError> {
    // A failed write (the child died) shows in the result of `finish`.
    let _ = File::from(parked.go).write_all(&[byte]);
    parked.forked.finish(reaper)
}

/// Forks and execs the launch's process (an exec'd one: no park).
pub(super) fn spawn(
    reaper: &Reaper,
    launch: Launch,
    streams: ProcessStreams,
) -> Result<Arc<Proc>, ContainerError> {
    let (forked, _) = fork_child(reaper, launch, streams, false)?;
    forked.finish(reaper)
}

/// read(2) of up to `buf.len()` bytes, retried on EINTR; 0 on EOF or error.
fn read_retrying(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut file = match fd.try_clone() {
        Ok(f) => File::from(f),
        Err(_) => return 0,
    };
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    got
}

/// An fd the child gets, moved above 2 (see `child::ChildFds`).
fn above_stdio(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC of an fd we own; the result is a new fd.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by fcntl and is owned here only.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// A close-on-exec pipe, both ends above 2: (read, write).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((above_stdio(r)?, above_stdio(w)?))
}

/// What a stdio pipe holds: 1 MiB (the kernel's default pipe-max-size)
/// instead of 64 KiB, so a writer of big blocks wakes its copier once per
/// MiB rather than sixteen times.
const PIPE_CAPACITY: i32 = super::stdio::COPY_CHUNK as i32;

/// A stdio pipe, enlarged where the kernel allows (a smaller pipe only
/// costs speed).
fn stdio_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe()?;
    let _ = nix::fcntl::fcntl(
        r.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_CAPACITY),
    );
    Ok((r, w))
}

/// /dev/null for a stdio fd the process gets no stream for.
fn dev_null() -> std::io::Result<OwnedFd> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    above_stdio(OwnedFd::from(null))
}

/// The agent's ends of a parking child's pipes.
struct ParkEnds {
    /// The child writes one byte here once parked.
    parked: OwnedFd,
    /// `start` (or `delete`) writes its byte here.
    go: OwnedFd,
}

/// The fds of one fork: the child's ends (closed in the agent right after
/// the fork) and the agent's.
struct ForkFds {
    child_stdio: [OwnedFd; 3],
    pipes: [Option<OwnedFd>; 3],
    diag: (OwnedFd, OwnedFd),
    errno: (OwnedFd, OwnedFd),
    console: Option<(UnixStream, UnixStream)>,
    /// (parked read end, parked write end, go read end, go write end).
    park: Option<(OwnedFd, OwnedFd, OwnedFd, OwnedFd)>,
}

impl ForkFds {
    fn new(terminal: bool, streams: &ProcessStreams, park: bool) -> std::io::Result<Self> {
        let wanted = [
            !terminal && streams.stdin.is_some(),
            !terminal && streams.stdout.is_some(),
            !terminal && streams.stderr.is_some(),
        ];
        let mut child_stdio = Vec::with_capacity(3);
        let mut pipes = [None, None, None];
        for (i, want) in wanted.into_iter().enumerate() {
            if !want {
                child_stdio.push(dev_null()?);
                continue;
            }
            let (r, w) = stdio_pipe()?;
            // stdin: the child reads; stdout, stderr: the child writes.
            let (child_end, agent_end) = if i == 0 { (r, w) } else { (w, r) };
            child_stdio.push(child_end);
            pipes[i] = Some(agent_end);
        }
        let child_stdio: [OwnedFd; 3] = child_stdio
            .try_into()
            .map_err(|_| std::io::Error::other("three stdio fds"))?;
        let console = if terminal {
            let (agent_end, child_end) = UnixStream::pair()?;
            let child_end = UnixStream::from(above_stdio(OwnedFd::from(child_end))?);
            Some((agent_end, child_end))
        } else {
            None
        };
        let park = if park {
            let (parked_r, parked_w) = pipe()?;
            let (go_r, go_w) = pipe()?;
            Some((parked_r, parked_w, go_r, go_w))
        } else {
            None
        };
        Ok(ForkFds {
            child_stdio,
            pipes,
            diag: pipe()?,
            errno: pipe()?,
            console,
            park,
        })
    }
}

/// Forks the launch's child (which parks before exec when `park`, and
/// execs otherwise); returns at once, with the parked and go pipes' agent
/// ends when parking.
///
/// Only the fork and the registration of the child's pid with the reaper
/// happen under the reaper's spawn guard (so the child cannot be reaped
/// before it is tracked), together with making the fds the child gets (so
/// no other concurrently forked child, which may park for long, holds a
/// copy of them and keeps their EOF from the agent). Waiting for the
/// child, to park or to exec, happens with no lock held.
fn fork_child(
    reaper: &Reaper,
    mut launch: Launch,
    streams: ProcessStreams,
    park: bool,
) -> Result<(Forked, Option<ParkEnds>), ContainerError> {
    let plan = &mut launch.plan;
    let program = plan.args.first().cloned().unwrap_or_default();
    let spawn_err = |step: &str, reason: String| ContainerError::Spawn {
        program: program.clone(),
        step: step.to_string(),
        reason,
    };
    let exec = child::ExecArgs::new(&plan.args, &plan.env).map_err(|e| spawn_err("", e))?;
    let new_pid_ns = matches!(plan.pid_ns, PidNs::New);
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
    let names = StepNames::new();
    let kill_made_holder = |holder: Option<i32>| {
        if let Some(h) = holder {
            pidns::kill_holder(h);
        }
    };
    let guard = reaper.spawn_guard();
    let fds = match ForkFds::new(launch.plan.terminal, &streams, park) {
        Ok(fds) => fds,
        Err(e) => {
            drop(guard);
            kill_made_holder(ns_holder);
            return Err(spawn_err("setting up stdio: ", e.to_string()));
        }
    };
    launch.park = fds.park.as_ref().map(|(_, parked_w, go_r, _)| ParkFds {
        parked_w: parked_w.as_raw_fd(),
        go_r: go_r.as_raw_fd(),
    });
    let child_fds = ChildFds {
        stdio: [
            fds.child_stdio[0].as_raw_fd(),
            fds.child_stdio[1].as_raw_fd(),
            fds.child_stdio[2].as_raw_fd(),
        ],
        diag: fds.diag.1.as_raw_fd(),
        errno: fds.errno.1.as_raw_fd(),
        console: fds.console.as_ref().map_or(-1, |(_, c)| c.as_raw_fd()),
    };
    let restore = match pidns::enter(&launch.plan.pid_ns, made_pid_ns.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            drop(guard);
            kill_made_holder(ns_holder);
            return Err(spawn_err(
                "entering the pid namespace (linux.namespaces): ",
                e.to_string(),
            ));
        }
    };
    let mut forked = Ok(0);
    if new_pid_ns && ns_holder.is_none() {
        match pidns::fork_holder() {
            Ok(pid) => ns_holder = Some(pid),
            Err(e) => forked = Err(e),
        }
    }
    if forked.is_ok() {
        // SAFETY: fork(2). The child runs only `child::run`: raw syscalls
        // on data prepared above, then exec or _exit; it never returns.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the freshly forked child.
            unsafe { child::run(&launch, &names, &child_fds, &exec) }
        }
        forked = if pid < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            reaper.track(pid);
            Ok(pid)
        };
    }
    if let Some(own) = restore {
        // SAFETY: setns back to this thread's own pid namespace.
        if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
            eprintln!(
                "husk-agent: restoring the pid namespace for children: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    // The child's ends: closed in the agent now, so the agent sees EOF
    // when the child ends or execs.
    let ForkFds {
        child_stdio,
        pipes,
        diag: (diag_r, diag_w),
        errno: (errno_r, errno_w),
        console,
        park,
    } = fds;
    let console = console.map(|(agent_end, _child_end)| agent_end);
    let park = park.map(|(parked, _parked_w, _go_r, go)| ParkEnds { parked, go });
    drop((child_stdio, diag_w, errno_w));
    drop(guard);
    // The child has its own copy of the launch (device filter fds
    // included).
    drop(launch);
    let pid = match forked {
        Ok(pid) => pid,
        Err(e) => {
            kill_made_holder(ns_holder);
            return Err(spawn_err("", e.to_string()));
        }
    };
    Ok((
        Forked {
            pid,
            program,
            errno: errno_r,
            diag: diag_r,
            console,
            ns_holder,
            userns_helper,
            pipes,
            streams,
        },
        park,
    ))
}

impl Parked {
    /// The child's steps from the fork to parking, in ns.
    pub(super) fn steps(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        let starts = std::iter::once(self.forked_at).chain(self.stamps);
        child::CHILD_STEP_NAMES
            .into_iter()
            .zip(starts.zip(self.stamps))
            .map(|(name, (from, to))| (name, to.saturating_sub(from)))
    }

    /// The parked child's pid: it has made (or joined) its namespaces.
    pub(super) fn pid(&self) -> i32 {
        self.forked.pid
    }
}

impl Forked {
    /// Waits, with no lock held, until the child has exec'd (its errno
    /// pipe closes empty) or failed, then wires its stdio.
    fn finish(self, reaper: &Reaper) -> Result<Arc<Proc>, ContainerError> {
        let Forked {
            pid,
            program,
            errno,
            diag,
            console,
            ns_holder,
            userns_helper,
            pipes,
            streams,
        } = self;
        let mut errno_bytes = [0u8; 4];
        let got = read_retrying(&errno, &mut errno_bytes);
        // It has joined its namespaces (or ended).
        drop(userns_helper);
        if got != 0 {
            // Its exit status is not needed: it _exits, and is reaped.
            reaper.forget(pid);
            if let Some(h) = ns_holder {
                pidns::kill_holder(h);
            }
            let code = if got == errno_bytes.len() {
                i32::from_ne_bytes(errno_bytes)
            } else {
                libc::EIO
            };
            let mut step = String::new();
            let _ = File::from(diag).read_to_string(&mut step);
            let reason = if code == libc::ENOENT && step.is_empty() {
                "executable file not found in $PATH".to_string()
            } else if code == libc::ECANCELED {
                // Only a failed in-guest hook or a delete cancels; `step`
                // says which.
                "the container process was not started".to_string()
            } else {
                std::io::Error::from_raw_os_error(code).to_string()
            };
            if !step.is_empty() {
                step.push_str(": ");
            }
            return Err(ContainerError::Spawn {
                program,
                step,
                reason,
            });
        }
        let pty_master = match console {
            Some(agent_end) => Some(receive_fd(&agent_end).map_err(|e| ContainerError::Spawn {
                program: program.clone(),
                step: "receiving the terminal from the container: ".into(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        let [stdin_pipe_fd, stdout_pipe, stderr_pipe] = pipes;
        let mut copiers = Vec::new();
        let stdin_pipe: Arc<Mutex<Option<File>>> = Arc::new(Mutex::new(None));
        let copy_out = |from: File, output: vsock::VsockStream| {
            std::thread::spawn(move || {
                let out = output.try_clone();
                let done = move || {
                    if let Ok(o) = out {
                        let _ = o.shutdown(Shutdown::Write);
                    }
                };
                pump(from, output, done)
            })
        };
        if let Some(master) = &pty_master {
            if let Some(input) = streams.stdin {
                *lock(&stdin_pipe) = Some(File::from(master.try_clone()?));
                let pipe = Arc::clone(&stdin_pipe);
                std::thread::spawn(move || pump_stdin(input, pipe));
            }
            if let Some(output) = streams.stdout {
                copiers.push(copy_out(File::from(master.try_clone()?), output));
            }
        } else {
            if let (Some(input), Some(pipe)) = (streams.stdin, stdin_pipe_fd) {
                *lock(&stdin_pipe) = Some(File::from(pipe));
                let pipe = Arc::clone(&stdin_pipe);
                std::thread::spawn(move || pump_stdin(input, pipe));
            }
            if let (Some(output), Some(pipe)) = (streams.stdout, stdout_pipe) {
                copiers.push(copy_out(File::from(pipe), output));
            }
            if let (Some(output), Some(pipe)) = (streams.stderr, stderr_pipe) {
                copiers.push(copy_out(File::from(pipe), output));
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
}
