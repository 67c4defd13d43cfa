//! What runs in the forked child between fork and exec: a [`LaunchPlan`]
//! applied with raw syscalls, then the exec.
//!
//! Everything was computed before the fork (by the planner, `husk_agent::plan`,
//! and [`ExecArgs`]), because between fork and exec in a multi-threaded
//! process only async-signal-safe calls are allowed: nothing here allocates
//! or plans. A failing step writes its description to the diagnostics pipe,
//! and [`run`] writes the errno to the errno pipe, so the error names what
//! failed; an exec that succeeds closes both (close-on-exec), which is how
//! the agent knows. The one point where the child waits for the agent (a
//! created container parked until `start`) is [`wait_for_start`], called
//! from [`apply_in_child`] only; the agent holds no lock meanwhile.

use crate::cgroup::devices::DeviceFilter;
use crate::hooks::GuestHooks;
use husk_agent::plan::{CapSets, LaunchPlan, SeccompProgram};
use std::ffi::CString;

/// A plan and what the launcher adds to it for one fork.
pub struct Launch {
    pub plan: LaunchPlan,
    /// hooks.createContainer and hooks.startContainer (containers only).
    pub hooks: Option<GuestHooks>,
    /// A container's child parks here between `create` and `start` (once
    /// its namespaces and rootfs are set up and the createContainer hooks
    /// have run); None for exec'd processes.
    pub park: Option<ParkFds>,
    /// linux.resources.devices, attached by the child once its /dev is
    /// made (as runc: after mknod and the terminal, before exec).
    pub device_filter: Option<DeviceFilter>,
}

/// Reports a failed step to the parent and returns its errno, which [`run`]
/// sends on the errno pipe.
fn fail(diag_fd: libc::c_int, what: &CString) -> std::io::Error {
    let err = std::io::Error::last_os_error();
    let bytes = what.as_bytes();
    // SAFETY: writing a valid buffer to a pipe fd owned by this child.
    unsafe { libc::write(diag_fd, bytes.as_ptr().cast(), bytes.len()) };
    err
}

/// Runs a syscall expression; on a negative result reports `$what` and
/// returns the errno from the enclosing function.
macro_rules! check {
    ($diag:expr, $what:expr, $call:expr) => {
        // SAFETY: a plain syscall on pointers to CStrings prepared before the
        // fork; they live as long as the plan.
        if unsafe { $call } < 0 {
            return Err(fail($diag, $what));
        }
    };
}

// After `check!`: the macro is in scope for the submodule.
mod rootfs;

/// Static step names, so failing steps need no allocation.
pub struct StepNames {
    pub cgroup: CString,
    pub setsid: CString,
    pub setns: CString,
    pub unshare: CString,
    pub make_private: CString,
    pub bind_root: CString,
    pub mkdir: CString,
    pub mknod: CString,
    pub pivot: CString,
    pub readonly_root: CString,
    pub hostname: CString,
    pub chdir: CString,
    pub user: CString,
    pub no_new_privs: CString,
    pub mask: CString,
    pub console: CString,
    pub loopback: CString,
    pub oom: CString,
    pub sysctl: CString,
    pub domainname: CString,
    pub rlimit: CString,
    pub caps: CString,
    pub seccomp: CString,
    pub personality: CString,
    pub ioprio: CString,
    pub scheduler: CString,
    pub propagation: CString,
    pub device: CString,
    pub time_offsets: CString,
    pub park: CString,
    pub deleted: CString,
    pub bind_device: CString,
    pub device_filter: CString,
    pub userns_root: CString,
    pub stdio: CString,
}

