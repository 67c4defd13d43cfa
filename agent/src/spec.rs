//! From an OCI runtime spec to a launch plan, and the plan applied in the
//! forked child.
//!
//! Everything the child needs is computed before the fork (paths as CStrings,
//! mount flags, ids), because between fork and exec in a multi-threaded
//! process only async-signal-safe calls are allowed: the child code below
//! makes raw syscalls and never allocates. A failing step writes its
//! description and errno to a pipe so the error names what failed.

use crate::init::SHARED_DIR;
use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};
use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Component, Path, PathBuf};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("config.json: {0}")]
    Invalid(String),
    #[error("config.json: process.args[0] {0:?}: executable file not found in $PATH")]
    ExecutableNotFound(String),
    #[error("config.json: root.path: rootfs {0} does not exist in the guest share")]
    MissingRootfs(PathBuf),
    #[error("config.json: linux.namespaces: {0}")]
    Namespace(String),
    #[error("config.json: mounts[{index}] ({destination}): {reason}")]
    Mount {
        index: usize,
        destination: String,
        reason: String,
    },
}

fn cstr(s: impl AsRef<[u8]>) -> Result<CString, SpecError> {
    CString::new(s.as_ref().to_vec())
        .map_err(|_| SpecError::Invalid("a string contains a NUL byte".into()))
}

fn cpath(p: &Path) -> Result<CString, SpecError> {
    use std::os::unix::ffi::OsStrExt;
    cstr(p.as_os_str().as_bytes())
}

/// One mount(2) call, with the directories to create first.
pub struct MountStep {
    pub what: CString,
    pub source: Option<CString>,
    pub target: CString,
    pub fstype: Option<CString>,
    pub flags: libc::c_ulong,
    pub data: Option<CString>,
    /// Directories (outermost first) created before mounting.
    pub mkdirs: Vec<CString>,
    /// For binds: a file, not a directory, is the mount point.
    pub target_is_file: bool,
    /// Read-only and similar flags on a bind need a second, remount call.
    pub remount_flags: Option<libc::c_ulong>,
    /// Propagation (MS_PRIVATE, MS_SLAVE, ...) applied after mounting.
    pub propagation: Option<libc::c_ulong>,
}

pub struct DeviceNode {
    pub path: CString,
    pub mode: libc::mode_t,
    pub dev: libc::dev_t,
}

/// Everything the forked child does before exec, precomputed.
pub struct LaunchPlan {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub terminal: bool,
    pub cwd: CString,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<libc::gid_t>,
    pub umask: Option<u32>,
    pub no_new_privileges: bool,
    pub hostname: Option<CString>,
    /// Namespaces to create (CLONE_NEW* flags).
    pub unshare_flags: libc::c_int,
    /// Namespaces to join: (path, CLONE_NEW* type).
    pub join: Vec<(CString, libc::c_int)>,
    /// Root file system set-up; None for exec into an existing container.
    pub rootfs: Option<RootfsPlan>,
    /// `cgroup.procs` of the container's cgroup.
    pub cgroup_procs: Option<CString>,
}

pub struct RootfsPlan {
    pub root: CString,
    pub mounts: Vec<MountStep>,
    pub devices: Vec<DeviceNode>,
    pub symlinks: Vec<(CString, CString)>,
    pub masked: Vec<CString>,
    pub readonly: Vec<CString>,
    pub readonly_root: bool,
    pub no_pivot: bool,
}

fn namespace_flag(t: LinuxNamespaceType) -> libc::c_int {
    match t {
        LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
        LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
        LinuxNamespaceType::Network => libc::CLONE_NEWNET,
        LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
        LinuxNamespaceType::User => libc::CLONE_NEWUSER,
        LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
        LinuxNamespaceType::Time => libc::CLONE_NEWTIME,
    }
}

/// Joins `rel` below `root` without letting `..` climb out.
pub fn join_inside(root: &Path, rel: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                if out != root {
                    out.pop();
                }
            }
            _ => {}
        }
    }
    out
}

