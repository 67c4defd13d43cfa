//! `husk exec`: a new process in a running container. This command is the
//! process's host side: it carries its stdio and exits as the process
//! exits. With --detach it runs itself in the background and returns once
//! the process has started (--pid-file then names that background copy).

use super::console;
use super::state::{ContainerState, Status};
use anyhow::{bail, Context};
use husk_protocol::agent::ExecProcessRequest;
use husk_runtime::sandbox::HostStdio;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
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
    if args.detach && std::env::var_os(READY_FD_ENV).is_none() {
        return detach(root, &args);
    }
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    let agent = super::agent_of(root, &args.id)?;
    let sandbox_uds =
        husk_runtime::sandbox::sandbox_dir(&super::state::sandbox_root(root), &args.id)
            .join("vsock.sock");
    let mut host_pty = None;
    let stdio = if terminal {
        let socket = args
            .console_socket
            .as_ref()
            .context("a terminal process needs --console-socket")?;
        let (stdio, master) = console::console_stdio(socket)?;
        host_pty = Some(master);
        stdio
    } else {
        HostStdio {
            stdin: Some(Box::new(std::io::stdin())),
            stdout: Some(Box::new(std::io::stdout())),
            stderr: Some(Box::new(std::io::stderr())),
            terminal: false,
        }
    };
    let (tokens, pumps) = husk_runtime::sandbox::connect_stdio_via(&agent, stdio)?;
    let exec_id = format!("exec-{:016x}", husk_runtime::agent::new_token());
    let req = ExecProcessRequest {
        container_id: args.id.clone(),
        exec_id: exec_id.clone(),
        process_json: serde_json::to_vec(&process)?,
        stdio: Some(tokens).into(),
        ..Default::default()
    };
    agent
        .exec_process(&req)
        .with_context(|| format!("exec in {} (through {})", args.id, sandbox_uds.display()))?;
    if let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        // SAFETY: the parent passed this pipe's write end for our report.
        let mut ready = unsafe { std::fs::File::from_raw_fd(fd) };
        let _ = writeln!(ready, "ok");
    } else if let Some(pid_file) = &args.pid_file {
        super::lifecycle::write_pid_file(pid_file, std::process::id() as i32)?;
    }
    if let Some(master) = host_pty {
        let (agent, id, eid) = (agent.clone(), args.id.clone(), exec_id.clone());
        std::thread::spawn(move || console::follow_window_size(master, agent, id, eid));
    }
    let status = agent.wait_process(&args.id, &exec_id)?;
    pumps.finish();
    let exit = husk_runtime::agent::ProcessExit::from_guest(status.exit_code, status.signal);
    if exit.signal > 0 {
        super::die_by_signal(exit.signal);
    }
    Ok(exit.code)
}

/// Runs this exec in a background copy of ourselves and returns once the
/// process started; the copy is what --pid-file names.
fn detach(root: &Path, args: &ExecArgs) -> anyhow::Result<i32> {
    let (ready_r, ready_w) = nix::unistd::pipe().context("creating a pipe")?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1)).env(
        READY_FD_ENV,
        std::os::fd::AsRawFd::as_raw_fd(&ready_w).to_string(),
    );
    let _ = root;
    let child = cmd.spawn().context("starting the detached exec")?;
    drop(ready_w);
    let mut answer = String::new();
    let _ = std::fs::File::from(ready_r).read_to_string(&mut answer);
    if answer.trim() != "ok" {
        bail!("exec in {} failed to start", args.id);
    }
    if let Some(pid_file) = &args.pid_file {
        super::lifecycle::write_pid_file(pid_file, child.id() as i32)?;
    }
    Ok(0)
}
