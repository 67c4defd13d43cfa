//! Jailing a sandbox's helper processes (the role of Firecracker's jailer,
//! as a module every spawn can go through): a per-sandbox unprivileged
//! uid/gid, no capabilities, `no_new_privs`, rlimits, a private umask and a
//! seccomp filter installed by the spawner before the helper's first
//! instruction.
//!
//! The VMM (QEMU or husk-vmm) and the vsock backend run jailed: both map all
//! of guest RAM and parse what a hostile guest writes, and neither needs any
//! privilege once its files are open. Each also gets namespaces and a root
//! of its own ([`JailRoot`]). virtiofsd stays root (it serves files of every
//! owner) under its own sandbox and a filter of ours
//! ([`no_set_id_bits_filters`]); see docs/security.md.
//!
//! A jailed helper may fork: when the sandbox ends, [`kill_uid`] ends every
//! process of its uid before the uid is given back, so nothing a
//! compromised helper left behind meets the next sandbox of that uid.
//!
//! The uid comes from a configurable range (`jail_uid_base`,
//! `jail_uid_count`), one per sandbox, claimed by an exclusive flock on
//! `<claims>/<uid>` that the sandbox's owner holds (see [`JailId`]).

use crate::event::PidFd;
use std::collections::BTreeMap;
use std::os::fd::AsFd;
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
        let start = crate::sandbox::fnv1a(sandbox_dir.as_os_str().as_bytes()) % u64::from(count);
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

    /// Takes over the claim of `uid` from the process that made it, by the
    /// claim file's open description it passed on (a flock belongs to the
    /// open file description, so it stays held while either holds it). The
    /// description must be the one holding the lock on the current claim
    /// file: anything else is refused.
    pub fn adopt(claims: &Path, uid: u32, file: std::fs::File) -> Result<JailId, JailError> {
        use std::os::unix::fs::MetadataExt;
        let claim = claims.join(uid.to_string());
        let refused = || JailError::Io {
            what: "taking over",
            path: claim.clone(),
            source: std::io::Error::other("the descriptor given is not this claim's held lock"),
        };
        let current = std::fs::metadata(&claim).map_err(io("taking over", &claim))?;
        let given = file.metadata().map_err(io("taking over", &claim))?;
        if (current.dev(), current.ino()) != (given.dev(), given.ino()) {
            return Err(refused());
        }
        // Locking again through the description that holds the lock
        // succeeds at once; any other description would be refused here
        // (non-blocking) while the true holder lives.
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| refused())?;
        Ok(JailId {
            uid,
            claim,
            _lock: lock,
        })
    }

    /// The open claim file holding the lock, to pass to the owner that
    /// takes the sandbox over (see `adopt`).
    pub fn lock_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self._lock.as_fd()
    }

    /// Gives the id back (removes the claim while still holding it).
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.claim);
    }
}

/// Makes `dir` the jailed uid's own (owner and group `uid`, mode 0700).
pub fn own_dir(dir: &Path, uid: u32) -> Result<(), JailError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).map_err(io("giving", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("setting the mode of", dir))
}