/// Parses mount options into (flags, propagation, data).
fn mount_options(options: &[String]) -> (libc::c_ulong, Option<libc::c_ulong>, Vec<String>, bool) {
    let mut flags: libc::c_ulong = 0;
    let mut propagation = None;
    let mut data = Vec::new();
    let mut bind = false;
    for o in options {
        match o.as_str() {
            "ro" => flags |= libc::MS_RDONLY,
            "rw" => flags &= !libc::MS_RDONLY,
            "nosuid" => flags |= libc::MS_NOSUID,
            "suid" => flags &= !libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "dev" => flags &= !libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "exec" => flags &= !libc::MS_NOEXEC,
            "sync" => flags |= libc::MS_SYNCHRONOUS,
            "async" => flags &= !libc::MS_SYNCHRONOUS,
            "noatime" => flags |= libc::MS_NOATIME,
            "nodiratime" => flags |= libc::MS_NODIRATIME,
            "relatime" => flags |= libc::MS_RELATIME,
            "strictatime" => flags |= libc::MS_STRICTATIME,
            "atime" | "norelatime" | "diratime" => {}
            "bind" => bind = true,
            "rbind" => {
                bind = true;
                flags |= libc::MS_REC;
            }
            "private" => propagation = Some(libc::MS_PRIVATE),
            "rprivate" => propagation = Some(libc::MS_PRIVATE | libc::MS_REC),
            "shared" => propagation = Some(libc::MS_SHARED),
            "rshared" => propagation = Some(libc::MS_SHARED | libc::MS_REC),
            "slave" => propagation = Some(libc::MS_SLAVE),
            "rslave" => propagation = Some(libc::MS_SLAVE | libc::MS_REC),
            "unbindable" => propagation = Some(libc::MS_UNBINDABLE),
            "runbindable" => propagation = Some(libc::MS_UNBINDABLE | libc::MS_REC),
            other => data.push(other.to_string()),
        }
    }
    (flags, propagation, data, bind)
}

/// Directories from just below `root` down to `path` itself.
fn dirs_to_create(root: &Path, path: &Path) -> Result<Vec<CString>, SpecError> {
    let mut dirs = Vec::new();
    let mut p = path.to_path_buf();
    while p != root && p.starts_with(root) {
        dirs.push(cpath(&p)?);
        if !p.pop() {
            break;
        }
    }
    dirs.reverse();
    Ok(dirs)
}

fn mount_step(
    index: usize,
    m: &Mount,
    root: &Path,
    shared_mounts: &HashMap<String, String>,
) -> Result<MountStep, SpecError> {
    let destination = m.destination();
    let err = |reason: String| SpecError::Mount {
        index,
        destination: destination.display().to_string(),
        reason,
    };
    if !destination.is_absolute() {
        return Err(err("destination must be an absolute path".into()));
    }
    let target = join_inside(root, destination);
    let (flags, propagation, data, bind_opt) = mount_options(m.options().as_deref().unwrap_or(&[]));
    let mut fstype = m.typ().clone().unwrap_or_default();
    // The guest has only cgroup v2: a v1 "cgroup" mount means the container's
    // view of cgroups, which is cgroup2 (scoped by its cgroup namespace).
    if fstype == "cgroup" {
        fstype = "cgroup2".into();
    }
    let bind = bind_opt || fstype == "bind";
    let mut source = m.source().as_ref().map(|s| s.to_path_buf());
    let mut target_is_file = false;
    if bind {
        let dest_key = destination.display().to_string();
        let src = if let Some(rel) = shared_mounts.get(&dest_key) {
            join_inside(Path::new(SHARED_DIR), Path::new(rel))
        } else {
            source
                .clone()
                .ok_or_else(|| err("bind mount without a source".into()))?
        };
        let meta =
            std::fs::metadata(&src).map_err(|e| err(format!("source {}: {e}", src.display())))?;
        target_is_file = !meta.is_dir();
        source = Some(src);
    }
    let mut mkdirs = dirs_to_create(root, &target)?;
    if target_is_file {
        mkdirs.pop();
    }
    let data = if data.is_empty() {
        None
    } else {
        Some(cstr(data.join(","))?)
    };
    let (flags, remount_flags) = if bind {
        let keep = flags & !(libc::MS_REC);
        let remount = if keep != 0 {
            Some(keep | libc::MS_BIND | libc::MS_REMOUNT)
        } else {
            None
        };
        (libc::MS_BIND | (flags & libc::MS_REC), remount)
    } else {
        (flags, None)
    };
    Ok(MountStep {
        what: cstr(format!(
            "mounting {} on {}",
            if bind { "bind" } else { fstype.as_str() },
            destination.display()
        ))?,
        source: match &source {
            Some(s) => Some(cpath(s)?),
            None => Some(cstr(&fstype)?),
        },
        target: cpath(&target)?,
        fstype: if bind { None } else { Some(cstr(&fstype)?) },
        flags,
        data,
        mkdirs,
        target_is_file,
        remount_flags,
        propagation,
    })
}

