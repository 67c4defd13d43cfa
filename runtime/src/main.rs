//! `husk`: a runc-compatible OCI runtime whose containers run in microVMs.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("husk: {}", one_line(&e));
            std::process::exit(1);
        }
    }
}

/// The error and its causes on one line, each cause once: our error messages
/// already name their causes, and a repeated cause only adds noise.
fn one_line(e: &anyhow::Error) -> String {
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