/// A seccomp filter for a file server that must stay root (virtiofsd needs
/// its capabilities to serve files of every owner): a hostile guest may not
/// make a set-user-ID or set-group-ID file on host storage, where a host
/// user could run it. Every call that sets a mode — chmod in all its forms,
/// and open, creat and mknod creating a file — fails with EPERM when the
/// mode has S_ISUID or S_ISGID. (Writes to an existing set-id file clear the
/// bits: the file server runs without CAP_FSETID, see `backends::virtiofs`.)
pub fn no_set_id_bits_filters() -> Result<Vec<seccompiler::BpfProgram>, JailError> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let seccomp = |e: seccompiler::BackendError| JailError::Seccomp(e.to_string());
    let set_id = |arg: u8| -> Result<Vec<SeccompRule>, JailError> {
        [libc::S_ISUID, libc::S_ISGID]
            .into_iter()
            .map(|bit| {
                let mode = SeccompCondition::new(
                    arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(u64::from(bit)),
                    u64::from(bit),
                )
                .map_err(seccomp)?;
                SeccompRule::new(vec![mode]).map_err(seccomp)
            })
            .collect()
    };
    // open/openat: only when creating (O_CREAT or O_TMPFILE's own bit);
    // without those the mode argument is not read and may hold anything.
    let creating = |flags: u8, mode: u8| -> Result<Vec<SeccompRule>, JailError> {
        let mut rules = Vec::new();
        for create in [libc::O_CREAT, libc::O_TMPFILE & !libc::O_DIRECTORY] {
            for bit in [libc::S_ISUID, libc::S_ISGID] {
                let conds = vec![
                    SeccompCondition::new(
                        flags,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::MaskedEq(create as u64),
                        create as u64,
                    )
                    .map_err(seccomp)?,
                    SeccompCondition::new(
                        mode,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::MaskedEq(u64::from(bit)),
                        u64::from(bit),
                    )
                    .map_err(seccomp)?,
                ];
                rules.push(SeccompRule::new(conds).map_err(seccomp)?);
            }
        }
        Ok(rules)
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [
        (libc::SYS_chmod, set_id(1)?),
        (libc::SYS_fchmod, set_id(1)?),
        (libc::SYS_fchmodat, set_id(2)?),
        (libc::SYS_fchmodat2, set_id(2)?),
        (libc::SYS_creat, set_id(1)?),
        (libc::SYS_mknod, set_id(1)?),
        (libc::SYS_mknodat, set_id(2)?),
        (libc::SYS_open, creating(1, 2)?),
        (libc::SYS_openat, creating(2, 3)?),
    ]
    .into_iter()
    .collect();
    // openat2 takes its mode in a struct seccomp cannot read: it reads as
    // not implemented, so callers fall back to openat (glibc has no wrapper
    // for it). A second program, since one program has one match action.
    let absent: BTreeMap<i64, Vec<SeccompRule>> =
        [(libc::SYS_openat2, Vec::new())].into_iter().collect();
    let build = refusing_with;
    Ok(vec![
        build(rules, libc::EPERM)?,
        build(absent, libc::ENOSYS)?,
    ])
}

/// A program for this architecture that answers the calls `rules` match
/// with `errno` and allows the rest.
fn refusing_with(
    rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>>,
    errno: i32,
) -> Result<seccompiler::BpfProgram, JailError> {
    let seccomp = |e: seccompiler::BackendError| JailError::Seccomp(e.to_string());
    let arch: seccompiler::TargetArch = std::env::consts::ARCH.try_into().map_err(seccomp)?;
    seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(errno as u32),
        arch,
    )
    .map_err(seccomp)?
    .try_into()
    .map_err(seccomp)
}

/// Installs `filters` in `cmd`'s child before exec, with no_new_privs (which
/// an unprivileged filter needs and a root process loses nothing by).
pub fn apply_filters(cmd: &mut Command, filters: Vec<seccompiler::BpfProgram>) {
    // SAFETY: prctl and seccomp (through seccompiler, on a program built
    // before fork) are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for filter in &filters {
                if seccompiler::apply_filter(filter).is_err() {
                    return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                }
            }
            Ok(())
        });
    }
}

/// Ends every process running as `uid`: what a jailed helper of a sandbox
/// may have forked (the helpers themselves die with their owner, their
/// children need not). A child of ours takes the uid and signals all it may
/// signal; then the processes of that uid are awaited (a killed process
/// stays listed, as a zombie, until its parent reaps it: zombies run
/// nothing). Called before a uid is claimed and before it is given back.
pub fn kill_uid(uid: u32) -> Result<(), JailError> {
    let err = |source| JailError::Io {
        what: "ending the processes of jail uid",
        path: PathBuf::from(uid.to_string()),
        source,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        signal_all_as(uid).map_err(err)?;
        let live = live_processes_of(uid);
        if live.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(err(std::io::Error::other(format!(
                "still running: {live:?}"
            ))));
        }
        // Wait for the exits of the processes found (a pidfd each; one that
        // is gone already cannot be opened and is not waited for), then
        // sweep again for any forked meanwhile. A pid reused by another
        // process in between only delays this to the deadline.
        let pidfds: Vec<PidFd> = live
            .iter()
            .filter_map(|pid| PidFd::open(*pid as u32).ok())
            .collect();
        let fds: Vec<_> = pidfds.iter().map(|p| p.as_fd()).collect();
        crate::event::wait_all(&fds, Some(deadline)).map_err(|e| err(std::io::Error::other(e)))?;
    }
}