fn makedev(major: u64, minor: u64) -> libc::dev_t {
    libc::makedev(major as u32, minor as u32)
}

/// Default devices every container gets when its /dev is a fresh tmpfs.
fn default_devices(root: &Path) -> Result<(Vec<DeviceNode>, Vec<(CString, CString)>), SpecError> {
    let nodes = [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ];
    let mut devices = Vec::new();
    for (name, major, minor) in nodes {
        devices.push(DeviceNode {
            path: cpath(&root.join("dev").join(name))?,
            mode: libc::S_IFCHR | 0o666,
            dev: makedev(major, minor),
        });
    }
    let links = [
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
        ("pts/ptmx", "ptmx"),
    ];
    let mut symlinks = Vec::new();
    for (target, name) in links {
        symlinks.push((cstr(target)?, cpath(&root.join("dev").join(name))?));
    }
    Ok((devices, symlinks))
}

/// Finds `program` the way execvp will inside the container: directly if it
/// has a slash, else along PATH, resolving symlinks inside `root`.
pub fn find_executable(root: &Path, program: &str, path_var: &str) -> bool {
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![PathBuf::from(program)]
    } else {
        path_var
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(program))
            .collect()
    };
    candidates.iter().any(|c| is_executable_inside(root, c))
}

fn is_executable_inside(root: &Path, path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mut current = path.to_path_buf();
    for _ in 0..40 {
        let host = join_inside(root, &current);
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let Ok(target) = std::fs::read_link(&host) else {
                    return false;
                };
                current = if target.is_absolute() {
                    target
                } else {
                    current.parent().unwrap_or(Path::new("/")).join(target)
                };
            }
            Ok(meta) => return meta.is_file() && meta.permissions().mode() & 0o111 != 0,
            Err(_) => return false,
        }
    }
    false
}

fn process_plan(
    process: &oci_spec::runtime::Process,
) -> Result<(Vec<String>, Vec<(String, String)>), SpecError> {
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(SpecError::Invalid("process.args must not be empty".into()));
    }
    let env = process
        .env()
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.clone(), String::new()),
        })
        .collect();
    Ok((args, env))
}

fn path_of(env: &[(String, String)]) -> String {
    env.iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| DEFAULT_PATH.to_string())
}

fn user_plan(process: &oci_spec::runtime::Process) -> (u32, u32, Vec<libc::gid_t>, Option<u32>) {
    let user = process.user();
    (
        user.uid(),
        user.gid(),
        user.additional_gids().clone().unwrap_or_default(),
        user.umask(),
    )
}

