//! A pooled sandbox's keeper (`husk pool keep`, spawned by the service):
//! boots one sandbox, offers it on a socket in `idle/`, and hands it to the
//! one claimant that renamed that socket to `claimed/`.
//!
//! While the sandbox is idle the keeper tears it down and exits when the
//! service dies (even by SIGKILL: it holds the service's pidfd), when it is
//! told to stop (SIGTERM, SIGINT, SIGHUP), or when the VMM or a backend
//! dies; first it takes its socket out of `idle/` by a rename, so a
//! claimant can never get a sandbox that is being torn down (a rename that
//! finds the socket gone means a claimant was first: the claim is served).
//!
//! Once claimed it stays as the parent of the VMM and backends (spawned to
//! die with their spawner), reaps them when the owner ends the sandbox,
//! and ends them and cleans up if the owner dies first. It ignores the
//! service from then on: the container's sandbox outlives the pool.

use super::{io, wire, ClassDirs, PoolError};
use crate::config::Config;
use crate::event::{Flag, PidFd};
use crate::sandbox::{HandedOver, Handover, Sandbox, SandboxConfig};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// A claimant's first message, with its own pidfd attached.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ClaimRequest {
    pub pid: u32,
}

/// The keeper's answer.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Offer {
    /// The sandbox, with its descriptors attached (see `Handover`).
    Sandbox(Handover),
    /// The sandbox is not fit to hand out (it died while idle).
    Refused(String),
}

/// The claimant's last message.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Ack {
    /// The claimant owns the sandbox now.
    Adopted,
    /// It could not adopt it: the keeper tears it down.
    Failed(String),
}

/// How long a claimant has to speak once it holds the socket.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(30);

/// What a keeper boots.
#[derive(Debug, Clone)]
pub struct KeepArgs {
    pub class: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub id: String,
}

/// Signals that stop an idle keeper, blocked and read from a signalfd.
fn stop_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Blocks the stop signals in this thread (and the threads it starts) and
/// returns a descriptor that reads them.
pub fn signal_fd() -> Result<nix::sys::signalfd::SignalFd, PoolError> {
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let set = stop_signals();
    let sys = |e: nix::Error| PoolError::Keeper(format!("blocking the stop signals: {e}"));
    set.thread_block().map_err(sys)?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).map_err(sys)
}

/// A pidfd of this process's parent (the service), checked to be it: the
/// parent is the same after the open, so the pid was not reused.
fn parent_pidfd() -> Result<PidFd, PoolError> {
    let parent = nix::unistd::getppid().as_raw() as u32;
    let pidfd = PidFd::open(parent)?;
    if nix::unistd::getppid().as_raw() as u32 != parent || parent == 1 {
        return Err(PoolError::Keeper(
            "the pool service died before its keeper started".into(),
        ));
    }
    Ok(pidfd)
}

pub fn keep(config: &Config, args: &KeepArgs) -> Result<(), PoolError> {
    let key = super::class_key(config, args.vcpus, args.memory_mib)?;
    if key != args.class {
        return Err(PoolError::Keeper(format!(
            "class {} is not this configuration's {key}",
            args.class
        )));
    }
    if !crate::sandbox::valid_id(&args.id) {
        return Err(crate::sandbox::SandboxError::InvalidId(args.id.clone()).into());
    }
    let service = parent_pidfd()?;
    let signals = signal_fd()?;
    let dirs = ClassDirs::new(&config.pool_dir, &args.class);
    let lock_path = dirs.lock(&args.id);
    let lock = crate::lockfile::lock_exclusive(&lock_path, false)
        .map_err(io("locking", &lock_path))?
        .ok_or_else(|| PoolError::Keeper(format!("{} is held", lock_path.display())))?;
    let result = keep_locked(config, args, &dirs, &service, &signals);
    let _ = std::fs::remove_file(&lock_path);
    drop(lock);
    result
}

