//! `husk pool serve`: keeps `pool_size` sandboxes of each class booted and
//! unclaimed. Each is a keeper process (`keeper`); a keeper that exits is
//! replaced (after a claim, or when its idle VM died), one that never got
//! its sandbox ready counts as a failed boot and the class's next boot
//! waits longer (up to `MAX_BACKOFF`), so a broken setup does not loop.
//!
//! On SIGTERM, SIGINT or SIGHUP the service stops its unclaimed keepers
//! (each tears its sandbox down), waits for them and exits. Keepers of
//! claimed sandboxes are left alone: they belong to their containers now.
//! If the service is killed outright, its idle keepers see it die (they
//! hold its pidfd) and tear down on their own.

use super::{io, ClassDirs, PoolError};
use crate::config::{Config, PoolClass};
use crate::event::{DirWatch, PidFd};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The lock `husk pool serve` holds in the pool directory.
pub const SERVE_LOCK: &str = "serve.lock";
/// The longest wait before booting again after failed boots.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long stopping keepers may take at shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

struct Keeper {
    id: String,
    class: usize,
    child: Child,
    pidfd: PidFd,
    /// Seen offering its sandbox once.
    was_idle: bool,
}

struct Class {
    class: PoolClass,
    key: String,
    dirs: ClassDirs,
    watches: [DirWatch; 2],
    failures: u32,
    not_before: Instant,
}

impl Class {
    fn is_claimed(&self, id: &str) -> bool {
        self.dirs.claimed().join(id).exists()
    }
    fn is_idle(&self, id: &str) -> bool {
        self.dirs.idle().join(id).exists()
    }
}

/// Serves the pool of `config` until told to stop; `husk` is the binary
/// whose `pool keep` runs each keeper.
pub fn serve(config: &Config, husk: &Path) -> Result<(), PoolError> {
    if config.pool.is_empty() {
        return Err(PoolError::Off);
    }
    let signals = super::keeper::signal_fd()?;
    crate::sandbox::private_dir_all(&config.pool_dir)?;
    let lock_path = config.pool_dir.join(SERVE_LOCK);
    let _lock = crate::lockfile::lock_exclusive(&lock_path, false)
        .map_err(io("locking", &lock_path))?
        .ok_or_else(|| PoolError::AlreadyServed(lock_path.clone()))?;
    super::sweep(&config.pool_dir);
    let mut classes = Vec::new();
    for c in &config.pool {
        let key = super::class_key(config, c.vcpus, c.memory_mib)?;
        let dirs = ClassDirs::new(&config.pool_dir, &key);
        dirs.make()?;
        let watches = [
            DirWatch::new(&dirs.idle())?,
            DirWatch::new(&dirs.claimed())?,
        ];
        log::info!(
            "pool: class {key}: {} sandbox(es) of {} vCPU, {} MiB",
            c.pool_size,
            c.vcpus,
            c.memory_mib
        );
        classes.push(Class {
            class: *c,
            key,
            dirs,
            watches,
            failures: 0,
            not_before: Instant::now(),
        });
    }
    let mut keepers: Vec<Keeper> = Vec::new();
    loop {
        let now = Instant::now();
        let mut next_try: Option<Instant> = None;
        for (ci, class) in classes.iter_mut().enumerate() {
            for k in keepers.iter_mut().filter(|k| k.class == ci) {
                if !k.was_idle && class.is_idle(&k.id) {
                    k.was_idle = true;
                    class.failures = 0;
                }
            }
            let unclaimed = keepers
                .iter()
                .filter(|k| k.class == ci && !class.is_claimed(&k.id))
                .count();
            let missing = (class.class.pool_size as usize).saturating_sub(unclaimed);
            if missing == 0 {
                continue;
            }
            if now < class.not_before {
                next_try = Some(next_try.map_or(class.not_before, |t| t.min(class.not_before)));
                continue;
            }
            for _ in 0..missing {
                match spawn_keeper(husk, class, ci) {
                    Ok(k) => keepers.push(k),
                    Err(e) => {
                        log::error!("pool: class {}: {e}", class.key);
                        backoff(class);
                        break;
                    }
                }
            }
        }
        let mut fds = vec![signals.as_fd()];
        for class in &classes {
            fds.extend(class.watches.iter().map(|w| w.as_fd()));
        }
        let first_keeper = fds.len();
        fds.extend(keepers.iter().map(|k| k.pidfd.as_fd()));
        let woken = crate::event::wait_any(&fds, next_try)?;
        match woken {
            Some(0) => break,
            Some(i) if i < first_keeper => {
                for class in &classes {
                    class.watches.iter().for_each(DirWatch::drain);
                }
            }
            Some(i) => {
                let mut k = keepers.remove(i - first_keeper);
                let status = k.child.wait().ok();
                let class = &mut classes[k.class];
                if class.is_claimed(&k.id) {
                    // Its owner cleans up (or it did, for a dead owner).
                    let _ = std::fs::remove_file(class.dirs.claimed().join(&k.id));
                    continue;
                }
                if !k.was_idle {
                    log::warn!(
                        "pool: class {}: keeper {} ended before its sandbox was ready ({})",
                        class.key,
                        k.id,
                        status.map(crate::child::describe).unwrap_or_default()
                    );
                    backoff(class);
                }
                super::sweep_keeper(&class.dirs, &k.id);
            }
            None => {}
        }
    }
    drop(signals);
    shutdown(&classes, keepers);
    Ok(())
}

