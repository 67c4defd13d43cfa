//! `husk`: a runc-compatible OCI runtime whose containers run in microVMs.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let line = cli::one_line(&e);
            // The log file (when given) carries the error for clients that
            // read it (conmon), stderr for the ones that read that.
            log::error!("{line}");
            eprintln!("husk: {line}");
            std::process::exit(1);
        }
    }
}
