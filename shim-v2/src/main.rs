//! `containerd-shim-husk-v2`: husk's containerd shim v2 (runtime type
//! `io.containerd.husk.v2`). One shim process per VM: a plain container gets
//! its own VM and shim; the containers of a Kubernetes pod share the pod's VM
//! and its shim (grouped by the CRI annotation `io.kubernetes.cri.sandbox-id`).
//!
//! The three actions containerd asks of a shim binary:
//! - `start`: spawn (or reuse) the shim serving this container and print its
//!   ttrpc address;
//! - `delete`: clean up after a shim that died (mounts, the VM's directory);
//! - no action: serve the task API on `-socket` until shut down.
//!
//! containerd 1.6 speaks `containerd.task.v2.Task` and wants a plain address
//! from `start`; containerd 2.x speaks `containerd.task.v3.Task`. The
//! messages are the same, so the task service is registered under both names.

mod error;
mod io;
mod metrics;
mod mount;
mod publisher;
mod runtime_options;
mod service;
mod spec;
mod state;

use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::shim_ttrpc::create_task;
use containerd_shim::{Flags, StartOpts};
use std::io::Write;
use std::sync::Arc;

pub const RUNTIME_ID: &str = "io.containerd.husk.v2";

const USAGE: &str = "usage: containerd-shim-husk-v2 -namespace NS [-id ID] [-address ADDR] \
[-publish-binary BIN] [-socket ADDR] [-bundle DIR] [-debug] [-v] [start | delete]
containerd starts this binary for runtime io.containerd.husk.v2 (see docs/containerd.md):
  start    spawn (or reuse) the shim serving this container and print its address
  delete   clean up after a shim that died
  (none)   serve the task API on -socket";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Go's flag package (containerd's own shims) accepts -h, -help and --help.
    if args[1..]
        .iter()
        .any(|a| matches!(a.as_str(), "-h" | "-help" | "--help"))
    {
        println!("{USAGE}");
        return;
    }
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => fail(format!("bad arguments: {e}")),
    };
    if flags.version {
        println!(
            "{}:\n  Version: {}\n  Runtime: {RUNTIME_ID}",
            args[0],
            env!("CARGO_PKG_VERSION")
        );
        return;
    }
    if flags.namespace.is_empty() {
        fail("-namespace is required".into());
    }
    let result = match flags.action.as_str() {
        "start" => start(&flags),
        "delete" => delete(&flags),
        "" => serve(&flags),
        other => Err(anyhow::anyhow!(
            "unknown action {other:?} (start, delete, or none to serve)"
        )),
    };
    if let Err(e) = result {
        fail(format!("{e:#}"));
    }
}

fn fail(message: String) -> ! {
    eprintln!("{RUNTIME_ID}: {message}");
    std::process::exit(1);
}

/// `start`: containerd runs it with the bundle as cwd. Prints the address of
/// the shim that will serve this container, spawning one when the pod (or
/// container) has none yet.
fn start(flags: &Flags) -> anyhow::Result<()> {
    let bundle = std::env::current_dir()?;
    let annotations = spec::read_annotations(&bundle).unwrap_or_default();
    let grouping = spec::grouping(&flags.id, &annotations);
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    let address = opts.socket_address(&grouping);
    // A container of a pod whose shim already runs: reuse it.
    let reuse = grouping != flags.id
        && containerd_shim::util::connect(&address)
            .map(close_fd)
            .is_ok();
    let address = if reuse {
        address
    } else {
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        address
    };
    containerd_shim::util::write_address(&address)?;
    let mut out = std::io::stdout().lock();
    out.write_all(address.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn close_fd(fd: std::os::fd::RawFd) {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by connect and is owned by nobody else.
    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
}

/// `delete`: the shim is gone (killed, crashed); remove what it left.
fn delete(flags: &Flags) -> anyhow::Result<()> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir()?
    } else {
        flags.bundle.clone().into()
    };
    if let Err(e) = state::cleanup_after_dead_shim(&bundle, &flags.namespace, &flags.id) {
        eprintln!("{RUNTIME_ID}: delete {}: {e:#}", flags.id);
    }
    let response = containerd_shim::api::DeleteResponse {
        pid: 0,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: Some(containerd_shim::util::timestamp()?).into(),
        ..Default::default()
    };
    let mut out = std::io::stdout().lock();
    response.write_to_writer(&mut out)?;
    out.flush()?;
    Ok(())
}

/// Serves the task API until every container is gone and containerd asked
/// for shutdown.
fn serve(flags: &Flags) -> anyhow::Result<()> {
    use std::os::fd::IntoRawFd;
    if flags.socket.is_empty() {
        anyhow::bail!("-socket is required to serve");
    }
    // containerd's log FIFO in the bundle, when there is one.
    let _ = containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id);
    let path = flags
        .socket
        .strip_prefix("unix://")
        .unwrap_or(&flags.socket)
        .to_string();
    if let Some(parent) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener = match std::os::unix::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if containerd_shim::util::connect(&flags.socket)
                .map(close_fd)
                .is_ok()
            {
                // Another shim serves this group already.
                containerd_shim::util::write_address(&flags.socket)?;
                signal_server_started();
                return Ok(());
            }
            std::fs::remove_file(&path)?;
            std::os::unix::net::UnixListener::bind(&path)?
        }
        Err(e) => return Err(e.into()),
    };
    let ttrpc_address =
        std::env::var("TTRPC_ADDRESS").map_err(|_| anyhow::anyhow!("TTRPC_ADDRESS is not set"))?;
    // Reconnects when containerd restarts (see publisher.rs).
    let publisher = Arc::new(publisher::Publisher::new(
        &ttrpc_address,
        publisher::Retry::default(),
    )?);
    let exit = Arc::new(containerd_shim::ExitSignal::default());
    let service = service::Service::new(flags.namespace.clone(), publisher.clone(), exit.clone());
    let task: Arc<dyn containerd_shim::protos::shim::shim_ttrpc::Task + Send + Sync> =
        Arc::new(service);
    // containerd 1.6 calls containerd.task.v2.Task, 2.x calls v3: same messages.
    let mut services = create_task(task.clone());
    for (path, handler) in create_task(task) {
        services.insert(
            path.replace("containerd.task.v3.Task", "containerd.task.v2.Task"),
            handler,
        );
    }
    // Wait calls block a server thread each for the life of a process.
    let mut server = ttrpc::Server::new()
        .set_thread_count_default(4)
        .set_thread_count_max(256)
        .add_listener(listener.into_raw_fd())?
        .register_service(services);
    server.start()?;
    signal_server_started();
    log::info!("husk shim serving {} for {}", flags.socket, flags.id);
    exit.wait();
    server.shutdown();
    // The last events (TaskDelete) are still queued: let them out first.
    if !publisher.close(std::time::Duration::from_secs(5)) {
        log::warn!("exiting with events not yet sent to containerd");
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Closes stdout (points it at stderr) so that `start`, which reads our
/// stdout until EOF, returns.
fn signal_server_started() {
    // SAFETY: dup2 on the process's own standard descriptors.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}
