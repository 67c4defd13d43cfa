//! Claiming a pooled sandbox for a container (the CLI's monitor, the
//! shim): when the sandbox wanted fits a class of the pool exactly, take an
//! idle one by renaming its keeper's socket from `idle/` to `claimed/`
//! (one claimant wins each), and adopt it. Anything that fails after the
//! rename is logged and answered with None: the caller cold-boots, and the
//! keeper tears the half-claimed sandbox down; it is never offered again.

use super::keeper::{Ack, ClaimRequest, Offer};
use super::{wire, ClassDirs, PoolError};
use crate::config::Config;
use crate::event::PidFd;
use crate::host_cgroup::{HostCgroup, HostCgroupError};
use crate::sandbox::{Sandbox, SandboxConfig};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A sandbox taken from the pool.
pub struct Claimed {
    pub sandbox: Sandbox,
    /// The keeper that booted it, still the parent of its helpers.
    pub keeper_pid: u32,
    /// Its name in the pool (its directory's).
    pub pooled_id: String,
    /// From the first look in the pool to an adopted sandbox whose agent
    /// answered.
    pub claim_ms: f64,
}

impl Claimed {
    /// Moves the keeper and every process under it (the VMM, the backends)
    /// into the container's host cgroup, as if spawned there.
    pub fn move_into(&self, cgroup: &HostCgroup) -> Result<(), HostCgroupError> {
        for pid in super::process_tree(self.keeper_pid) {
            cgroup.add(pid)?;
        }
        Ok(())
    }
}

/// How long a claimant waits for its keeper's answer.
const OFFER_TIMEOUT: Duration = Duration::from_secs(30);

/// Takes a pooled sandbox for `sc` if one fits (same vCPUs and memory as a
/// class, no network taps at boot, its own share) and one is idle.
pub fn claim(config: &Config, sc: &SandboxConfig) -> Option<Claimed> {
    let t0 = Instant::now();
    if !sc.network.is_empty() || sc.shared_dir.is_some() {
        return None;
    }
    super::class_of(config, sc.vcpus, sc.memory_mib)?;
    let key = match super::class_key(config, sc.vcpus, sc.memory_mib) {
        Ok(k) => k,
        Err(e) => {
            log::warn!("pool: {e}");
            return None;
        }
    };
    let dirs = ClassDirs::new(&config.pool_dir, &key);
    for id in ClassDirs::ids_in(&dirs.idle()) {
        let claimed = dirs.claimed().join(&id);
        if std::fs::rename(dirs.idle().join(&id), &claimed).is_err() {
            continue; // another claimant, or its keeper retiring it
        }
        return match take(config, sc, &dirs, &id) {
            Ok((sandbox, keeper_pid)) => Some(Claimed {
                sandbox,
                keeper_pid,
                pooled_id: id,
                claim_ms: t0.elapsed().as_secs_f64() * 1000.0,
            }),
            Err(e) => {
                log::warn!("pool: claiming sandbox {id}: {e}; booting one of its own");
                None
            }
        };
    }
    None
}

fn take(
    config: &Config,
    sc: &SandboxConfig,
    dirs: &ClassDirs,
    id: &str,
) -> Result<(Sandbox, u32), PoolError> {
    let path = dirs.claimed().join(id);
    let conn = UnixStream::connect(&path).map_err(super::io("connecting to", &path))?;
    let peer = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| PoolError::Keeper(format!("the keeper's credentials: {e}")))?;
    if peer.uid() != 0 {
        return Err(PoolError::Keeper(format!(
            "{} is served by uid {}, not root",
            path.display(),
            peer.uid()
        )));
    }
    let me = std::process::id();
    let my_pidfd = PidFd::open(me)?;
    wire::send(
        &conn,
        &ClaimRequest { pid: me },
        &[my_pidfd.as_fd().as_raw_fd()],
    )?;
    let (offer, fds) = wire::recv::<Offer>(&conn, OFFER_TIMEOUT)?;
    let record = match offer {
        Offer::Sandbox(r) => r,
        Offer::Refused(why) => return Err(PoolError::Refused(why)),
    };
    let vms = dirs.vms();
    if record.dir.parent() != Some(vms.as_path()) {
        let why = format!(
            "its directory {} is not in {}",
            record.dir.display(),
            vms.display()
        );
        let _ = wire::send(&conn, &Ack::Failed(why.clone()), &[]);
        return Err(PoolError::Keeper(why));
    }
    match Sandbox::adopt(config, &sc.id, record, fds) {
        Ok(sandbox) => {
            wire::send(&conn, &Ack::Adopted, &[])?;
            Ok((sandbox, u32::try_from(peer.pid()).unwrap_or(0)))
        }
        Err(e) => {
            let _ = wire::send(&conn, &Ack::Failed(e.to_string()), &[]);
            Err(e.into())
        }
    }
}
