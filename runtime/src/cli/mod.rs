//! Command-line front end over the sandbox library.

mod bundle;
mod check;
mod run;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "husk", version, about = "OCI runtime running each container in its own microVM")]
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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check the prerequisites, boot a probe microVM and report timings.
    Check(check::CheckArgs),
    /// Create, start and wait for a container (foreground).
    Run(run::RunArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Check(args) => check::check(&cli.root, args),
        Command::Run(args) => run::run(&cli.root, args),
    }
}