fn backoff(class: &mut Class) {
    class.failures = class.failures.saturating_add(1);
    let wait = Duration::from_secs(1u64 << class.failures.min(5)).min(MAX_BACKOFF);
    class.not_before = Instant::now() + wait;
}

/// Stops the unclaimed keepers (each tears its sandbox down, or serves a
/// claim that won the race) and waits for them.
fn shutdown(classes: &[Class], keepers: Vec<Keeper>) {
    let mut stopping: Vec<Keeper> = keepers
        .into_iter()
        .filter(|k| !classes[k.class].is_claimed(&k.id))
        .collect();
    for k in &stopping {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(k.child.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while !stopping.is_empty() {
        let fds: Vec<_> = stopping.iter().map(|k| k.pidfd.as_fd()).collect();
        match crate::event::wait_any(&fds, Some(deadline)) {
            Ok(Some(i)) => {
                let mut k = stopping.remove(i);
                let _ = k.child.wait();
                super::sweep_keeper(&classes[k.class].dirs, &k.id);
            }
            _ => {
                for mut k in stopping.drain(..) {
                    log::warn!("pool: keeper {} did not stop: killing it", k.id);
                    let _ = k.child.kill();
                    let _ = k.child.wait();
                    super::sweep_keeper(&classes[k.class].dirs, &k.id);
                }
            }
        }
    }
}

fn spawn_keeper(husk: &Path, class: &Class, index: usize) -> Result<Keeper, PoolError> {
    let id = format!("p{:016x}", crate::agent::new_token());
    let mut cmd = Command::new(husk);
    cmd.args([
        "pool",
        "keep",
        "--class",
        &class.key,
        "--vcpus",
        &class.class.vcpus.to_string(),
        "--memory-mib",
        &class.class.memory_mib.to_string(),
        &id,
    ])
    .stdin(std::process::Stdio::null());
    // SAFETY: setsid(2) and sigprocmask(2) are async-signal-safe. The
    // keeper is a session of its own (a terminal's Ctrl-C is the
    // service's to handle), and starts with no signal blocked (the
    // service blocks its stop signals to read them).
    unsafe {
        cmd.pre_exec(|| {
            let empty: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(io("running", husk))?;
    let pidfd = PidFd::open(child.id())?;
    Ok(Keeper {
        id,
        class: index,
        child,
        pidfd,
        was_idle: false,
    })
}