impl StepNames {
    pub fn new() -> Self {
        let c = |s: &str| CString::new(s).unwrap_or_default();
        StepNames {
            cgroup: c("joining the container cgroup"),
            setsid: c("setting up the terminal"),
            setns: c("joining a namespace (linux.namespaces path)"),
            unshare: c("creating namespaces (linux.namespaces)"),
            make_private: c("making the mount namespace private"),
            bind_root: c("bind-mounting the rootfs"),
            mkdir: c("creating a mount point"),
            mknod: c("creating /dev nodes"),
            pivot: c("pivot_root into the rootfs"),
            readonly_root: c("making the rootfs read-only (root.readonly)"),
            hostname: c("setting the hostname"),
            chdir: c("changing to process.cwd"),
            user: c("switching to process.user"),
            no_new_privs: c("setting noNewPrivileges"),
            mask: c("masking linux.maskedPaths / linux.readonlyPaths"),
            console: c("opening the terminal (process.terminal) in the container's /dev/ptmx"),
            loopback: c("bringing up lo in the new network namespace"),
            oom: c("writing process.oomScoreAdj"),
            sysctl: c("writing linux.sysctl"),
            domainname: c("setting the domainname"),
            rlimit: c("setting process.rlimits"),
            caps: c("applying process.capabilities"),
            seccomp: c("loading linux.seccomp"),
            personality: c("setting linux.personality"),
            ioprio: c("setting process.ioPriority"),
            scheduler: c("setting process.scheduler"),
            propagation: c("applying linux.rootfsPropagation"),
            device: c("creating linux.devices"),
            time_offsets: c("writing linux.timeOffsets"),
            park: c("reporting the created container"),
            deleted: c("deleted before start"),
            bind_device: c("bind-mounting /dev nodes (user namespace: no mknod)"),
            device_filter: c("attaching the linux.resources.devices filter"),
            userns_root: c("becoming root of the user namespace (uid and gid 0 must be mapped)"),
            stdio: c("setting up stdio"),
        }
    }
}

/// process.args and process.env as execvp(3) takes them, made before the
/// fork.
pub struct ExecArgs {
    program: CString,
    /// Owns what `argv` points into.
    _args: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    /// Owns what `envp` points into.
    _env: Vec<CString>,
    envp: Vec<*const libc::c_char>,
}

