//! Jailing a sandbox's helper processes (the role of Firecracker's jailer,
//! as a module every spawn can go through): a per-sandbox unprivileged
//! uid/gid, no capabilities, `no_new_privs`, rlimits, a private umask and a
//! seccomp filter installed by the spawner before the helper's first
//! instruction.
//!
//! Today the vsock backend runs jailed (it maps all of guest RAM and parses
//! the rings a hostile guest writes; it needs no privilege at all once its
//! sockets are in a directory it owns). QEMU, virtiofsd and husk-vmm have
//! filters of their own (docs/security.md); moving them under the jail's
//! uid and into mount namespaces of their own is the next step.
//!
//! The uid comes from a configurable range (`jail_uid_base`,
//! `jail_uid_count`), one per sandbox, claimed by an exclusive flock on
//! `<claims>/<uid>` that the sandbox's owner holds (see [`JailId`]).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The jails' directories, machine-wide (the CLI and the shim share it):
/// `uids/` (root's: the claims) and one `<uid>/` per jailed sandbox, where
/// its backend makes its sockets. Outside every state root, since those are
/// root's alone (0700) and a jailed process could not reach into them.
pub const JAIL_ROOT: &str = "/run/husk-jail";

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("jail: no free uid in {base}..{end} (claims in {claims})")]
    NoFreeUid { base: u32, end: u64, claims: String },
    #[error("jail: the seccomp filter: {0}")]
    Seccomp(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A uid (and the gid of the same number) claimed for one sandbox: an
/// exclusive flock on `<claims>/<uid>`, held by the sandbox's owner (the
/// monitor or the shim) for the sandbox's life. A claim is free when its
/// lock can be taken, so an owner that crashed frees its uid by dying, and
/// two sandboxes can never hold one uid: no file contents are trusted.
#[derive(Debug)]
pub struct JailId {
    pub uid: u32,
    claim: PathBuf,
    _lock: crate::lockfile::HeldLock,
}

impl JailId {
    /// Claims a free id in `base..base+count` for the sandbox at
    /// `sandbox_dir`, starting at a point derived from its path so that
    /// concurrent sandboxes rarely probe the same ids.
    pub fn claim(
        claims: &Path,
        base: u32,
        count: u32,
        sandbox_dir: &Path,
    ) -> Result<JailId, JailError> {
        use std::io::Write;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(claims)
            .map_err(io("creating", claims))?;
        let count = count.max(1);
        let start = sandbox_dir
            .as_os_str()
            .as_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
            })
            % u64::from(count);
        for i in 0..u64::from(count) {
            let offset = (start + i) % u64::from(count);
            let Some(uid) = u32::try_from(u64::from(base) + offset).ok() else {
                continue;
            };
            let claim = claims.join(uid.to_string());
            let Some(mut lock) =
                crate::lockfile::lock_exclusive(&claim, false).map_err(io("claiming", &claim))?
            else {
                continue; // held by a live sandbox
            };
            // For people reading the directory: whose it is.
            let _ = lock.set_len(0);
            let _ = lock.write_all(sandbox_dir.as_os_str().as_bytes());
            return Ok(JailId {
                uid,
                claim,
                _lock: lock,
            });
        }
        Err(JailError::NoFreeUid {
            base,
            end: u64::from(base) + u64::from(count),
            claims: claims.display().to_string(),
        })
    }

    /// Gives the id back (removes the claim while still holding it).
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.claim);
    }

    /// Whether the claim of `uid` under `claims` is held by a live owner.
    pub fn is_held(claims: &Path, uid: u32) -> bool {
        let Ok(file) = std::fs::File::open(claims.join(uid.to_string())) else {
            return false;
        };
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock).is_err()
    }
}

/// What a helper is confined to.
pub struct Jail {
    uid: u32,
    gid: u32,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    filter: seccompiler::BpfProgram,
}

/// Syscalls a device backend never needs and an attacker wants: refused
/// with EPERM. A deny list, not an allow list: the filter is installed by
/// the spawner, so it must let the helper's own `execve` through, and it
/// must fit a backend built by someone else (an allow list would break on
/// a new version's syscalls; the backend's own allow list is the place for
/// that).
const DENIED: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_capset,
    libc::SYS_personality,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_execveat,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
];

