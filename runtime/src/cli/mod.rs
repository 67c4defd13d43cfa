//! Command-line front end over the sandbox library: the runc command set.

mod check;
mod console;
mod exec;
mod hooks;
mod info;
mod lifecycle;
pub mod log;
mod monitor;
mod monitor_protocol;
mod pool;
mod shadow;
mod signals;
mod state;

use anyhow::bail;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "husk",
    version,
    about = "OCI runtime running each container in its own microVM"
)]
pub struct Cli {
    /// State directory.
    #[arg(long, global = true, default_value = "/run/husk")]
    pub root: PathBuf,
    /// Log file (default: stderr).
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text")]
    pub log_format: String,
    /// Verbose logging.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Use systemd to manage cgroups (not supported).
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Rootless mode (not supported: husk needs root for KVM and mounts).
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "true")]
    pub rootless: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check the prerequisites, boot a probe microVM and report timings.
    Check(check::CheckArgs),
    /// Create a container: boot its microVM and prepare its process.
    Create(lifecycle::CreateArgs),
    /// Start the process of a created container.
    Start { id: String },
    /// Create and start a container, and wait for it unless --detach.
    Run(lifecycle::RunArgs),
    /// Print a container's state as JSON.
    State { id: String },
    /// Send a signal to a container's process (or all of them with --all).
    Kill {
        #[arg(short, long)]
        all: bool,
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a container and its microVM.
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Run a new process in a running container.
    Exec(exec::ExecArgs),
    /// List a container's processes (guest pids).
    Ps {
        #[arg(short, long, default_value = "table")]
        format: String,
        id: String,
    },
    /// List containers.
    #[command(alias = "ls")]
    List {
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Write a config.json like `runc spec`.
    Spec {
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
    },
    /// Freeze a container's processes.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Print stats (and OOM) events.
    Events {
        #[arg(long)]
        stats: bool,
        #[arg(long, default_value = "5s")]
        interval: String,
        id: String,
    },
    /// Change a container's resources.
    Update(info::UpdateArgs),
    /// Print the OCI features document.
    Features,
    /// The warm pool of sandboxes: serve it, or show its state.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    #[command(name = "__monitor", hide = true)]
    Monitor(monitor::MonitorArgs),
    #[command(name = "__shadow", hide = true)]
    Shadow {
        /// The container it stands for (informational).
        id: String,
    },
}

impl Command {
    /// The container id the command names, for every command that names
    /// one: each is checked before anything touches the state directory.
    fn container_id(&self) -> Option<&str> {
        match self {
            Command::Create(a) => Some(&a.id),
            Command::Run(a) => Some(&a.create.id),
            Command::Exec(a) => Some(&a.id),
            Command::Update(a) => Some(&a.id),
            Command::Monitor(a) => Some(&a.id),
            Command::Start { id }
            | Command::State { id }
            | Command::Kill { id, .. }
            | Command::Delete { id, .. }
            | Command::Ps { id, .. }
            | Command::Pause { id }
            | Command::Resume { id }
            | Command::Events { id, .. } => Some(id),
            Command::Shadow { .. }
            | Command::Check(_)
            | Command::Pool(_)
            | Command::List { .. }
            | Command::Spec { .. }
            | Command::Features => None,
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<i32> {
    if cli.systemd_cgroup {
        bail!("--systemd-cgroup is not supported: husk manages the cgroups inside its microVMs");
    }
    if cli.rootless.as_deref().is_some_and(|v| v != "false") {
        bail!(
            "--rootless is not supported: husk needs root for KVM, mounts and vhost-user backends"
        );
    }
    let format = log::LogFormat::parse(&cli.log_format)?;
    let service = matches!(cli.command, Command::Pool(ref p) if p.is_service());
    log::init(cli.log.as_deref(), format, cli.debug, service)?;
    ::log::debug!("husk {:?}", std::env::args().skip(1).collect::<Vec<_>>());
    if let Some(id) = cli.command.container_id() {
        state::check_id(id)?;
    }
    let root = cli.root.as_path();
    match cli.command {
        Command::Check(args) => check::check(root, args),
        Command::Create(args) => lifecycle::create(root, &args).map(|_| 0),
        Command::Start { id } => lifecycle::start(root, &id).map(|_| 0),
        Command::Run(args) => lifecycle::run(root, args),
        Command::State { id } => lifecycle::state_cmd(root, &id).map(|_| 0),
        Command::Kill { all, id, signal } => lifecycle::kill(root, &id, &signal, all).map(|_| 0),
        Command::Delete { force, id } => lifecycle::delete(root, &id, force).map(|_| 0),
        Command::Exec(args) => exec::exec(root, args),
        Command::Ps { format, id } => info::ps(root, &id, &format).map(|_| 0),
        Command::List { format, quiet } => lifecycle::list(root, &format, quiet).map(|_| 0),
        Command::Spec { bundle } => info::spec(&bundle).map(|_| 0),
        Command::Pause { id } => lifecycle::pause(root, &id, true).map(|_| 0),
        Command::Resume { id } => lifecycle::pause(root, &id, false).map(|_| 0),
        Command::Events {
            stats,
            interval,
            id,
        } => info::events(root, &id, stats, &interval).map(|_| 0),
        Command::Update(args) => info::update(root, args).map(|_| 0),
        Command::Features => info::features().map(|_| 0),
        Command::Pool(command) => pool::pool(command),
        Command::Monitor(args) => monitor::monitor(root, args),
        Command::Shadow { .. } => shadow::shadow(),
    }
}

/// The error and its causes on one line, each cause once: our error messages
/// already name their causes, and a repeated cause only adds noise.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

/// Ends this process by `signal`, as a container process ended. Only a
/// signal whose default action ends a process is raised: anything else
/// (a stop signal, an ignored one) returns, and the caller exits instead.
pub fn die_by_signal(signal: i32) {
    if !husk_runtime::agent::is_fatal_signal(signal) {
        return;
    }
    // SAFETY: restoring the default action and raising a signal on ourselves.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signal);
    }
}