impl ExecArgs {
    /// Fails with what is wrong: no args, or a NUL byte in an arg or
    /// variable.
    pub fn new(args: &[String], env: &[(String, String)]) -> Result<Self, String> {
        let c = |what: &str, s: String| {
            CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
        };
        let program = c(
            "process.args[0]",
            args.first().ok_or("process.args is empty")?.clone(),
        )?;
        let args = args
            .iter()
            .map(|a| c("process.args", a.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let env = env
            .iter()
            .map(|(k, v)| c("process.env", format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        let nul_ended = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        Ok(ExecArgs {
            program,
            argv: nul_ended(&args),
            envp: nul_ended(&env),
            _args: args,
            _env: env,
        })
    }
}

/// The fds a forked child works with (all opened by the agent before the
/// fork, close-on-exec, and above 2 so that setting up stdio cannot
/// overwrite one).
pub struct ChildFds {
    /// Become the child's fds 0, 1 and 2.
    pub stdio: [libc::c_int; 3],
    /// Takes the description of a failed step.
    pub diag: libc::c_int,
    /// Takes the errno of a failed step or exec, as 4 native-endian bytes.
    pub errno: libc::c_int,
    /// The child's end of the terminal socket (see `open_console`), or -1.
    pub console: libc::c_int,
}

extern "C" {
    /// The environment execvp(3) searches PATH in and hands on.
    static mut environ: *const *const libc::c_char;
}

/// The forked child's life: stdio, the launch's plan, then exec; on any
/// failure the errno goes to the agent and the child exits.
///
/// # Safety
/// Only in a freshly forked child of the agent; never returns.
pub unsafe fn run(launch: &Launch, names: &StepNames, fds: &ChildFds, exec: &ExecArgs) -> ! {
    // SAFETY: forwarded from the caller's contract.
    let err = unsafe { setup_and_exec(launch, names, fds, exec) };
    let errno = err.raw_os_error().unwrap_or(libc::EIO).to_ne_bytes();
    // SAFETY: writing a local buffer to our pipe fd, then _exit(2), which
    // runs nothing of the agent's (no atexit handlers, no destructors).
    unsafe {
        libc::write(fds.errno, errno.as_ptr().cast(), errno.len());
        libc::_exit(127)
    }
}

/// Returns only on failure, with its errno.
///
/// # Safety
/// As [`run`].
unsafe fn setup_and_exec(
    launch: &Launch,
    names: &StepNames,
    fds: &ChildFds,
    exec: &ExecArgs,
) -> std::io::Error {
    // As std's Command does: the process starts with no signal blocked (the
    // agent blocks SIGCHLD for its reaper) and SIGPIPE at its default (the
    // agent ignores it).
    // SAFETY: sigset_t is plain data, initialised by sigemptyset; then
    // sigprocmask and signal with valid arguments.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    for (target, fd) in (0..).zip(fds.stdio) {
        // SAFETY: dup2 of an fd opened for this child onto 0..2; the
        // sources are above 2 (see `ChildFds`), so none is overwritten.
        if unsafe { libc::dup2(fd, target) } < 0 {
            return fail(fds.diag, &names.stdio);
        }
    }
    // SAFETY: forwarded from the caller's contract.
    if let Err(e) = unsafe { apply_in_child(launch, names, fds.diag, fds.console) } {
        return e;
    }
    // SAFETY: this single-threaded child points environ at the prepared,
    // NUL-ended array (as std's Command does) so that execvp searches the
    // process's PATH, then execs with NUL-ended argv prepared before the fork.
    unsafe {
        environ = exec.envp.as_ptr();
        libc::execvp(exec.program.as_ptr(), exec.argv.as_ptr());
    }
    std::io::Error::last_os_error()
}

/// Runs in the forked child: applies the launch's plan. Only raw syscalls.
///
/// # Safety
/// Must only be called between fork and exec (from [`run`]).
unsafe fn apply_in_child(
    launch: &Launch,
    names: &StepNames,
    diag: libc::c_int,
    console_sock: libc::c_int,
) -> std::io::Result<()> {
    let plan = &launch.plan;
    // The child's clock on its steps, reported when it parks.
    let mut stamps: ChildStamps = [0; CHILD_STEPS];
    stamps[0] = now_ns();
    if let Some(procs) = &plan.cgroup_procs {
        // SAFETY: open of a CString path prepared before the fork.
        let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(fail(diag, &names.cgroup));
        }
        check!(
            diag,
            &names.cgroup,
            libc::write(fd, b"0".as_ptr().cast(), 1)
        );
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
    }
    if let Some(v) = &plan.oom_score_adj {
        // SAFETY: open of a static path.
        let fd = unsafe {
            libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(fail(diag, &names.oom));
        }
        check!(
            diag,
            &names.oom,
            libc::write(fd, v.as_ptr().cast(), v.as_bytes().len()) as libc::c_int
        );
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
    }
    // Before any namespace is joined: raising a hard limit, a real-time
    // I/O class or scheduler needs capabilities in the guest's initial user
    // namespace, which a process in a new user namespace lacks.
    for r in &plan.rlimits {
        let lim = libc::rlimit {
            rlim_cur: r.soft,
            rlim_max: r.hard,
        };
        check!(
            diag,
            &names.rlimit,
            libc::setrlimit(r.resource as libc::__rlimit_resource_t, &lim)
        );
    }
    if let Some(prio) = plan.ioprio {
        // IOPRIO_WHO_PROCESS = 1, who 0 = this process.
        check!(
            diag,
            &names.ioprio,
            libc::syscall(libc::SYS_ioprio_set, 1, 0, prio) as libc::c_int
        );
    }
    if let Some((policy, prio)) = plan.scheduler {
        let param = libc::sched_param {
            sched_priority: prio,
        };
        check!(
            diag,
            &names.scheduler,
            libc::sched_setscheduler(0, policy, &param)
        );
    }
    if let Some(r) = &plan.rootfs {
        for d in &r.early_mkdirs {
            // SAFETY: mkdir of a prepared path; EEXIST is fine.
            if unsafe { libc::mkdir(d.as_ptr(), 0o755) } < 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
            {
                return Err(fail(diag, &names.mkdir));
            }
        }
        for f in &r.early_files {
            // SAFETY: an empty regular file as a mount point; EEXIST is fine.
            if unsafe { libc::mknod(f.as_ptr(), libc::S_IFREG | 0o644, 0) } < 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
            {
                return Err(fail(diag, &names.mkdir));
            }
        }
    }
    // Every path is opened before the first setns: after joining a user
    // or mount namespace the others' paths may no longer be reachable.
    let mut fds: [libc::c_int; 8] = [-1; 8];
    if plan.join.len() > fds.len() {
        // SAFETY: setting errno for the report below.
        unsafe { *libc::__errno_location() = libc::E2BIG };
        return Err(fail(diag, &names.setns));
    }
    for ((path, _), fd) in plan.join.iter().zip(fds.iter_mut()) {
        // SAFETY: open of a prepared CString path.
        *fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if *fd < 0 {
            return Err(fail(diag, &names.setns));
        }
    }
    for ((_, flag), fd) in plan.join.iter().zip(fds) {
        check!(diag, &names.setns, libc::setns(fd, *flag));
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
    }
    if plan.join.iter().any(|(_, f)| *f == libc::CLONE_NEWUSER) {
        // The agent's root is not mapped in the container's user namespace:
        // files made on file systems mounted there need a mapped owner, so
        // the set-up runs as the namespace's root (as runc does); the
        // capabilities there stay.
        check!(diag, &names.userns_root, libc::setresgid(0, 0, 0));
        check!(diag, &names.userns_root, libc::setresuid(0, 0, 0));
    }
    stamps[1] = now_ns();
    if plan.unshare_flags != 0 {
        check!(diag, &names.unshare, libc::unshare(plan.unshare_flags));
    }
    stamps[2] = now_ns();
    if let Some(offsets) = &plan.time_offsets {
        // SAFETY: open of a static path.
        let fd = unsafe {
            libc::open(
                c"/proc/self/timens_offsets".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(fail(diag, &names.time_offsets));
        }
        check!(
            diag,
            &names.time_offsets,
            libc::write(fd, offsets.as_ptr().cast(), offsets.as_bytes().len()) as libc::c_int
        );
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
    }
    if plan.unshare_flags & libc::CLONE_NEWTIME != 0 {
        // unshare put only this child's future children in the new time
        // namespace (and this guest kernel does not move a process into it
        // at exec): enter it now. setns into a time namespace needs a
        // single-threaded caller, which the forked child is.
        // SAFETY: open of a static path.
        let fd = unsafe {
            libc::open(
                c"/proc/self/ns/time_for_children".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(fail(diag, &names.unshare));
        }
        check!(diag, &names.unshare, libc::setns(fd, libc::CLONE_NEWTIME));
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
    }
    if plan.unshare_flags & libc::CLONE_NEWNET != 0 {
        // lo up in the fresh namespace, as runc does: containers of a pod
        // talk over it. No allocation or lock in it: safe after fork.
        if let Err(e) = husk_agent::network::loopback_up_here() {
            let _ = fail(diag, &names.loopback);
            return Err(e);
        }
    }
    for (path, value) in &plan.sysctls {
        // SAFETY: open of a prepared path; the agent's /proc shows the
        // sysctls of this child's (new) namespaces.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(fail(diag, &names.sysctl));
        }
        check!(
            diag,
            &names.sysctl,
            libc::write(fd, value.as_ptr().cast(), value.as_bytes().len()) as libc::c_int
        );
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
    }
    if let Some(rootfs) = &plan.rootfs {
        // SAFETY: forwarded from the caller's contract.
        unsafe { rootfs::setup_rootfs(rootfs, names, diag)? };
    }
    stamps[3] = now_ns();
    if let Some(d) = &plan.domainname {
        check!(
            diag,
            &names.domainname,
            libc::setdomainname(d.as_ptr(), d.as_bytes().len())
        );
    }
    if let Some(p) = plan.personality {
        check!(diag, &names.personality, libc::personality(p));
    }
    if let Some(h) = &plan.hostname {
        check!(
            diag,
            &names.hostname,
            libc::sethostname(h.as_ptr(), h.as_bytes().len())
        );
    }
    if let Some(hooks) = &launch.hooks {
        // SAFETY: forwarded from the caller's contract; the namespaces,
        // rootfs and hostname are in place.
        unsafe { crate::hooks::run_create(hooks, diag)? };
    }
    if let Some(park) = &launch.park {
        stamps[4] = now_ns();
        // SAFETY: forwarded from the caller's contract.
        unsafe { wait_for_start(park, &stamps, names, diag)? };
    }
    if let Some(hooks) = &launch.hooks {
        // SAFETY: forwarded from the caller's contract.
        unsafe { crate::hooks::run_start(hooks, diag)? };
    }
    if plan.terminal {
        // SAFETY: forwarded from the caller's contract.
        unsafe { open_console(console_sock, names, diag)? };
    }
    if let Some(filter) = &launch.device_filter {
        check!(
            diag,
            &names.device_filter,
            crate::cgroup::devices::attach_raw(filter.attach_attr())
        );
    }
    check!(diag, &names.chdir, libc::chdir(plan.cwd.as_ptr()));
    if let Some(mask) = plan.umask {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(mask as libc::mode_t) };
    }
    if let Some(caps) = &plan.caps {
        for cap in 0..64u64 {
            if caps.bounding & (1 << cap) == 0 {
                // SAFETY: prctl with integer arguments.
                if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
                    // EINVAL: past the kernel's last capability.
                    if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                        break;
                    }
                    return Err(fail(diag, &names.caps));
                }
            }
        }
        check!(
            diag,
            &names.caps,
            libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0)
        );
    }
    // Without noNewPrivileges the filter needs CAP_SYS_ADMIN, so it goes in
    // before the user switch (as runc does); with it, right before exec.
    if !plan.no_new_privileges {
        if let Some(s) = &plan.seccomp {
            // SAFETY: forwarded from the caller's contract.
            unsafe { load_seccomp(s, names, diag)? };
        }
    }
    check!(
        diag,
        &names.user,
        libc::setgroups(plan.additional_gids.len(), plan.additional_gids.as_ptr())
    );
    check!(diag, &names.user, libc::setgid(plan.gid));
    check!(diag, &names.user, libc::setuid(plan.uid));
    if let Some(caps) = &plan.caps {
        // SAFETY: forwarded from the caller's contract.
        unsafe { set_caps(caps, names, diag)? };
    }
    if plan.no_new_privileges {
        check!(
            diag,
            &names.no_new_privs,
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        );
        if let Some(s) = &plan.seccomp {
            // SAFETY: forwarded from the caller's contract.
            unsafe { load_seccomp(s, names, diag)? };
        }
    }
    Ok(())
}