/// Plans a container's init process from its spec.
pub fn plan_container(
    spec: &Spec,
    root: &Path,
    shared_mounts: &HashMap<String, String>,
    cgroup_procs: &Path,
    no_pivot: bool,
) -> Result<LaunchPlan, SpecError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::Invalid("process is missing".into()))?;
    let (args, env) = process_plan(process)?;
    if !root.is_dir() {
        return Err(SpecError::MissingRootfs(root.to_path_buf()));
    }
    if !find_executable(root, &args[0], &path_of(&env)) {
        return Err(SpecError::ExecutableNotFound(args[0].clone()));
    }
    let mut unshare_flags = libc::CLONE_NEWNS;
    let mut join = Vec::new();
    if let Some(linux) = spec.linux() {
        for ns in linux.namespaces().as_deref().unwrap_or(&[]) {
            let flag = namespace_flag(ns.typ());
            match ns.path() {
                Some(path) => join.push((cpath(path)?, flag)),
                None => match ns.typ() {
                    // The container's process is spawned directly, so it
                    // cannot become PID 1 of a new pid namespace here, and
                    // user namespaces need id maps written from outside.
                    LinuxNamespaceType::Pid
                    | LinuxNamespaceType::User
                    | LinuxNamespaceType::Time => {}
                    _ => unshare_flags |= flag,
                },
            }
        }
    }
    let (uid, gid, additional_gids, umask) = user_plan(process);
    let mut mounts = Vec::new();
    let mut dev_is_tmpfs = false;
    for (i, m) in spec.mounts().as_deref().unwrap_or(&[]).iter().enumerate() {
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs") {
            dev_is_tmpfs = true;
        }
        mounts.push(mount_step(i, m, root, shared_mounts)?);
    }
    let (devices, symlinks) = if dev_is_tmpfs {
        default_devices(root)?
    } else {
        (Vec::new(), Vec::new())
    };
    let (masked, readonly) = match spec.linux() {
        Some(linux) => (
            linux
                .masked_paths()
                .as_deref()
                .unwrap_or(&[])
                .iter()
                .map(|p| cpath(&join_inside(root, Path::new(p))))
                .collect::<Result<_, _>>()?,
            linux
                .readonly_paths()
                .as_deref()
                .unwrap_or(&[])
                .iter()
                .map(|p| cpath(&join_inside(root, Path::new(p))))
                .collect::<Result<_, _>>()?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    let readonly_root = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    Ok(LaunchPlan {
        args,
        env,
        terminal: process.terminal().unwrap_or(false),
        cwd: cpath(process.cwd())?,
        uid,
        gid,
        additional_gids,
        umask,
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        hostname: match spec.hostname() {
            Some(h) if unshare_flags & libc::CLONE_NEWUTS != 0 => Some(cstr(h)?),
            _ => None,
        },
        unshare_flags,
        join,
        rootfs: Some(RootfsPlan {
            root: cpath(root)?,
            mounts,
            devices,
            symlinks,
            masked,
            readonly,
            readonly_root,
            no_pivot,
        }),
        cgroup_procs: Some(cpath(cgroup_procs)?),
    })
}

/// Plans an exec into a running container whose init is `init_pid`.
pub fn plan_exec(
    process: &oci_spec::runtime::Process,
    init_pid: i32,
    root: &Path,
    cgroup_procs: &Path,
) -> Result<LaunchPlan, SpecError> {
    let (args, env) = process_plan(process)?;
    if !find_executable(root, &args[0], &path_of(&env)) {
        return Err(SpecError::ExecutableNotFound(args[0].clone()));
    }
    let mut join = Vec::new();
    // The mount namespace last: the other /proc paths must still resolve.
    for (name, flag) in [
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("cgroup", libc::CLONE_NEWCGROUP),
        ("mnt", libc::CLONE_NEWNS),
    ] {
        let ns = format!("/proc/{init_pid}/ns/{name}");
        let own = format!("/proc/self/ns/{name}");
        if std::fs::read_link(&ns).ok() != std::fs::read_link(&own).ok() {
            join.push((cstr(ns)?, flag));
        }
    }
    let (uid, gid, additional_gids, umask) = user_plan(process);
    Ok(LaunchPlan {
        args,
        env,
        terminal: process.terminal().unwrap_or(false),
        cwd: cpath(process.cwd())?,
        uid,
        gid,
        additional_gids,
        umask,
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        hostname: None,
        unshare_flags: 0,
        join,
        rootfs: None,
        cgroup_procs: Some(cpath(cgroup_procs)?),
    })
}

/// Reports a failed step to the parent and returns the error to std, which
/// turns it into the spawn error.
fn fail(diag_fd: libc::c_int, what: &CString) -> std::io::Error {
    let err = std::io::Error::last_os_error();
    let bytes = what.as_bytes();
    // SAFETY: writing a valid buffer to a pipe fd owned by this child.
    unsafe { libc::write(diag_fd, bytes.as_ptr().cast(), bytes.len()) };
    err
}

macro_rules! check {
    ($diag:expr, $what:expr, $call:expr) => {
        // SAFETY: a plain syscall on pointers to CStrings prepared before the
        // fork; they live as long as the plan.
        if unsafe { $call } < 0 {
            return Err(fail($diag, $what));
        }
    };
}

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
        }
    }
}

