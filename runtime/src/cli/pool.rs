//! `husk pool`: the warm pool of sandboxes (see `husk_runtime::pool`).
//! `serve` runs the service in the foreground (contrib/systemd/
//! husk-pool.service runs it), `status` shows each class, `keep` is one
//! pooled sandbox's keeper, run by the service.

use clap::Subcommand;
use husk_runtime::config::Config;
use husk_runtime::pool::{self, keeper::KeepArgs, PoolStatus};

#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    /// Keep the configured number of sandboxes booted per size class, until
    /// SIGTERM (idle sandboxes are then torn down; claimed ones stay).
    Serve,
    /// Show each size class: sandboxes wanted, idle, booting, claimed.
    Status {
        /// Output format: text or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// One pooled sandbox's keeper (run by `husk pool serve`).
    #[command(hide = true)]
    Keep {
        #[arg(long)]
        class: String,
        #[arg(long)]
        vcpus: u32,
        #[arg(long)]
        memory_mib: u32,
        id: String,
    },
}

impl PoolCommand {
    /// A long-running process whose log is its stderr (the journal).
    pub fn is_service(&self) -> bool {
        matches!(self, PoolCommand::Serve | PoolCommand::Keep { .. })
    }
}

pub fn pool(command: PoolCommand) -> anyhow::Result<i32> {
    let config = Config::load()?;
    match command {
        PoolCommand::Serve => {
            let husk = std::env::current_exe()?;
            pool::service::serve(&config, &husk)?;
            Ok(0)
        }
        PoolCommand::Status { format } => {
            if format != "text" && format != "json" {
                anyhow::bail!("--format {format:?}: use text or json");
            }
            let status = pool::status(&config)?;
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status_text(&status));
            }
            Ok(0)
        }
        PoolCommand::Keep {
            class,
            vcpus,
            memory_mib,
            id,
        } => {
            pool::keeper::keep(
                &config,
                &KeepArgs {
                    class,
                    vcpus,
                    memory_mib,
                    id,
                },
            )?;
            Ok(0)
        }
    }
}

/// The text form of the pool's state (also part of `husk check`).
pub fn status_text(s: &PoolStatus) -> String {
    if s.classes.is_empty() {
        return "pool: off (no [[pool]] entry in the configuration)\n".into();
    }
    let mut out = format!(
        "pool: {} ({})\n",
        s.pool_dir.display(),
        if s.serving {
            "served"
        } else {
            "NOT served: start `husk pool serve`"
        }
    );
    out.push_str(&format!(
        "  {:<8} {:>10} {:>6} {:>6} {:>8} {:>8}\n",
        "vcpus", "memory_mib", "size", "idle", "booting", "claimed"
    ));
    for c in &s.classes {
        out.push_str(&format!(
            "  {:<8} {:>10} {:>6} {:>6} {:>8} {:>8}\n",
            c.vcpus, c.memory_mib, c.pool_size, c.idle, c.booting, c.claimed
        ));
    }
    out
}
