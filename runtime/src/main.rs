//! `husk`: a runc-compatible OCI runtime whose containers run in microVMs.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("husk: {}", cli::one_line(&e));
            std::process::exit(1);
        }
    }
}