/// Runs in the forked child: applies the plan. Only raw syscalls.
///
/// # Safety
/// Must only be called between fork and exec (from `pre_exec`).
pub unsafe fn apply_in_child(
    plan: &LaunchPlan,
    names: &StepNames,
    diag: libc::c_int,
    console_sock: libc::c_int,
) -> std::io::Result<()> {
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
    for (path, flag) in &plan.join {
        // SAFETY: open of a prepared CString path.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(fail(diag, &names.setns));
        }
        check!(diag, &names.setns, libc::setns(fd, *flag));
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
    }
    if plan.unshare_flags != 0 {
        check!(diag, &names.unshare, libc::unshare(plan.unshare_flags));
    }
    if plan.unshare_flags & libc::CLONE_NEWNET != 0 {
        // SAFETY: forwarded from the caller's contract.
        unsafe { loopback_up(names, diag)? };
    }
    if let Some(rootfs) = &plan.rootfs {
        // SAFETY: forwarded from the caller's contract.
        unsafe { setup_rootfs(rootfs, names, diag)? };
    }
    if let Some(h) = &plan.hostname {
        check!(
            diag,
            &names.hostname,
            libc::sethostname(h.as_ptr(), h.as_bytes().len())
        );
    }
    if plan.terminal {
        // SAFETY: forwarded from the caller's contract.
        unsafe { open_console(console_sock, names, diag)? };
    }
    check!(diag, &names.chdir, libc::chdir(plan.cwd.as_ptr()));
    if let Some(mask) = plan.umask {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(mask as libc::mode_t) };
    }
    check!(
        diag,
        &names.user,
        libc::setgroups(plan.additional_gids.len(), plan.additional_gids.as_ptr())
    );
    check!(diag, &names.user, libc::setgid(plan.gid));
    check!(diag, &names.user, libc::setuid(plan.uid));
    if plan.no_new_privileges {
        check!(
            diag,
            &names.no_new_privs,
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        );
    }
    Ok(())
}

/// Brings up `lo` in a fresh network namespace, as runc does: containers
/// of a pod talk over it.
///
/// # Safety
/// Only between fork and exec.
unsafe fn loopback_up(names: &StepNames, diag: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a datagram socket only to issue interface ioctls.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(fail(diag, &names.loopback));
    }
    // SAFETY: ifreq is plain data; zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    check!(
        diag,
        &names.loopback,
        libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req)
    );
    // SAFETY: the union field written by SIOCGIFFLAGS.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    check!(
        diag,
        &names.loopback,
        libc::ioctl(sock, libc::SIOCSIFFLAGS, &req)
    );
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(sock) };
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