/// SIGKILL to every process `uid` may signal, from a child that takes it.
fn signal_all_as(uid: u32) -> std::io::Result<()> {
    // SAFETY: fork in a multithreaded process: the child makes only
    // async-signal-safe system calls (setgroups, setresgid, setresuid,
    // kill) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above. kill(-1) reaches every process of this uid but
        // the caller (ESRCH when there is none).
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                libc::_exit(3);
            }
            libc::kill(-1, libc::SIGKILL);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for the child just forked.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "the signalling child ended with {status:#x}"
        )))
    }
}

/// Pids of the processes of `uid` that are not zombies.
fn live_processes_of(uid: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                return false;
            };
            let field = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(str::trim)
                    .unwrap_or("")
                    .to_string()
            };
            let real_uid = field("Uid:").split_whitespace().next().map(str::to_string);
            real_uid.as_deref() == Some(uid.to_string().as_str())
                && !field("State:").starts_with('Z')
        })
        .collect()
}

/// What a helper is confined to.
pub struct Jail {
    uid: u32,
    gid: u32,
    /// Supplementary groups kept (e.g. /dev/kvm's group for a VMM).
    groups: Vec<libc::gid_t>,
    /// Namespaces besides the mount namespace (network, IPC, UTS).
    namespaces: libc::c_int,
    /// The file system the process sees, if it gets a root of its own.
    root: Option<PreparedRoot>,
    /// Descriptors the process inherits (the VMM's taps); every other one
    /// is closed at exec.
    kept_fds: Vec<libc::c_int>,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    filters: Vec<seccompiler::BpfProgram>,
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
    libc::SYS_fsconfig,
    libc::SYS_fspick,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_pidfd_getfd,
    libc::SYS_process_madvise,
    libc::SYS_kcmp,
];

/// Namespaces a jailed helper may not make with `clone` (unshare and setns
/// are denied outright; clone3 reads as absent, so glibc uses clone).
const CLONE_NAMESPACES: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWTIME,
];

/// A program refusing every x32 system call (`nr | 0x40000000`): x32 shares
/// x86_64's audit architecture, so the rule tables, keyed by number, would
/// not see them.
fn no_x32_filter() -> seccompiler::BpfProgram {
    use seccompiler::sock_filter;
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JGE_K: u16 = 0x35;
    const BPF_RET_K: u16 = 0x06;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    vec![
        // seccomp_data.nr, at offset 0.
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: BPF_JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: RET_ERRNO | libc::EPERM as u32,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: RET_ALLOW,
        },
    ]
}

impl Jail {
    /// A jail as uid = gid = `id`, with the backends' rlimits and the deny
    /// list compiled for this architecture.
    pub fn for_backend(id: u32) -> Result<Jail, JailError> {
        use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
        let seccomp = |e: seccompiler::BackendError| JailError::Seccomp(e.to_string());
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            DENIED.iter().map(|nr| (*nr, Vec::new())).collect();
        let clone_rules = CLONE_NAMESPACES
            .iter()
            .map(|flag| {
                let cond = SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(*flag as u64),
                    *flag as u64,
                )
                .map_err(seccomp)?;
                SeccompRule::new(vec![cond]).map_err(seccomp)
            })
            .collect::<Result<Vec<_>, JailError>>()?;
        rules.insert(libc::SYS_clone, clone_rules);
        let build = refusing_with;
        let absent: BTreeMap<i64, Vec<SeccompRule>> =
            [(libc::SYS_clone3, Vec::new())].into_iter().collect();
        let filters = vec![
            no_x32_filter(),
            build(rules, libc::EPERM)?,
            build(absent, libc::ENOSYS)?,
        ];
        Ok(Jail {
            uid: id,
            gid: id,
            groups: Vec::new(),
            namespaces: 0,
            root: None,
            kept_fds: Vec::new(),
            rlimits: vec![
                // One descriptor per vsock connection (the streams of every
                // process), the vhost-user fds and guest memory.
                (libc::RLIMIT_NOFILE, 4096),
                (libc::RLIMIT_NPROC, 512),
                (libc::RLIMIT_CORE, 0),
                (libc::RLIMIT_MEMLOCK, 64 << 10),
            ],
            filters,
        })
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Gives the process a root of its own: `root`'s paths, built on an
    /// empty directory `dir` (which the caller made, and removes after the
    /// process ended; it stays empty on the host, the tmpfs is the
    /// process's alone).
    pub fn with_root(mut self, root: &JailRoot, dir: &Path) -> Result<Jail, JailError> {
        self.root = Some(root.prepare(dir)?);
        Ok(self)
    }

