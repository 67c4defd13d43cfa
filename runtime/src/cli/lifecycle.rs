//! The OCI lifecycle: create, start, run, kill, delete, state, list, pause,
//! resume.

use super::monitor::{self, FD_LINK, FD_READY, FD_STDERR, FD_STDIN, FD_STDOUT};
use super::monitor_protocol::{self as proto, MonitorRequest, ReadyMessage};
use super::shadow::FD_SHADOW_LINK;
use super::state::{self, ContainerState, Status};
use anyhow::{bail, Context};
use husk_runtime::supervisor::{Bundle, Event, HookKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Path to the bundle (the directory holding config.json).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Unix socket that receives the pty master when process.terminal is set.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// File to write the pid of the container's host process to.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Enter the rootfs with MS_MOVE + chroot instead of pivot_root.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for compatibility (the guest kernel has its own keyrings).
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra fds to pass to the container; a VM boundary cannot carry them.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Return once the container runs instead of waiting for it.
    #[arg(short, long)]
    pub detach: bool,
}

/// The created container's shadow process (our child).
pub struct Created {
    pub shadow: std::process::Child,
}

/// Duplicates `fd` to a number >= 10 with close-on-exec, so the fixed
/// numbers 3..7 can be assigned in the child without clobbering.
fn high_dup(fd: RawFd) -> anyhow::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd we own, or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(std::io::Error::last_os_error()).context("duplicating a file descriptor");
    }
    // SAFETY: `new` was just returned by fcntl and is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn fd_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

