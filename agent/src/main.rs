//! husk-agent: PID 1 of the husk guest.
//!
//! It prepares the guest (mounts, cgroups, the shared directory), serves the
//! agent API over vsock and runs the containers the host asks for. Any fatal
//! error is printed to the console and powers the VM off, so a broken guest
//! never hangs the host waiting for it.

mod cgroup;
mod child;
mod container;
mod error;
mod hooks;
#[cfg(feature = "hostile-test")]
mod hostile;
mod init;
mod phases;
mod pidns;
mod power;
mod process;
mod server;
mod stats;
mod streams;
mod tcp_buffers;
mod userns;
mod warm;

use std::sync::Arc;

const USAGE: &str = "usage: husk-agent
husk-agent is PID 1 of a husk guest (the /init of its initramfs): it mounts the
guest's file systems, serves the agent API over vsock and runs the containers.
It takes no arguments but --help and --version; husk starts it inside the
VM, never on the host.";

fn main() {
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    if std::env::args()
        .skip(1)
        .any(|a| a == "--version" || a == "-V")
    {
        // Says whether this build has the test-only attacks: the hostile
        // tests check that the production initramfs's agent has not.
        let mode = match cfg!(feature = "hostile-test") {
            true => " (hostile-test: test-only attacks on the host)",
            false => "",
        };
        println!("husk-agent {}{mode}", husk_protocol::VERSION);
        return;
    }
    if let Err(reason) = run() {
        power::fatal(&reason);
    }
}

fn run() -> Result<(), String> {
    // SIGCHLD goes to the reaper thread only: block it before any thread exists
    // so every thread inherits the mask.
    process::block_sigchld().map_err(|e| format!("blocking SIGCHLD: {e}"))?;
    if std::process::id() == 1 {
        init::setup_guest().map_err(|e| e.to_string())?;
    }
    #[cfg(feature = "hostile-test")]
    hostile::load().map_err(|e| e.to_string())?;
    let reaper = process::Reaper::start().map_err(|e| format!("starting the reaper: {e}"))?;
    let registry = streams::StreamRegistry::new();
    streams::listen(Arc::clone(&registry)).map_err(|e| e.to_string())?;
    let service = server::AgentService::new(reaper, registry);
    server::serve(service).map_err(|e| e.to_string())
}