impl Jail {
    /// A jail as uid = gid = `id`, with the backends' rlimits and the deny
    /// list compiled for this architecture.
    pub fn for_backend(id: u32) -> Result<Jail, JailError> {
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
            DENIED.iter().map(|nr| (*nr, Vec::new())).collect();
        let arch = std::env::consts::ARCH
            .try_into()
            .map_err(|e: seccompiler::BackendError| JailError::Seccomp(e.to_string()))?;
        let filter = seccompiler::SeccompFilter::new(
            rules,
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .map_err(|e| JailError::Seccomp(e.to_string()))?;
        let filter: seccompiler::BpfProgram = filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| JailError::Seccomp(e.to_string()))?;
        Ok(Jail {
            uid: id,
            gid: id,
            rlimits: vec![
                // One descriptor per vsock connection (the streams of every
                // process), the vhost-user fds and guest memory.
                (libc::RLIMIT_NOFILE, 4096),
                (libc::RLIMIT_NPROC, 512),
                (libc::RLIMIT_CORE, 0),
                (libc::RLIMIT_MEMLOCK, 64 << 10),
            ],
            filter,
        })
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Makes `dir` the jailed process's own (owner, mode 0700).
    pub fn own_dir(&self, dir: &Path) -> Result<(), JailError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        std::os::unix::fs::chown(dir, Some(self.uid), Some(self.gid)).map_err(io("giving", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("setting the mode of", dir))
    }

    /// Sets `cmd` up to start jailed: in the child, after fork and before
    /// exec, in this order: supplementary groups dropped, gid then uid
    /// changed (which clears every capability), umask 077, no_new_privs,
    /// rlimits, and the seccomp filter last (it forbids what came before).
    pub fn apply(self, cmd: &mut Command) {
        let Jail {
            uid,
            gid,
            rlimits,
            filter,
        } = self;
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (setgroups, setresgid, setresuid,
        // umask, prctl, setrlimit, and seccomp through seccompiler, which
        // makes the prctl/seccomp calls on a program built before fork).
        unsafe {
            cmd.pre_exec(move || {
                let fail = || Err(std::io::Error::last_os_error());
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    return fail();
                }
                libc::umask(0o077);
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return fail();
                }
                for (resource, limit) in &rlimits {
                    let rl = libc::rlimit {
                        rlim_cur: *limit,
                        rlim_max: *limit,
                    };
                    if libc::setrlimit(*resource, &rl) != 0 {
                        return fail();
                    }
                }
                seccompiler::apply_filter(&filter).map_err(|e| std::io::Error::other(e.to_string()))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-jail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn ids_are_claimed_once_and_freed_by_release_or_death() {
        let claims = scratch("claims");
        let sandbox = scratch("sandbox");
        // A range of two: a and b get both, a third finds none.
        let a = JailId::claim(&claims, 5000, 2, &sandbox).unwrap();
        let b = JailId::claim(&claims, 5000, 2, &sandbox).unwrap();
        assert_ne!(a.uid, b.uid);
        assert!((5000..5002).contains(&a.uid) && (5000..5002).contains(&b.uid));
        assert!(JailId::is_held(&claims, a.uid));
        assert!(matches!(
            JailId::claim(&claims, 5000, 2, &sandbox),
            Err(JailError::NoFreeUid { .. })
        ));
        // An owner that dies without releasing (dropping the lock is what
        // its death does) frees its uid.
        let b_uid = b.uid;
        drop(b);
        assert!(!JailId::is_held(&claims, b_uid));
        let c = JailId::claim(&claims, 5000, 2, &sandbox).unwrap();
        assert_eq!(c.uid, b_uid);
        a.release();
        c.release();
        assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&claims);
    }

    #[test]
    fn concurrent_claims_never_share_a_uid() {
        use std::collections::HashSet;
        use std::sync::Mutex;
        let claims = scratch("claims-race");
        let held = Mutex::new(HashSet::new());
        std::thread::scope(|s| {
            for i in 0..32 {
                let (claims, held) = (&claims, &held);
                s.spawn(move || {
                    for round in 0..5 {
                        // Half of them start probing at the same point.
                        let dir = PathBuf::from(format!("/sandbox/{}", (i + round) % 2));
                        let id = JailId::claim(claims, 7000, 40, &dir).unwrap();
                        assert!(held.lock().unwrap().insert(id.uid), "{} twice", id.uid);
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        held.lock().unwrap().remove(&id.uid);
                        id.release();
                    }
                });
            }
        });
        assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&claims);
    }

    #[test]
    fn a_jailed_child_is_unprivileged_and_filtered() {
        let jail = Jail::for_backend(4_000_123).unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "id -u; id -g; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; ulimit -n; umask",
        ]);
        jail.apply(&mut cmd);
        let out = cmd.output().expect("running the jailed shell");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(lines[0], "4000123");
        assert_eq!(lines[1], "4000123");
        assert!(
            lines.contains(&"CapEff:\t0000000000000000")
                || text.contains("CapEff:\t0000000000000000")
        );
        assert!(text.contains("NoNewPrivs:\t1"), "{text}");
        assert!(text.contains("Seccomp:\t2"), "{text}");
        assert!(lines.contains(&"4096"), "{text}");
        assert!(lines.contains(&"0077"), "{text}");
        // A denied call fails with EPERM: the shell cannot unshare.
        let jail = Jail::for_backend(4_000_124).unwrap();
        let mut cmd = Command::new("/usr/bin/unshare");
        cmd.args(["-U", "/bin/true"]);
        jail.apply(&mut cmd);
        let out = cmd.output().expect("running unshare");
        assert!(!out.status.success(), "unshare ran in the jail");
    }
}