fn keep_locked(
    config: &Config,
    args: &KeepArgs,
    dirs: &ClassDirs,
    service: &PidFd,
    signals: &nix::sys::signalfd::SignalFd,
) -> Result<(), PoolError> {
    let t0 = Instant::now();
    let mut sc = SandboxConfig::new(&args.id, config);
    sc.state_root = dirs.vms();
    sc.vcpus = args.vcpus;
    sc.memory_mib = args.memory_mib;
    let mut sandbox = Sandbox::start(config, &sc)?;
    // Before it is offered: the guest runs one throwaway container of its
    // own, so that the tenant's create meets code already run (under TCG,
    // translated) instead of paying for it. No tenant data is involved; a
    // guest that fails it is not offered.
    let warm = sandbox.agent().warm_up().map_err(|e| sandbox.explain(e))?;
    warm.log("pool warm-up");
    sandbox.park_agent()?;
    let died = Flag::new()?;
    {
        let watch = sandbox.death_watch()?;
        let died = died.try_clone()?;
        std::thread::spawn(move || {
            if let Ok(Some(_)) = watch.wait() {
                died.raise();
            }
        });
    }
    let bound = dirs.keepers().join(format!("{}.sock", args.id));
    let _ = std::fs::remove_file(&bound);
    let listener = UnixListener::bind(&bound).map_err(io("binding", &bound))?;
    listener
        .set_nonblocking(true)
        .map_err(io("setting up", &bound))?;
    let idle = dirs.idle().join(&args.id);
    let claimed = dirs.claimed().join(&args.id);
    let retired = dirs.retired().join(&args.id);
    std::fs::rename(&bound, &idle).map_err(io("offering", &idle))?;
    log::info!(
        "pool: sandbox {} ({} vCPU, {} MiB) idle, ready in {:.0} ms",
        args.id,
        args.vcpus,
        args.memory_mib,
        t0.elapsed().as_secs_f64() * 1000.0
    );
    loop {
        let fds = [
            listener.as_fd(),
            service.as_fd(),
            signals.as_fd(),
            died.as_fd(),
        ];
        let woken = crate::event::wait_any(&fds, None)?;
        if woken != Some(0) {
            // Off the market first: a claimant that renamed it before us wins.
            match std::fs::rename(&idle, &retired) {
                Ok(()) => {
                    let why = match woken {
                        Some(1) => "the pool service ended",
                        Some(2) => "told to stop",
                        _ => "a component died",
                    };
                    log::info!("pool: sandbox {}: {why}: tearing it down", args.id);
                    let _ = sandbox.check_components();
                    let _ = sandbox.shutdown();
                    let _ = std::fs::remove_file(&retired);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // Claimed meanwhile: its claimant is connecting.
                    let deadline = Instant::now() + CLAIM_TIMEOUT;
                    if crate::event::wait_any(&[listener.as_fd()], Some(deadline))?.is_none() {
                        let _ = sandbox.shutdown();
                        let _ = std::fs::remove_file(&claimed);
                        return Ok(());
                    }
                }
                Err(e) => {
                    let _ = sandbox.shutdown();
                    return Err(io("retiring", &idle)(e));
                }
            }
        }
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                let _ = sandbox.shutdown();
                return Err(io("accepting on", &claimed)(e));
            }
        };
        // The socket is claimed/ now (only a claimant connects, after its rename).
        match serve_claim(&mut sandbox, &conn, &died) {
            Ok(owner) => {
                log::info!("pool: sandbox {} claimed by pid {}", args.id, owner.pid());
                let handed = sandbox.hand_over();
                drop(conn);
                drop(listener);
                owned(handed, &owner);
                let _ = std::fs::remove_file(&claimed);
                return Ok(());
            }
            Err(e) => {
                log::warn!(
                    "pool: sandbox {}: claim failed: {e}: tearing it down",
                    args.id
                );
                let _ = sandbox.shutdown();
                let _ = std::fs::remove_file(&claimed);
                return Ok(());
            }
        }
    }
}