    /// Keeps supplementary `groups` (e.g. the group of /dev/kvm).
    pub fn with_groups(mut self, groups: Vec<u32>) -> Jail {
        self.groups = groups;
        self
    }

    /// Lets the process inherit `fds` (e.g. taps for the VMM, named by
    /// number on its command line). Each must stay open in the spawner
    /// until the process has started, and be above 2 (0-2 become the
    /// process's stdio).
    pub fn keep_fds(mut self, fds: &[std::os::fd::RawFd]) -> Jail {
        self.kept_fds.extend_from_slice(fds);
        self
    }

    /// New network, IPC and UTS namespaces: a process that talks to its
    /// peers only through Unix sockets on the file system and descriptors
    /// it was given reaches no network, no host IPC object, no hostname.
    pub fn isolated(mut self) -> Jail {
        self.namespaces = libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        self
    }

    /// Sets `cmd` up to start jailed: in the child, after fork and before
    /// exec, in this order: new namespaces, the root of its own (pivot_root),
    /// supplementary groups set, gid then uid changed (which clears every
    /// capability), umask 077, no_new_privs, rlimits, and the seccomp filter
    /// last (it forbids what came before).
    pub fn apply(self, cmd: &mut Command) {
        let Jail {
            uid,
            gid,
            groups,
            namespaces,
            root,
            kept_fds,
            rlimits,
            filters,
        } = self;
        // Nothing of the spawner's environment (the programs are named by
        // absolute path and need none).
        cmd.env_clear();
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (unshare, mount, mkdir, open, symlink,
        // pivot_root, setgroups, setresgid, setresuid, umask, prctl,
        // setrlimit, close_range, fcntl, and seccomp through seccompiler, which makes the
        // prctl/seccomp calls on a program built before fork), on memory
        // prepared before fork.
        unsafe {
            cmd.pre_exec(move || {
                let fail = || Err(std::io::Error::last_os_error());
                if namespaces != 0 && libc::unshare(namespaces) != 0 {
                    return fail();
                }
                if let Some(root) = &root {
                    root.enter()?;
                }
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
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
                // No descriptor the spawner leaked (one not close-on-exec)
                // crosses into the jail: a directory fd would lead out of
                // its root.
                if libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) != 0
                {
                    return fail();
                }
                // ...except those the process is meant to have.
                for fd in &kept_fds {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return fail();
                    }
                }
                for filter in &filters {
                    // On failure errno says why; nothing is allocated here.
                    if seccompiler::apply_filter(filter).is_err() {
                        return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                    }
                }
                Ok(())
            });
        }
    }
}

/// What a jailed process sees of the file system: a mount namespace of its
/// own whose root is a small read-only tmpfs holding only the paths listed
/// here, each bound at its host path (so the process's arguments need no
/// rewriting), with the host's tree detached after `pivot_root`. Firecracker's
/// jailer does the same with a chroot it populates by hand.
#[derive(Debug, Default)]
pub struct JailRoot {
    entries: Vec<RootEntry>,
}

#[derive(Debug, Clone)]
enum RootEntry {
    /// A bind of the host path at the same path, read-only or not.
    Bind { path: PathBuf, writable: bool },
    /// A symlink, as the host has it (merged-/usr links).
    Symlink { path: PathBuf, target: PathBuf },
    /// A character device node of the host's, made anew in the root and
    /// owned by the jailed uid (Firecracker's jailer does this for
    /// /dev/kvm, which is often root's alone on the host).
    Device { path: PathBuf, owner: u32 },
}

/// One step of building the root in the child, prepared before fork (the
/// child only makes syscalls on these C strings).
#[derive(Debug)]
enum RootStep {
    Mkdir(std::ffi::CString),
    /// Creates an empty file to bind a non-directory onto.
    Touch(std::ffi::CString),
    Bind {
        source: std::ffi::CString,
        target: std::ffi::CString,
        read_only: bool,
    },
    Symlink {
        target: std::ffi::CString,
        link: std::ffi::CString,
    },
    Mknod {
        path: std::ffi::CString,
        rdev: libc::dev_t,
        owner: u32,
    },
}