pub fn create(root: &Path, args: &CreateArgs) -> anyhow::Result<Created> {
    state::check_id(&args.id)?;
    if args.preserve_fds > 0 {
        bail!(
            "--preserve-fds {}: passing host file descriptors into a VM is not supported",
            args.preserve_fds
        );
    }
    let bundle = Bundle::load(&args.bundle)?;
    let annotations = bundle.annotations().into_iter().collect();
    husk_runtime::sandbox::private_dir_all(root)?;
    // Held until the container is created (or everything undone): a delete
    // of this id waits for it.
    let _lifecycle = state::lifecycle_lock(root, &args.id)?;
    let dir = state::container_dir(root, &args.id);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("container with id {} already exists", args.id)
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let result = spawn_monitor_and_shadow(root, args, &bundle, annotations);
    if result.is_err() {
        // The monitor removes what it made; a monitor that died early
        // cannot: what `delete` removes after a crashed monitor.
        let sandbox = husk_runtime::sandbox::sandbox_dir(&state::sandbox_root(root), &args.id);
        husk_runtime::sandbox::remove_jail_of(&sandbox);
        let _ = husk_runtime::sandbox::unmount_below(&sandbox);
        let _ = husk_runtime::sandbox::remove_tree_same_fs(&sandbox);
        if let Ok(st) = ContainerState::load(root, &args.id) {
            husk_runtime::host_cgroup::remove_after_owner_died(&st.host_cgroup);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn spawn_monitor_and_shadow(
    root: &Path,
    args: &CreateArgs,
    bundle: &Bundle,
    annotations: std::collections::BTreeMap<String, String>,
) -> anyhow::Result<Created> {
    ContainerState {
        id: args.id.clone(),
        bundle: bundle.dir.clone(),
        status: Status::Creating,
        pid: 0,
        monitor_pid: 0,
        monitor_start: 0,
        created: state::now_rfc3339(),
        annotations,
        exit_code: None,
        guest_pid: 0,
        error: None,
        hooks: bundle.spec.hooks().clone(),
        network_namespace: husk_runtime::supervisor::network::namespace_path(&bundle.spec),
        host_cgroup: Vec::new(),
    }
    // The one state write of the CLI: the record the monitor takes over.
    .save(root)?;
    let exe = std::env::current_exe().context("finding the husk binary")?;
    let (link_monitor, link_shadow) = UnixStream::pair().context("creating the shadow link")?;
    let (ready_r, ready_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    let shadow_link = high_dup(link_shadow.as_raw_fd())?;
    drop(link_shadow);
    let shadow_fd = shadow_link.as_raw_fd();
    let mut cmd = Command::new(&exe);
    // The root and id in its argv say whose shadow it is (ps, leftovers).
    cmd.arg("--root")
        .arg(root)
        .arg("__shadow")
        .arg(&args.id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // The container's own network namespace, when a host hook may put its
    // interfaces there before start (Docker's prestart hook moves the veth
    // into /proc/<state.pid>/ns/net): the shadow is state.pid, so it lives
    // in that namespace; the monitor wires what appears there.
    let own_netns = husk_runtime::supervisor::network::interfaces_may_come_late(&bundle.spec);
    // SAFETY: dup2, close_range and unshare are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(shadow_fd, FD_SHADOW_LINK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::syscall(libc::SYS_close_range, FD_SHADOW_LINK + 1, u32::MAX, 0);
            if own_netns && libc::unshare(libc::CLONE_NEWNET) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut shadow = cmd.spawn().context("starting the shadow process")?;
    drop(shadow_link);
    // The container's stdio: what this command was given.
    let stdio: Vec<Option<OwnedFd>> = (0..3)
        .map(|fd| if fd_open(fd) { high_dup(fd).ok() } else { None })
        .collect();
    let link_m = high_dup(link_monitor.as_raw_fd())?;
    let ready = high_dup(ready_w.as_raw_fd())?;
    drop((link_monitor, ready_w));
    let mapping: Vec<(RawFd, RawFd)> = stdio
        .iter()
        .zip([FD_STDIN, FD_STDOUT, FD_STDERR])
        .filter_map(|(fd, to)| fd.as_ref().map(|f| (f.as_raw_fd(), to)))
        .chain([(link_m.as_raw_fd(), FD_LINK), (ready.as_raw_fd(), FD_READY)])
        .collect();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state::container_dir(root, &args.id).join("monitor.log"))
        .context("creating the monitor log")?;
    let mut cmd = Command::new(&exe);
    cmd.arg("--root").arg(root);
    super::log::forward_flags(&mut cmd);
    cmd.arg("__monitor")
        .arg("--bundle")
        .arg(&bundle.dir)
        .arg("--shadow-pid")
        .arg(shadow.id().to_string());
    if let Some(s) = &args.console_socket {
        cmd.arg("--console-socket").arg(s);
    }
    if args.no_pivot {
        cmd.arg("--no-pivot");
    }
    cmd.arg(&args.id)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid, dup2 and close_range are async-signal-safe; the fds are open.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (from, to) in &mapping {
                if libc::dup2(*from, *to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Nothing else of the caller's (lock files, sockets) may live on
            // in the daemon.
            libc::syscall(libc::SYS_close_range, FD_READY + 1, u32::MAX, 0);
            Ok(())
        });
    }
    let mut monitor = match cmd.spawn() {
        Ok(m) => m,
        Err(e) => {
            let _ = shadow.kill();
            let _ = shadow.wait();
            return Err(e).context("starting the monitor");
        }
    };
    drop((stdio, link_m, ready));

    let answer = proto::read_message::<ReadyMessage>(&mut std::fs::File::from(ready_r), None);
    if let Ok(ReadyMessage::Ready { phases }) = &answer {
        phases.log("create");
    } else {
        let _ = monitor.wait();
        let _ = shadow.kill();
        let _ = shadow.wait();
        match answer {
            Ok(ReadyMessage::Failed { message }) => bail!("{message}"),
            _ => {
                // A monitor that died cannot unwire what it wired (a
                // failing one did): husk's taps and filters in the
                // client's namespace go as after a crash.
                if let Some(netns) = husk_runtime::supervisor::network::namespace_path(&bundle.spec)
                {
                    husk_runtime::supervisor::network::unwire_after_crash(&netns);
                }
                let log = state::container_dir(root, &args.id).join("monitor.log");
                bail!(
                    "the monitor of {} died while creating it: {}",
                    args.id,
                    husk_runtime::backends::log_tail(&log)
                )
            }
        }
    }
    let pid = shadow.id() as i32;
    if let Some(pid_file) = &args.pid_file {
        if let Err(e) = write_pid_file(pid_file, pid) {
            // The container exists now: its monitor tears it down (the VM,
            // taps, host cgroup) and ends, before the caller removes what
            // is left on disk. A create that fails leaves nothing running.
            // Opened while the monitor is unreaped: it cannot name another.
            let monitor_exit = husk_runtime::event::PidFd::open(monitor.id());
            let asked = monitor::request(root, &args.id, &MonitorRequest::Delete { force: true });
            match &asked {
                Ok(reply) => monitor::print_warnings(reply),
                Err(d) => log::warn!(
                    "{}: removing the container after its failed create: {d:#}",
                    args.id
                ),
            }
            // A monitor that refused, or does not end, is killed: its VM and
            // backends die with it, and what it wired goes as after a crash.
            let ended = asked.is_ok()
                && monitor_exit
                    .and_then(|p| p.wait_timeout(std::time::Duration::from_secs(10)))
                    .unwrap_or(false);
            if !ended {
                let _ = monitor.kill();
                if let Some(netns) = husk_runtime::supervisor::network::namespace_path(&bundle.spec)
                {
                    husk_runtime::supervisor::network::unwire_after_crash(&netns);
                }
            }
            let _ = monitor.wait();
            let _ = shadow.kill();
            let _ = shadow.wait();
            return Err(e);
        }
    }
    // The monitor is a daemon; we do not wait for it. Reap it if it ever
    // ends while we live (run in the foreground).
    std::thread::spawn(move || monitor.wait());
    Ok(Created { shadow })
}

pub fn write_pid_file(path: &Path, pid: i32) -> anyhow::Result<()> {
    let tmp = path.with_extension("husk-tmp");
    std::fs::write(&tmp, pid.to_string())
        .with_context(|| format!("writing pid file {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing pid file {}", path.display()))
}

pub fn start(root: &Path, id: &str) -> anyhow::Result<()> {
    let st = ContainerState::load(root, id)?;
    st.effective_status().next(Event::Start)?;
    // The monitor starts it and runs the poststart hooks.
    let reply = monitor::request(root, id, &MonitorRequest::Start)?;
    monitor::print_warnings(&reply);
    Ok(())
}

/// Exit status of a child as the shell reports it.
fn shell_status(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

pub fn run(root: &Path, args: RunArgs) -> anyhow::Result<i32> {
    let mut watch = husk_runtime::phases::Stopwatch::new();
    let mut created = create(root, &args.create)?;
    watch.lap("create");
    let id = &args.create.id;
    if let Err(e) = start(root, id) {
        let _ = delete(root, id, true);
        let _ = created.shadow.wait();
        return Err(e);
    }
    watch.lap("start");
    if args.detach {
        return Ok(0);
    }
    let status = created.shadow.wait().context("waiting for the container")?;
    watch.lap("started to exit seen");
    let error = ContainerState::load(root, id).ok().and_then(|s| s.error);
    delete(root, id, true)?;
    watch.lap("delete");
    watch.finish().log("run");
    if let Some(e) = error {
        bail!("container {id}: {e}");
    }
    Ok(shell_status(status))
}

pub fn kill(root: &Path, id: &str, signal: &str, all: bool) -> anyhow::Result<()> {
    let signal = super::signals::parse(signal)?;
    let st = ContainerState::load(root, id)?;
    match st.effective_status() {
        Status::Stopped => bail!("container {id} is not running"),
        Status::Creating => bail!("container {id} is still being created"),
        _ => {}
    }
    monitor::request(root, id, &MonitorRequest::Kill { signal, all })?;
    Ok(())
}

pub fn delete(root: &Path, id: &str, force: bool) -> anyhow::Result<()> {
    // Waits for a create of this id still in progress.
    let lifecycle = state::lifecycle_lock(root, id)?;
    let st = match ContainerState::load(root, id) {
        Ok(st) => st,
        Err(e) => {
            if !state::container_dir(root, id).exists() {
                lifecycle.remove();
            }
            return Err(e);
        }
    };
    if st.monitor_alive() {
        // Opened while the monitor is known alive (pid and start time), so
        // it cannot name a process that reused the pid.
        let monitor_exit = husk_runtime::event::PidFd::open(st.monitor_pid.unsigned_abs());
        // The monitor tears down and runs the poststop hooks.
        let reply = monitor::request(root, id, &MonitorRequest::Delete { force })?;
        monitor::print_warnings(&reply);
        // The monitor exits after answering; wait so nothing of it remains.
        if let Ok(pidfd) = monitor_exit {
            let _ = pidfd.wait_timeout(std::time::Duration::from_secs(1));
        }
    } else {
        // A crashed monitor took its VM with it; remove what is left on disk.
        let sandbox = husk_runtime::sandbox::sandbox_dir(&state::sandbox_root(root), id);
        husk_runtime::sandbox::remove_jail_of(&sandbox);
        if let Some(netns) = &st.network_namespace {
            husk_runtime::supervisor::network::unwire_after_crash(netns);
        }
        // The VM's processes died with the monitor; their cgroup goes once
        // they left it, before anything that may fail.
        husk_runtime::host_cgroup::remove_after_owner_died(&st.host_cgroup);
        husk_runtime::sandbox::unmount_below(&sandbox)?;
        husk_runtime::sandbox::remove_tree_same_fs(&sandbox)?;
        let _ = std::fs::remove_dir_all(state::container_dir(root, id));
        // No monitor is left to run poststop: the hooks saved at create run
        // here, the one host hook the CLI runs itself.
        for w in super::hooks::run_saved_hooks(&st, HookKind::Poststop) {
            eprintln!("husk: warning: {w}");
        }
    }
    if !state::container_dir(root, id).exists() {
        lifecycle.remove();
    }
    Ok(())
}

pub fn state_cmd(root: &Path, id: &str) -> anyhow::Result<()> {
    let st = ContainerState::load(root, id)?;
    println!("{}", serde_json::to_string_pretty(&st.oci())?);
    Ok(())
}

pub fn list(root: &Path, format: &str, quiet: bool) -> anyhow::Result<()> {
    let mut all = Vec::new();
    if let Ok(entries) = std::fs::read_dir(state::containers_dir(root)) {
        for e in entries.flatten() {
            if let Ok(st) = ContainerState::load(root, &e.file_name().to_string_lossy()) {
                all.push(st);
            }
        }
    }
    all.sort_by(|a, b| a.created.cmp(&b.created));
    if quiet {
        for st in &all {
            println!("{}", st.id);
        }
    } else if format == "json" {
        let list: Vec<_> = all
            .iter()
            .map(|st| {
                let mut v = st.oci();
                v["created"] = serde_json::json!(st.created);
                v["owner"] = serde_json::json!("root");
                v["rootfs"] = serde_json::json!(st.bundle.join("rootfs"));
                v
            })
            .collect();
        println!("{}", serde_json::to_string(&list)?);
    } else {
        println!(
            "{:<20} {:<8} {:<10} {:<40} {:<32} OWNER",
            "ID", "PID", "STATUS", "BUNDLE", "CREATED"
        );
        for st in &all {
            let oci = st.oci();
            println!(
                "{:<20} {:<8} {:<10} {:<40} {:<32} root",
                st.id,
                oci["pid"],
                st.effective_status().as_str(),
                st.bundle.display(),
                st.created
            );
        }
    }
    Ok(())
}

pub fn pause(root: &Path, id: &str, pause: bool) -> anyhow::Result<()> {
    let st = ContainerState::load(root, id)?;
    let want = if pause {
        Status::Running
    } else {
        Status::Paused
    };
    if st.effective_status() != want {
        bail!(
            "container {id} is {}, not {}",
            st.effective_status().as_str(),
            want.as_str()
        );
    }
    // The monitor freezes (or thaws) it and records the new status.
    let req = if pause {
        MonitorRequest::Pause
    } else {
        MonitorRequest::Resume
    };
    monitor::request(root, id, &req)?;
    Ok(())
}
