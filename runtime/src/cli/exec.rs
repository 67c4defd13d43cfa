//! `husk exec`: a new process in a running container, started by the
//! container's monitor (the one route into the guest). This command hands
//! the monitor its stdio (or, with --tty, a host pty whose master went to
//! the console socket) and exits as the process exits. With --detach it runs itself in the background and returns once
//! the process has started (--pid-file then names that background copy).

use super::console;
use super::monitor;
use super::monitor_protocol::{
    self as proto, ExecStdio, MonitorReply, MonitorRequest, ReadyMessage,
};
use super::state::{ContainerState, Status};
use anyhow::{bail, Context};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};

/// Set in a detached exec's background copy: the fd to report start on.
const READY_FD_ENV: &str = "HUSK_EXEC_READY_FD";

#[derive(clap::Args, Debug, Clone)]
pub struct ExecArgs {
    /// A JSON file with the OCI process to run.
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    #[arg(short, long)]
    pub tty: bool,
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// KEY=VALUE added to the environment (repeatable).
    #[arg(short, long)]
    pub env: Vec<String>,
    #[arg(long)]
    pub cwd: Option<String>,
    /// uid[:gid]
    #[arg(short, long)]
    pub user: Option<String>,
    #[arg(long)]
    pub no_new_privs: bool,
    pub id: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

fn process_json(args: &ExecArgs, st: &ContainerState) -> anyhow::Result<serde_json::Value> {
    if let Some(path) = &args.process {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        return serde_json::from_slice(&text)
            .with_context(|| format!("{}: malformed process JSON", path.display()));
    }
    if args.command.is_empty() {
        bail!("exec needs a command or --process");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(st.bundle.join("config.json"))?)?;
    let mut p = config["process"].clone();
    p["args"] = serde_json::json!(args.command);
    p["terminal"] = serde_json::json!(args.tty);
    if let Some(cwd) = &args.cwd {
        p["cwd"] = serde_json::json!(cwd);
    }
    if !args.env.is_empty() {
        let mut env: Vec<serde_json::Value> = p["env"].as_array().cloned().unwrap_or_default();
        env.extend(args.env.iter().map(|e| serde_json::json!(e)));
        p["env"] = serde_json::json!(env);
    }
    if let Some(user) = &args.user {
        let (uid, gid) = user.split_once(':').unwrap_or((user, "0"));
        let uid: u32 = uid
            .parse()
            .with_context(|| format!("--user {user}: not a numeric uid"))?;
        let gid: u32 = gid
            .parse()
            .with_context(|| format!("--user {user}: not a numeric gid"))?;
        p["user"] = serde_json::json!({"uid": uid, "gid": gid});
    }
    if args.no_new_privs {
        p["noNewPrivileges"] = serde_json::json!(true);
    }
    Ok(p)
}

pub fn exec(root: &Path, args: ExecArgs) -> anyhow::Result<i32> {
    let st = ContainerState::load(root, &args.id)?;
    if st.effective_status() != Status::Running {
        bail!(
            "cannot exec in a container that is {}",
            st.effective_status().as_str()
        );
    }
    let process = process_json(&args, &st)?;
    let ready = ready_pipe();
    if args.detach && ready.is_none() {
        return detach(&args);
    }
    let exec_id = match start_in_monitor(root, &args, process) {
        Ok(exec_id) => exec_id,
        Err(e) => {
            if let Some(mut ready) = ready {
                let message = super::one_line(&e);
                let _ = proto::write_message(&mut ready, &ReadyMessage::Failed { message });
            }
            return Err(e);
        }
    };
    if let Some(mut ready) = ready {
        proto::write_message(
            &mut ready,
            &ReadyMessage::Ready {
                phases: Default::default(),
            },
        )?;
    } else if let Some(pid_file) = &args.pid_file {
        super::lifecycle::write_pid_file(pid_file, std::process::id() as i32)?;
    }
    // The monitor answers once the process ended and its output is all out.
    match monitor::request(root, &args.id, &MonitorRequest::Wait { exec_id })? {
        MonitorReply::Exited { code, signal } => {
            if signal > 0 {
                super::die_by_signal(signal);
            }
            Ok(code)
        }
        other => bail!("the monitor of {} answered wait with {other:?}", args.id),
    }
}

/// The ready pipe of a detached exec's background copy, if this is one.
fn ready_pipe() -> Option<std::fs::File> {
    let fd = std::env::var(READY_FD_ENV).ok()?.parse::<i32>().ok()?;
    // SAFETY: fcntl(F_GETFD) only asks whether `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the parent passed this pipe's write end for our report; we
    // own it from here.
    Some(unsafe { std::fs::File::from_raw_fd(fd) })
}

fn fd_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Hands the process and its stdio to the container's monitor, which
/// starts it; returns its exec id.
fn start_in_monitor(
    root: &Path,
    args: &ExecArgs,
    process: serde_json::Value,
) -> anyhow::Result<String> {
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    // Held until the monitor has its own copies.
    let mut pty = None;
    let (stdio, fds): (ExecStdio, Vec<RawFd>) = if terminal {
        let socket = args
            .console_socket
            .as_ref()
            .context("a terminal process needs --console-socket")?;
        let host_pty = console::open_raw_pty()?;
        console::send_master(socket, &host_pty.master)?;
        let fds = vec![host_pty.slave.as_raw_fd(), host_pty.master.as_raw_fd()];
        pty = Some(host_pty);
        (ExecStdio::Terminal, fds)
    } else {
        let open = [fd_open(0), fd_open(1), fd_open(2)];
        let stdio = ExecStdio::Pipes {
            stdin: open[0],
            stdout: open[1],
            stderr: open[2],
        };
        let fds = (0..3).filter(|fd| open[*fd as usize]).collect();
        (stdio, fds)
    };
    let req = MonitorRequest::Exec { process, stdio };
    // The monitor's errors name the exec already ("exec in ID: ...").
    let reply = monitor::request_with_fds(root, &args.id, &req, &fds)?;
    drop(pty);
    match reply {
        MonitorReply::ExecStarted {
            exec_id, phases, ..
        } => {
            phases.log("exec");
            Ok(exec_id)
        }
        other => bail!("the monitor of {} answered exec with {other:?}", args.id),
    }
}

/// Runs this exec in a background copy of ourselves and returns once the
/// process started; the copy is what --pid-file names.
fn detach(args: &ExecArgs) -> anyhow::Result<i32> {
    let (ready_r, ready_w) = nix::unistd::pipe().context("creating a pipe")?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(READY_FD_ENV, ready_w.as_raw_fd().to_string());
    let child = cmd.spawn().context("starting the detached exec")?;
    drop(ready_w);
    match proto::read_message::<ReadyMessage>(&mut std::fs::File::from(ready_r), None) {
        Ok(ReadyMessage::Ready { .. }) => {}
        Ok(ReadyMessage::Failed { message }) => bail!("{message}"),
        Err(e) => bail!("exec in {} failed to start: {e}", args.id),
    }
    if let Some(pid_file) = &args.pid_file {
        super::lifecycle::write_pid_file(pid_file, child.id() as i32)?;
    }
    Ok(0)
}