/// The prepared root: where it is built and the steps that build it.
#[derive(Debug)]
struct PreparedRoot {
    dir: std::ffi::CString,
    steps: Vec<RootStep>,
}

/// What every dynamically linked helper needs to start: the system's
/// programs and libraries (read-only), the loader's cache, and the harmless
/// character devices.
const SYSTEM_READ_ONLY: &[&str] = &["/usr", "/etc/ld.so.cache"];
const SYSTEM_DIRS_OR_LINKS: &[&str] = &["/lib", "/lib64", "/bin", "/sbin"];
const SYSTEM_DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

impl JailRoot {
    /// The system's libraries and harmless devices, nothing else yet.
    pub fn system() -> JailRoot {
        let mut root = JailRoot::default();
        for p in SYSTEM_READ_ONLY {
            if Path::new(p).exists() {
                root = root.read_only(p);
            }
        }
        for p in SYSTEM_DIRS_OR_LINKS {
            match std::fs::read_link(p) {
                Ok(target) => root.entries.push(RootEntry::Symlink {
                    path: PathBuf::from(p),
                    target,
                }),
                Err(_) if Path::new(p).is_dir() => root = root.read_only(p),
                Err(_) => {}
            }
        }
        for p in SYSTEM_DEVICES {
            if Path::new(p).exists() {
                root = root.writable(p);
            }
        }
        root
    }

    /// Binds `path` read-only at the same path.
    pub fn read_only(mut self, path: impl Into<PathBuf>) -> JailRoot {
        self.entries.push(RootEntry::Bind {
            path: path.into(),
            writable: false,
        });
        self
    }

    /// Binds `path` writable at the same path (a socket to connect to, a
    /// FIFO to write, a device node, a directory the process owns).
    pub fn writable(mut self, path: impl Into<PathBuf>) -> JailRoot {
        self.entries.push(RootEntry::Bind {
            path: path.into(),
            writable: true,
        });
        self
    }

    /// Makes the character device at `path` in the root, owned by `owner`.
    pub fn device(mut self, path: impl Into<PathBuf>, owner: u32) -> JailRoot {
        self.entries.push(RootEntry::Device {
            path: path.into(),
            owner,
        });
        self
    }

    /// The paths bound into the root, for logs and tests.
    pub fn bound_paths(&self) -> Vec<(&Path, bool)> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                RootEntry::Bind { path, writable } => Some((path.as_path(), *writable)),
                RootEntry::Device { path, .. } => Some((path.as_path(), true)),
                RootEntry::Symlink { .. } => None,
            })
            .collect()
    }

    /// Turns the entries into steps under `dir` (an empty directory that
    /// becomes the root). Every bound path must exist now, and be absolute
    /// without `..`: nothing is resolved in the child.
    fn prepare(&self, dir: &Path) -> Result<PreparedRoot, JailError> {
        use std::collections::BTreeSet;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Io {
                what: "preparing the root with",
                path: p.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            })
        };
        let inside = |p: &Path| -> Result<PathBuf, JailError> {
            let plain = p.is_absolute()
                && p.components().all(|c| {
                    matches!(
                        c,
                        std::path::Component::RootDir | std::path::Component::Normal(_)
                    )
                });
            if !plain {
                return Err(JailError::Io {
                    what: "binding into the root (not a plain absolute path)",
                    path: p.to_path_buf(),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
                });
            }
            Ok(dir.join(p.strip_prefix("/").unwrap_or(p)))
        };
        let mut made: BTreeSet<PathBuf> = BTreeSet::new();
        let mut steps = Vec::new();
        let mut parents = |p: &Path, steps: &mut Vec<RootStep>| -> Result<(), JailError> {
            let mut at = PathBuf::from("/");
            let comps: Vec<_> = p.components().skip(1).collect();
            for comp in comps.iter().take(comps.len().saturating_sub(1)) {
                at.push(comp);
                if made.insert(at.clone()) {
                    steps.push(RootStep::Mkdir(c(&inside(&at)?)?));
                }
            }
            Ok(())
        };
        // Directories bound so far, with whether they are writable: a path
        // below one is already there, with that directory's access.
        let mut bound_dirs: Vec<(PathBuf, bool)> = Vec::new();
        for entry in &self.entries {
            match entry {
                RootEntry::Bind { path, writable } => {
                    let target = c(&inside(path)?)?;
                    if bound_dirs
                        .iter()
                        .any(|(d, w)| path.starts_with(d) && (*w || !*writable))
                    {
                        continue;
                    }
                    let meta =
                        std::fs::metadata(path).map_err(io("binding into the root", path))?;
                    parents(path, &mut steps)?;
                    if meta.is_dir() {
                        bound_dirs.push((path.clone(), *writable));
                    }
                    steps.push(if meta.is_dir() {
                        RootStep::Mkdir(target.clone())
                    } else {
                        RootStep::Touch(target.clone())
                    });
                    steps.push(RootStep::Bind {
                        source: c(path)?,
                        target,
                        read_only: !writable,
                    });
                }
                RootEntry::Device { path, owner } => {
                    use std::os::unix::fs::{FileTypeExt, MetadataExt};
                    let target = c(&inside(path)?)?;
                    let meta = std::fs::metadata(path).map_err(io("making in the root", path))?;
                    if !meta.file_type().is_char_device() {
                        return Err(JailError::Io {
                            what: "making in the root (not a character device)",
                            path: path.clone(),
                            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
                        });
                    }
                    parents(path, &mut steps)?;
                    steps.push(RootStep::Mknod {
                        path: target,
                        rdev: meta.rdev(),
                        owner: *owner,
                    });
                }
                RootEntry::Symlink { path, target } => {
                    parents(path, &mut steps)?;
                    steps.push(RootStep::Symlink {
                        target: c(target)?,
                        link: c(&inside(path)?)?,
                    });
                }
            }
        }
        Ok(PreparedRoot {
            dir: c(dir)?,
            steps,
        })
    }
}