/// The pipes of a parked child (see `LaunchPlan::park`).
#[derive(Clone, Copy)]
pub struct ParkFds {
    /// The child writes one byte here once it is parked.
    pub parked_w: libc::c_int,
    /// The child reads here: `START` goes on, anything else (or EOF) ends it.
    pub go_r: libc::c_int,
}

/// The byte `start` sends a parked child; `delete` sends another.
pub const START: u8 = b'g';

/// How many of its steps a parking child times (see [`CHILD_STEP_NAMES`]).
pub const CHILD_STEPS: usize = 5;
/// CLOCK_MONOTONIC at the end of each step: the child's start, joined
/// namespaces, new namespaces, rootfs (mounts, pivot_root), createContainer
/// hooks and the rest up to parking.
pub type ChildStamps = [u64; CHILD_STEPS];
/// What each step of [`ChildStamps`] did, from the previous stamp.
pub const CHILD_STEP_NAMES: [&str; CHILD_STEPS] = [
    "fork to child",
    "cgroup, limits, join namespaces",
    "new namespaces",
    "rootfs: mounts, pivot_root",
    "sysctl, hostname, hooks",
];
/// What a parking child writes: `b'p'`, then its stamps (native endian).
pub const PARKED_MESSAGE_LEN: usize = 1 + 8 * CHILD_STEPS;

