//! The launcher: one fork of a container's process from a [`Launch`], the
//! pid namespace and user namespace helper around it, the park between
//! `create` and `start`, and the process's stdio once it runs.

use super::stdio::{pump, pump_stdin, receive_fd, ProcessStreams};
use super::{lock, ContainerError};
use crate::child::{self, Launch, ParkFds, StepNames};
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
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
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
/// rootfs set up, createContainer hooks run) while the thread that spawned
/// it waits in `Command::spawn` for the exec. `start` sends
/// `child::START` on `go` and joins the thread; `delete` sends anything else.
pub(super) struct Parked {
    go: OwnedFd,
    spawning: JoinHandle<Result<Arc<Proc>, ContainerError>>,
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

/// Spawns a container's process up to its park point (see `Parked`): returns
/// once the child reports it is parked, or with the error of its set-up or
/// createContainer hooks.
pub(super) fn park(
    reaper: &Arc<Reaper>,
    mut launch: Launch,
    streams: ProcessStreams,
) -> Result<Parked, ContainerError> {
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ContainerError::Io(e.into()))
    };
    let (parked_r, parked_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    launch.park = Some(ParkFds {
        parked_w: parked_w.as_raw_fd(),
        go_r: go_r.as_raw_fd(),
    });
    let reaper = Arc::clone(reaper);
    let spawning = std::thread::spawn(move || {
        let result = spawn(&reaper, launch, streams);
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
/// process when it was `child::START` and it exec'd.
pub(super) fn release(parked: Parked, byte: u8) -> Result<Arc<Proc>, ContainerError> {
    // A failed write (the child died) shows in the spawn's result.
    let _ = File::from(parked.go).write_all(&[byte]);
    parked.spawning.join().unwrap_or_else(|_| {
        Err(ContainerError::Io(std::io::Error::other(
            "the thread spawning the container process panicked",
        )))
    })
}

/// Forks and execs the launch's process; a container's parks on the way
/// (see `park`).
pub(super) fn spawn(
    reaper: &Reaper,
    mut launch: Launch,
    streams: ProcessStreams,
) -> Result<Arc<Proc>, ContainerError> {
    let plan = &mut launch.plan;
    let program = plan.args[0].clone();
    let new_pid_ns = matches!(plan.pid_ns, PidNs::New);
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
    let launch = Arc::new(launch);
    let child_launch = Arc::clone(&launch);
    let plan = &launch.plan;
    let names = StepNames::new();
    // SAFETY: apply_in_child only makes async-signal-safe syscalls on data
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || child::apply_in_child(&child_launch, &names, diag_fd, console_fd));
    }
    let spawned = {
        let _guard = reaper.spawn_guard();
        let restore = match pidns::enter(&plan.pid_ns, made_pid_ns.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                if let Some(h) = ns_holder {
                    pidns::kill_holder(h);
                }
                return Err(ContainerError::Spawn {
                    program: program.clone(),
                    step: "entering the pid namespace (linux.namespaces): ".into(),
                    reason: e.to_string(),
                });
            }
        };
        let spawned = if new_pid_ns && ns_holder.is_none() {
            match pidns::fork_holder() {
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