impl PreparedRoot {
    /// Runs in the child between fork and exec: a new mount namespace, the
    /// host's mounts made private to it, a tmpfs at the root directory with
    /// the steps applied, `pivot_root` into it, the old root detached and the
    /// new one made read-only.
    ///
    /// # Safety
    /// Only async-signal-safe calls on memory prepared before fork.
    unsafe fn enter(&self) -> std::io::Result<()> {
        // SAFETY: raw syscalls on C strings built before fork, in the child.
        unsafe {
            let fail = || Err(std::io::Error::last_os_error());
            let null = std::ptr::null::<libc::c_char>();
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || libc::mount(
                    c"tmpfs".as_ptr(),
                    self.dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    // Not nodev: a device made here (/dev/kvm) must work.
                    // The root is read-only before the exec, and the jailed
                    // process has no CAP_MKNOD to add one.
                    libc::MS_NOSUID | libc::MS_NOEXEC,
                    c"mode=0755,size=64k,nr_inodes=256".as_ptr().cast(),
                ) != 0
            {
                return fail();
            }
            for step in &self.steps {
                let ok = match step {
                    RootStep::Mkdir(p) => {
                        libc::mkdir(p.as_ptr(), 0o755) == 0
                            || *libc::__errno_location() == libc::EEXIST
                    }
                    RootStep::Touch(p) => {
                        let fd = libc::open(
                            p.as_ptr(),
                            libc::O_CREAT | libc::O_RDONLY | libc::O_CLOEXEC,
                            0o600,
                        );
                        fd >= 0 && libc::close(fd) == 0
                    }
                    RootStep::Mknod { path, rdev, owner } => {
                        libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, *rdev) == 0
                            && libc::lchown(path.as_ptr(), *owner, *owner) == 0
                    }
                    RootStep::Symlink { target, link } => {
                        libc::symlink(target.as_ptr(), link.as_ptr()) == 0
                    }
                    RootStep::Bind {
                        source,
                        target,
                        read_only,
                    } => {
                        libc::mount(
                            source.as_ptr(),
                            target.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ) == 0
                            && (!*read_only || {
                                // Read-only, nosuid, nodev through every
                                // submount too (a remount would change the
                                // top one only).
                                let mut attr: libc::mount_attr = std::mem::zeroed();
                                attr.attr_set = libc::MOUNT_ATTR_RDONLY
                                    | libc::MOUNT_ATTR_NOSUID
                                    | libc::MOUNT_ATTR_NODEV;
                                libc::syscall(
                                    libc::SYS_mount_setattr,
                                    libc::AT_FDCWD,
                                    target.as_ptr(),
                                    libc::AT_RECURSIVE as libc::c_uint,
                                    &attr as *const libc::mount_attr,
                                    std::mem::size_of::<libc::mount_attr>(),
                                ) == 0
                            })
                    }
                };
                if !ok {
                    return fail();
                }
            }
            // pivot_root(".", "."): the old root ends up stacked on the new one
            // and is detached at once, with no directory made for it.
            if libc::chdir(self.dir.as_ptr()) != 0
                || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
                || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
                || libc::chdir(c"/".as_ptr()) != 0
                || libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) != 0
            {
                return fail();
            }
            Ok(())
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