/// # Safety
/// Only between fork and exec.
unsafe fn setup_rootfs(
    r: &RootfsPlan,
    names: &StepNames,
    diag: libc::c_int,
) -> std::io::Result<()> {
    let null = std::ptr::null::<libc::c_char>();
    check!(
        diag,
        &names.make_private,
        libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null()
        )
    );
    check!(
        diag,
        &names.bind_root,
        libc::mount(
            r.root.as_ptr(),
            r.root.as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null()
        )
    );
    for m in &r.mounts {
        for d in &m.mkdirs {
            // SAFETY: mkdir of a prepared path; EEXIST is fine.
            if unsafe { libc::mkdir(d.as_ptr(), 0o755) } < 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
            {
                return Err(fail(diag, &names.mkdir));
            }
        }
        if m.target_is_file {
            // SAFETY: creating an empty file as the bind mount point.
            let fd = unsafe {
                libc::open(
                    m.target.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd >= 0 {
                // SAFETY: closing the fd opened above.
                unsafe { libc::close(fd) };
            }
        }
        let src = m.source.as_ref().map_or(null, |s| s.as_ptr());
        let fstype = m.fstype.as_ref().map_or(null, |s| s.as_ptr());
        let data = m
            .data
            .as_ref()
            .map_or(std::ptr::null(), |s| s.as_ptr().cast());
        check!(
            diag,
            &m.what,
            libc::mount(src, m.target.as_ptr(), fstype, m.flags, data)
        );
        if let Some(flags) = m.remount_flags {
            check!(
                diag,
                &m.what,
                libc::mount(null, m.target.as_ptr(), null, flags, std::ptr::null())
            );
        }
        if let Some(p) = m.propagation {
            check!(
                diag,
                &m.what,
                libc::mount(null, m.target.as_ptr(), null, p, std::ptr::null())
            );
        }
    }
    for d in &r.devices {
        // SAFETY: mknod of a prepared path in the container's /dev tmpfs.
        if unsafe { libc::mknod(d.path.as_ptr(), d.mode, d.dev) } < 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
        {
            return Err(fail(diag, &names.mknod));
        }
    }
    for (target, link) in &r.symlinks {
        // SAFETY: symlink of prepared paths; an existing link is fine.
        unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) };
    }
    for p in &r.masked {
        // Files get /dev/null bound over them, directories an empty read-only
        // tmpfs; paths that do not exist need no mask.
        // SAFETY: mount calls on prepared paths.
        let rc = unsafe {
            libc::mount(
                c"/dev/null".as_ptr(),
                p.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ENOENT) => {}
                Some(libc::ENOTDIR) => {
                    check!(
                        diag,
                        &names.mask,
                        libc::mount(
                            c"tmpfs".as_ptr(),
                            p.as_ptr(),
                            c"tmpfs".as_ptr(),
                            libc::MS_RDONLY,
                            std::ptr::null()
                        )
                    );
                }
                _ => return Err(fail(diag, &names.mask)),
            }
        }
    }
    for p in &r.readonly {
        // SAFETY: mount calls on prepared paths.
        if unsafe {
            libc::mount(
                p.as_ptr(),
                p.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        } < 0
        {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
                continue;
            }
            return Err(fail(diag, &names.mask));
        }
        check!(
            diag,
            &names.mask,
            libc::mount(
                null,
                p.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                std::ptr::null()
            )
        );
    }
    check!(diag, &names.pivot, libc::chdir(r.root.as_ptr()));
    if r.no_pivot {
        check!(
            diag,
            &names.pivot,
            libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                null,
                libc::MS_MOVE,
                std::ptr::null()
            )
        );
        check!(diag, &names.pivot, libc::chroot(c".".as_ptr()));
    } else {
        check!(
            diag,
            &names.pivot,
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int
        );
        check!(
            diag,
            &names.pivot,
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
        );
    }
    check!(diag, &names.pivot, libc::chdir(c"/".as_ptr()));
    if r.readonly_root {
        check!(
            diag,
            &names.readonly_root,
            libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null()
            )
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_inside_never_climbs_out() {
        let root = Path::new("/r");
        assert_eq!(
            join_inside(root, Path::new("/../../etc")),
            PathBuf::from("/r/etc")
        );
        assert_eq!(
            join_inside(root, Path::new("a/../../b")),
            PathBuf::from("/r/b")
        );
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = ["ro", "nosuid", "rbind", "rslave", "size=64k", "mode=755"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, prop, data, bind) = mount_options(&opts);
        assert_eq!(flags, libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_REC);
        assert_eq!(prop, Some(libc::MS_SLAVE | libc::MS_REC));
        assert_eq!(data, vec!["size=64k".to_string(), "mode=755".to_string()]);
        assert!(bind);
    }

    #[test]
    fn executable_lookup_follows_absolute_symlinks_inside_root() {
        let dir = std::env::temp_dir().join(format!("husk-spec-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/busybox"), b"#!").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("bin/busybox"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("/bin/busybox", dir.join("bin/sh")).unwrap();
        assert!(find_executable(&dir, "sh", "/usr/bin:/bin"));
        assert!(find_executable(&dir, "/bin/sh", ""));
        assert!(!find_executable(&dir, "nope", "/usr/bin:/bin"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