/// CLOCK_MONOTONIC in ns: async-signal-safe (vDSO or a plain syscall).
pub fn now_ns() -> u64 {
    // SAFETY: timespec is plain data, filled by clock_gettime.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Tells the agent the container is created, then waits for `start`.
///
/// # Safety
/// Only between fork and exec.
unsafe fn wait_for_start(
    park: &ParkFds,
    stamps: &ChildStamps,
    names: &StepNames,
    diag: libc::c_int,
) -> std::io::Result<()> {
    // One write, shorter than PIPE_BUF: the agent reads it whole.
    let mut message = [0u8; PARKED_MESSAGE_LEN];
    message[0] = b'p';
    for (chunk, stamp) in message[1..].chunks_exact_mut(8).zip(stamps) {
        chunk.copy_from_slice(&stamp.to_ne_bytes());
    }
    check!(
        diag,
        &names.park,
        libc::write(park.parked_w, message.as_ptr().cast(), message.len()) as libc::c_int
    );
    let mut byte = 0u8;
    loop {
        // SAFETY: a one-byte read into a local.
        let n = unsafe { libc::read(park.go_r, (&mut byte as *mut u8).cast(), 1) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if n == 1 && byte == START {
            return Ok(());
        }
        // Deleted before start: end without exec.
        let what = names.deleted.as_bytes();
        // SAFETY: writing a valid buffer to the diagnostics pipe.
        unsafe { libc::write(diag, what.as_ptr().cast(), what.len()) };
        return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets effective/permitted/inheritable with capset(2), then raises the
/// ambient set.
///
/// # Safety
/// Only between fork and exec.
unsafe fn set_caps(c: &CapSets, names: &StepNames, diag: libc::c_int) -> std::io::Result<()> {
    let header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    // Effective must be a subset of permitted (capset fails otherwise):
    // never grant more than permitted lists.
    let effective = c.effective & c.permitted;
    let data = [
        CapData {
            effective: effective as u32,
            permitted: c.permitted as u32,
            inheritable: c.inheritable as u32,
        },
        CapData {
            effective: (effective >> 32) as u32,
            permitted: (c.permitted >> 32) as u32,
            inheritable: (c.inheritable >> 32) as u32,
        },
    ];
    check!(
        diag,
        &names.caps,
        libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int
    );
    for cap in 0..64u64 {
        if c.ambient & (1 << cap) != 0 {
            // Best effort, as runc: an ambient capability needs to be in
            // both permitted and inheritable, and is skipped otherwise.
            // SAFETY: prctl with integer arguments.
            unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap,
                    0,
                    0,
                )
            };
        }
    }
    Ok(())
}

/// # Safety
/// Only between fork and exec.
unsafe fn load_seccomp(
    s: &SeccompProgram,
    names: &StepNames,
    diag: libc::c_int,
) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: s.filter.len() as libc::c_ushort,
        filter: s.filter.as_ptr() as *mut libc::sock_filter,
    };
    // SECCOMP_SET_MODE_FILTER = 1.
    check!(
        diag,
        &names.seccomp,
        libc::syscall(libc::SYS_seccomp, 1, s.flags, &prog) as libc::c_int
    );
    Ok(())
}