    /// Whether the claim of `uid` under `claims` is held by a live owner.
    fn is_held(claims: &Path, uid: u32) -> bool {
        let Ok(file) = std::fs::File::open(claims.join(uid.to_string())) else {
            return false;
        };
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock).is_err()
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
        assert!(is_held(&claims, a.uid));
        assert!(matches!(
            JailId::claim(&claims, 5000, 2, &sandbox),
            Err(JailError::NoFreeUid { .. })
        ));
        // An owner that dies without releasing (dropping the lock is what
        // its death does) frees its uid.
        let b_uid = b.uid;
        drop(b);
        assert!(!is_held(&claims, b_uid));
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

    #[test]
    fn a_jailed_root_holds_only_what_was_bound() {
        let base = scratch("root");
        let data = base.join("data");
        let root_dir = base.join("root");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&root_dir).unwrap();
        std::fs::write(data.join("ro"), "read me\n").unwrap();
        std::fs::write(data.join("rw"), "").unwrap();
        assert!(
            Path::new("/dev/kvm").exists(),
            "this test needs /dev/kvm (a character device to make in the root)"
        );
        let root = JailRoot::system()
            .read_only(data.join("ro"))
            .writable(data.join("rw"))
            .device("/dev/kvm", 4_000_125);
        let jail = Jail::for_backend(4_000_125)
            .unwrap()
            .isolated()
            .with_root(&root, &root_dir)
            .unwrap();
        // The writable file must be writable by the jail's uid.
        std::os::unix::fs::chown(data.join("rw"), Some(4_000_125), None).unwrap();
        let ro = data.join("ro");
        let rw = data.join("rw");
        let script = format!(
            "ls -a /; test -e /etc/passwd && echo passwd; test -e /run && echo run; \
             cat {ro}; echo >> {ro} 2>/dev/null && echo wrote-ro; \
             echo written > {rw} && echo wrote-rw; touch /new 2>/dev/null && echo made-file; \
             ip -o link 2>/dev/null | wc -l; cat /proc/self/status 2>/dev/null | head -1; \
             exec 3<>/dev/kvm && echo kvm-open",
            ro = ro.display(),
            rw = rw.display()
        );
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", &script]);
        jail.apply(&mut cmd);
        let out = cmd.output().expect("running the jailed shell");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        // Only what was bound, and the links of a merged /usr.
        for absent in [
            "passwd",
            "run",
            "wrote-ro",
            "made-file",
            "home",
            "root",
            "var",
        ] {
            assert!(!lines.contains(&absent), "{absent} in the jail: {text}");
        }
        for present in ["usr", "dev", "read me", "wrote-rw", "kvm-open"] {
            assert!(lines.contains(&present), "no {present} in the jail: {text}");
        }
        // No /proc, and a network namespace of its own (no `ip` output
        // either way: the count is that of an empty namespace or none).
        assert!(!text.contains("Name:"), "{text}");
        assert_eq!(std::fs::read_to_string(&rw).unwrap(), "written\n");
        assert_eq!(std::fs::read_to_string(&ro).unwrap(), "read me\n");
        // The root directory stays empty on the host: the tmpfs was the
        // child's alone.
        assert_eq!(std::fs::read_dir(&root_dir).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_root_refuses_relative_and_dotdot_paths() {
        let dir = scratch("root-bad");
        for bad in ["relative/file", "/usr/../etc"] {
            let root = JailRoot::default().read_only(bad);
            let err = root.prepare(&dir).unwrap_err().to_string();
            assert!(err.contains("not a plain absolute path"), "{err}");
        }
    }

    #[test]
    fn a_file_server_cannot_set_set_id_bits() {
        let dir = scratch("setid");
        std::fs::create_dir_all(&dir).unwrap();
        let script = r#"
import os, errno
os.chdir(os.environ["D"])
def tried(what, f):
    try:
        f()
        print(what, "ok")
    except OSError as e:
        print(what, errno.errorcode[e.errno])
open("plain", "w").close()
tried("chmod-755", lambda: os.chmod("plain", 0o755))
tried("chmod-suid", lambda: os.chmod("plain", 0o4755))
tried("chmod-sgid", lambda: os.chmod("plain", 0o2755))
fd = os.open("plain", os.O_RDONLY)
tried("fchmod-suid", lambda: os.fchmod(fd, 0o4755))
tried("create-suid", lambda: os.close(os.open("made", os.O_CREAT | os.O_WRONLY, 0o4755)))
tried("create-plain", lambda: os.close(os.open("made2", os.O_CREAT | os.O_WRONLY, 0o755)))
tried("mknod-suid", lambda: os.mknod("node", 0o104755))
tried("mkdir-sgid", lambda: os.mkdir("sgid-dir", 0o2775))
tried("open-existing", lambda: os.close(os.open("plain", os.O_RDONLY | 0o4000)))
"#;
        let mut cmd = Command::new("python3");
        cmd.args(["-c", script]).env("D", &dir);
        apply_filters(&mut cmd, no_set_id_bits_filters().unwrap());
        let out = cmd.output().expect("python3");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for expect in [
            "chmod-755 ok",
            "chmod-suid EPERM",
            "chmod-sgid EPERM",
            "fchmod-suid EPERM",
            "create-suid EPERM",
            "create-plain ok",
            "mknod-suid EPERM",
            "mkdir-sgid ok",
            "open-existing ok",
        ] {
            assert!(text.lines().any(|l| l == expect), "{expect}: {text}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("plain"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        assert!(!dir.join("made").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn kill_uid_ends_what_a_jailed_helper_left_behind() {
        // A jailed shell forks a sleeper that outlives it (as a compromised
        // helper could), in a session of its own.
        let uid = 4_000_126;
        let jail = Jail::for_backend(uid).unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!",
        ]);
        jail.apply(&mut cmd);
        let out = cmd.output().expect("jailed shell");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{text}");
        let left: i32 = text.trim().parse().expect("pid");
        // Forked before its pid was printed: it exists now.
        let sleeper = PidFd::open(left as u32).expect("the sleeper did not start");
        assert!(!sleeper.has_exited().unwrap(), "the sleeper did not start");
        kill_uid(uid).unwrap();
        assert!(
            sleeper
                .wait_timeout(std::time::Duration::from_secs(5))
                .unwrap(),
            "process {left} of uid {uid} survived"
        );
        // Nothing of that uid: a second sweep finds none at once.
        kill_uid(uid).unwrap();
    }

    #[test]
    fn a_jailed_helper_cannot_make_namespaces_with_clone_nor_use_x32() {
        let jail = Jail::for_backend(4_000_127).unwrap();
        let script = r#"
import ctypes, os, errno
libc = ctypes.CDLL(None, use_errno=True)
SYS_clone = 56
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17
r = libc.syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
if r == 0:
    os._exit(0)
print("clone-newuser", errno.errorcode.get(ctypes.get_errno(), r) if r < 0 else "ok")
if r > 0:
    os.waitpid(r, 0)
r = libc.syscall(0x40000000 | 39)  # x32 getpid
print("x32", errno.errorcode.get(ctypes.get_errno(), r) if r < 0 else "ok")
r = libc.syscall(435, 0, 0)  # clone3
print("clone3", errno.errorcode.get(ctypes.get_errno(), r) if r < 0 else "ok")
pid = os.fork()
if pid == 0:
    os._exit(7)
print("fork", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"#;
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.args(["-c", script]);
        jail.apply(&mut cmd);
        let out = cmd.output().expect("python3");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for want in [
            "clone-newuser EPERM",
            "x32 EPERM",
            "clone3 ENOSYS",
            "fork 7",
        ] {
            assert!(text.lines().any(|l| l == want), "{want}: {text}");
        }
    }
}