/// Answers a claimant: the sandbox if it is alive, then waits for its word
/// that it adopted it. The claimant's pidfd on success.
fn serve_claim(sandbox: &mut Sandbox, conn: &UnixStream, died: &Flag) -> Result<PidFd, PoolError> {
    conn.set_nonblocking(false)
        .map_err(io("setting up", Path::new("the claim connection")))?;
    let peer = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| PoolError::Keeper(format!("the claimant's credentials: {e}")))?;
    if peer.uid() != 0 {
        return Err(PoolError::Keeper(format!(
            "a claimant of uid {} (root only)",
            peer.uid()
        )));
    }
    let (req, fds): (ClaimRequest, _) = wire::recv(conn, CLAIM_TIMEOUT)?;
    let Some(owner) = fds.into_iter().next() else {
        return Err(PoolError::Keeper("the claimant sent no pidfd".into()));
    };
    let owner = PidFd::from_owned(owner, req.pid);
    if died.is_raised() || sandbox.check_components().is_err() {
        let why = match sandbox.check_components() {
            Err(e) => e.to_string(),
            Ok(()) => "a component died".into(),
        };
        let _ = wire::send(conn, &Offer::Refused(why.clone()), &[]);
        return Err(PoolError::Refused(why));
    }
    let (record, fds) = sandbox.handover()?;
    let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // From the offer on, the parked agent connection may be the claimant's:
    // this process never reads or writes it again (see `forget_parked_agent`).
    let sent = wire::send(conn, &Offer::Sandbox(record), &raw);
    sandbox.forget_parked_agent();
    sent?;
    drop(fds);
    match wire::recv::<Ack>(conn, CLAIM_TIMEOUT)?.0 {
        Ack::Adopted => Ok(owner),
        Ack::Failed(why) => Err(PoolError::Refused(why)),
    }
}

/// After the claim: reaps the helpers as they end (the owner ends them),
/// or ends them and cleans up if the owner dies first.
fn owned(mut handed: HandedOver, owner: &PidFd) {
    loop {
        let mut fds = vec![owner.as_fd()];
        fds.extend(handed.helpers.iter().map(|h| h.pidfd().as_fd()));
        if fds.len() == 1 {
            break;
        }
        match crate::event::wait_any(&fds, None) {
            Ok(Some(0)) | Err(_) => {
                log::warn!(
                    "pool: the owner (pid {}) of {} died: ending its sandbox",
                    owner.pid(),
                    handed.dir.display()
                );
                for h in &mut handed.helpers {
                    h.stop(Duration::from_millis(0));
                }
                clean_after_owner(&mut handed);
                return;
            }
            Ok(Some(i)) => {
                let mut h = handed.helpers.remove(i - 1);
                // For the owner, which can only see that it ended.
                let _ = h.record_exit(&handed.dir);
            }
            Ok(None) => {}
        }
    }
    // The owner tore the sandbox down: its jail claim is its to release.
    if let Some(jail) = handed.jail.take() {
        std::mem::forget(jail);
    }
}

/// What the owner's teardown would have done: the jail's processes,
/// directory and claim, the sandbox's mounts and directory.
fn clean_after_owner(handed: &mut HandedOver) {
    if let Some(jail) = handed.jail.take() {
        let uid = jail.uid;
        if let Err(e) = crate::jail::kill_uid(uid) {
            log::warn!("pool: {e}");
        }
        let _ = std::fs::remove_dir_all(Path::new(crate::jail::JAIL_ROOT).join(uid.to_string()));
        jail.release();
    }
    let _ = crate::sandbox::unmount_below(&handed.dir);
    if let Err(e) = crate::sandbox::remove_tree_same_fs(&handed.dir) {
        log::warn!("pool: {e}");
    }
}