/// Opens the process's terminal in the container's own devpts (so ttyname
/// and /dev/pts agree inside the container), makes it the controlling
/// terminal and stdio, and sends the master to the agent over `sock`.
///
/// # Safety
/// Only between fork and exec, after the container's mounts are in place.
unsafe fn open_console(
    sock: libc::c_int,
    names: &StepNames,
    diag: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: opening the container's ptmx; a plain syscall.
    let master = unsafe {
        libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if master < 0 {
        return Err(fail(diag, &names.console));
    }
    let mut unlock: libc::c_int = 0;
    check!(
        diag,
        &names.console,
        libc::ioctl(master, libc::TIOCSPTLCK, &mut unlock)
    );
    // SAFETY: TIOCGPTPEER returns a new fd for the slave, or -1.
    let slave = unsafe { libc::ioctl(master, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY) };
    if slave < 0 {
        return Err(fail(diag, &names.console));
    }
    check!(diag, &names.setsid, libc::setsid());
    check!(diag, &names.setsid, libc::ioctl(slave, libc::TIOCSCTTY, 0));
    for fd in 0..3 {
        check!(diag, &names.console, libc::dup2(slave, fd));
    }
    // One byte of data carries the SCM_RIGHTS message with the master.
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen =
        unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // SAFETY: `control` is large and aligned enough for one cmsghdr and an
    // int; the header pointer comes from CMSG_FIRSTHDR of that buffer.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), master);
    }
    check!(
        diag,
        &names.console,
        libc::sendmsg(sock, &msg, 0) as libc::c_int
    );
    // SAFETY: closing fds this child no longer needs.
    unsafe {
        libc::close(master);
        if slave > 2 {
            libc::close(slave);
        }
    }
    Ok(())
}
