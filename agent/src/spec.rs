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
    /// Owner for linux.devices entries; None keeps root.
    pub owner: Option<(libc::uid_t, libc::gid_t)>,
    /// The node to bind-mount instead of mknod in a user namespace (where
    /// mknod is not permitted, as runc does): the agent's own /dev node for
    /// the defaults, a node the agent made for linux.devices.
    pub bind_from: Option<CString>,
}

/// A linux.devices node the agent makes (in its own /dev) before the start
/// of a container with a user namespace, for the child to bind-mount.
pub struct StagedDevice {
    pub path: PathBuf,
    pub mode: libc::mode_t,
    pub dev: libc::dev_t,
    /// Owner in the guest's initial user namespace (mapped from the spec's).
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// How the container's process gets its pid namespace. Pid namespaces only
/// apply to children of the caller, so the agent enters it in the spawning
/// thread (setns/unshare on that thread alone) around the fork.
pub enum PidNs {
    Inherit,
    New,
    Join(CString),
}

/// The five capability sets as bit masks.
#[derive(Clone, Copy, Default)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
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
    /// linux.timeOffsets as written to /proc/self/timens_offsets, right
    /// after a new time namespace is created (before anything enters it:
    /// the child itself does at exec).
    pub time_offsets: Option<CString>,
    /// Namespaces to join: (path, CLONE_NEW* type).
    pub join: Vec<(CString, libc::c_int)>,
    /// Root file system set-up; None for exec into an existing container.
    pub rootfs: Option<RootfsPlan>,
    /// `cgroup.procs` of the container's cgroup.
    pub cgroup_procs: Option<CString>,
    pub pid_ns: PidNs,
    /// process.capabilities; None keeps the agent's (all).
    pub caps: Option<CapSets>,
    pub rlimits: Vec<(libc::c_int, libc::rlimit)>,
    /// process.oomScoreAdj as the text written to /proc/self/oom_score_adj.
    pub oom_score_adj: Option<CString>,
    /// linux.sysctl: (/proc/sys path, value).
    pub sysctls: Vec<(CString, CString)>,
    pub domainname: Option<CString>,
    pub seccomp: Option<crate::seccomp::SeccompProgram>,
    /// linux.personality (PER_LINUX or PER_LINUX32).
    pub personality: Option<libc::c_ulong>,
    /// process.ioPriority as the ioprio_set value.
    pub ioprio: Option<libc::c_int>,
    /// process.scheduler: (policy, priority, flags).
    pub scheduler: Option<(libc::c_int, libc::c_int)>,
    /// hooks.createContainer and hooks.startContainer (containers only).
    pub hooks: Option<crate::hooks::GuestHooks>,
    /// A container's child parks here between `create` and `start` (once
    /// its namespaces and rootfs are set up and the createContainer hooks
    /// have run); None for exec'd processes.
    pub park: Option<ParkFds>,
    /// The user namespace to create (through a helper, see userns.rs); a
    /// joined one is the first entry of `join`.
    pub user_ns: crate::userns::UserNs,
    /// linux.resources.devices, attached by the child once its /dev is
    /// made (as runc: after mknod and the terminal, before exec).
    pub device_filter: Option<crate::cgroup_devices::DeviceFilter>,
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
    /// linux.rootfsPropagation, applied to / after pivot_root.
    pub propagation: Option<libc::c_ulong>,
    /// Directories to create for linux.devices.
    pub device_dirs: Vec<CString>,
    /// Bind-mount device nodes (`bind_from`) instead of mknod: the
    /// container has a user namespace.
    pub bind_devices: bool,
    /// linux.devices nodes the agent makes for `bind_devices`.
    pub staged_devices: Vec<StagedDevice>,
    /// With a user namespace: mount points (directories, then files) that
    /// lie on the rootfs itself, made before the user namespace is joined.
    /// The rootfs usually belongs to the guest's root, which is not mapped
    /// in the container's namespace: its root could not create them.
    pub early_mkdirs: Vec<CString>,
    pub early_files: Vec<CString>,
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
            Component::ParentDir if out != root => {
                out.pop();
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

/// The mount points of `mounts` that are on the rootfs, not below the
/// target of an earlier mount: (directories, files).
fn early_mount_points(mounts: &[MountStep]) -> (Vec<CString>, Vec<CString>) {
    use std::os::unix::ffi::OsStrExt;
    let path = |c: &CString| PathBuf::from(std::ffi::OsStr::from_bytes(c.as_bytes()));
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    for (i, m) in mounts.iter().enumerate() {
        let on_rootfs = |p: &Path| !mounts[..i].iter().any(|e| p.starts_with(path(&e.target)));
        for d in &m.mkdirs {
            if on_rootfs(&path(d)) && !dirs.contains(d) {
                dirs.push(d.clone());
            }
        }
        if m.target_is_file && on_rootfs(&path(&m.target)) {
            files.push(m.target.clone());
        }
    }
    (dirs, files)
}

fn mount_step(
    index: usize,
    m: &Mount,
    root: &Path,
    shared_mounts: &HashMap<String, String>,
    own_cgroup: Option<&Path>,
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
    let mut source = m.source().as_ref().map(|s| s.to_path_buf());
    // Without a cgroup namespace a cgroup2 mount would show the whole guest
    // hierarchy (the agent's and the pod's other containers' groups): bind
    // the container's own cgroup instead, as runc does where it cannot
    // mount cgroup2.
    let cgroup_bind = match own_cgroup {
        Some(dir) if fstype == "cgroup2" => {
            source = Some(dir.to_path_buf());
            true
        }
        _ => false,
    };
    let bind = bind_opt || fstype == "bind" || cgroup_bind;
    let mut target_is_file = false;
    if cgroup_bind {
        // The source is the guest's cgroup, not a host path.
    } else if bind {
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
/// Symlinks to create: (target, link path).
type Symlinks = Vec<(CString, CString)>;
/// Environment as (name, value) pairs.
type EnvPairs = Vec<(String, String)>;

fn default_devices(root: &Path) -> Result<(Vec<DeviceNode>, Symlinks), SpecError> {
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
            owner: None,
            bind_from: Some(cpath(&Path::new("/dev").join(name))?),
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
) -> Result<(Vec<String>, EnvPairs), SpecError> {
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
    device_stage: &Path,
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
    let mut pid_ns = PidNs::Inherit;
    // None: no user namespace; Some(None): a new one; Some(Some(path)).
    let mut user_decl = None;
    if let Some(linux) = spec.linux() {
        let mut seen = Vec::new();
        for (i, ns) in linux
            .namespaces()
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .enumerate()
        {
            let flag = namespace_flag(ns.typ());
            if seen.contains(&flag) {
                return Err(SpecError::Namespace(format!(
                    "[{i}]: namespace type {:?} is listed twice",
                    ns.typ()
                )));
            }
            seen.push(flag);
            match ns.typ() {
                LinuxNamespaceType::Pid => {
                    pid_ns = match ns.path() {
                        Some(p) => {
                            if !p.exists() {
                                return Err(SpecError::Namespace(format!(
                                    "[{i}]: pid namespace path {} does not exist in the guest",
                                    p.display()
                                )));
                            }
                            PidNs::Join(cpath(p)?)
                        }
                        None => PidNs::New,
                    };
                    continue;
                }
                LinuxNamespaceType::User => {
                    user_decl = Some(match ns.path() {
                        Some(p) => {
                            if !p.exists() {
                                return Err(SpecError::Namespace(format!(
                                    "[{i}]: user namespace path {} does not exist in the guest",
                                    p.display()
                                )));
                            }
                            Some(cpath(p)?)
                        }
                        None => None,
                    });
                    continue;
                }
                _ => {}
            }
            match ns.path() {
                Some(path) => {
                    if !path.exists() {
                        return Err(SpecError::Namespace(format!(
                            "[{i}]: {:?} namespace path {} does not exist in the guest",
                            ns.typ(),
                            path.display()
                        )));
                    }
                    join.push((cpath(path)?, flag))
                }
                None => unshare_flags |= flag,
            }
        }
    }
    let user_ns = match spec.linux() {
        Some(linux) => crate::userns::plan(linux, user_decl, process)?,
        None => crate::userns::UserNs::Inherit,
    };
    if let crate::userns::UserNs::Join(path) = &user_ns {
        // First: the namespaces joined or created after it must be
        // entered with its capabilities (as runc orders them).
        join.insert(0, (path.clone(), libc::CLONE_NEWUSER));
    }
    let (uid, gid, additional_gids, umask) = user_plan(process);
    let extras = process_extras(process)?;
    let linux_extras = linux_extras(spec, root, unshare_flags)?;
    let mut mounts = Vec::new();
    let mut dev_is_tmpfs = false;
    for (i, m) in spec.mounts().as_deref().unwrap_or(&[]).iter().enumerate() {
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs") {
            dev_is_tmpfs = true;
        }
        let own_cgroup = if unshare_flags & libc::CLONE_NEWCGROUP == 0
            && !join.iter().any(|(_, f)| *f == libc::CLONE_NEWCGROUP)
        {
            cgroup_procs.parent()
        } else {
            None
        };
        mounts.push(mount_step(i, m, root, shared_mounts, own_cgroup)?);
    }
    let (early_mkdirs, early_files) = if matches!(user_ns, crate::userns::UserNs::Inherit) {
        (Vec::new(), Vec::new())
    } else {
        early_mount_points(&mounts)
    };
    let (mut devices, symlinks) = if dev_is_tmpfs {
        default_devices(root)?
    } else {
        (Vec::new(), Vec::new())
    };
    let (mut spec_devices, device_dirs) = linux_devices(spec, root)?;
    let bind_devices = !matches!(user_ns, crate::userns::UserNs::Inherit);
    let mut staged_devices = Vec::new();
    if bind_devices {
        for (i, d) in spec_devices.iter_mut().enumerate() {
            let (uid, gid) = d.owner.unwrap_or((0, 0));
            let (uid, gid) = user_ns.host_ids(uid, gid).ok_or_else(|| {
                SpecError::Invalid(format!(
                    "linux.devices[{i}]: uid {uid} or gid {gid} is not mapped by \
                     linux.uidMappings / linux.gidMappings"
                ))
            })?;
            let path = device_stage.join(i.to_string());
            d.bind_from = Some(cpath(&path)?);
            staged_devices.push(StagedDevice {
                path,
                mode: d.mode,
                dev: d.dev,
                uid,
                gid,
            });
        }
    }
    // A configured device replaces a default one at the same path.
    devices.retain(|d| !spec_devices.iter().any(|s| s.path == d.path));
    devices.extend(spec_devices);
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
            propagation: linux_extras.propagation,
            device_dirs,
            bind_devices,
            staged_devices,
            early_mkdirs,
            early_files,
        }),
        cgroup_procs: Some(cpath(cgroup_procs)?),
        pid_ns,
        caps: extras.caps,
        rlimits: extras.rlimits,
        oom_score_adj: extras.oom_score_adj,
        sysctls: linux_extras.sysctls,
        time_offsets: time_offsets(spec, unshare_flags)?,
        domainname: match spec.domainname() {
            Some(d) if unshare_flags & libc::CLONE_NEWUTS != 0 => Some(cstr(d)?),
            Some(_) => {
                return Err(SpecError::Invalid(
                    "domainname needs a new uts namespace (linux.namespaces)".into(),
                ))
            }
            None => None,
        },
        seccomp: linux_extras.seccomp,
        personality: linux_extras.personality,
        ioprio: extras.ioprio,
        scheduler: extras.scheduler,
        hooks: None,
        park: None,
        user_ns,
        device_filter: None,
    })
}

/// linux.timeOffsets as the text /proc/self/timens_offsets takes
/// (`monotonic <secs> <nanosecs>` per clock); they need a new time namespace.
fn time_offsets(spec: &Spec, unshare_flags: libc::c_int) -> Result<Option<CString>, SpecError> {
    let offsets = match spec
        .linux()
        .as_ref()
        .and_then(|l| l.time_offsets().as_ref())
    {
        Some(o) if !o.is_empty() => o,
        _ => return Ok(None),
    };
    if unshare_flags & libc::CLONE_NEWTIME == 0 {
        return Err(SpecError::Invalid(
            "linux.timeOffsets needs a new time namespace (linux.namespaces)".into(),
        ));
    }
    let mut text = String::new();
    let mut clocks: Vec<_> = offsets.iter().collect();
    clocks.sort_by_key(|(name, _)| name.as_str());
    for (clock, offset) in clocks {
        if clock != "monotonic" && clock != "boottime" {
            return Err(SpecError::Invalid(format!(
                "linux.timeOffsets: unknown clock {clock:?} (monotonic or boottime)"
            )));
        }
        let nanos = offset.nanosecs().unwrap_or(0);
        if nanos >= 1_000_000_000 {
            return Err(SpecError::Invalid(format!(
                "linux.timeOffsets.{clock}.nanosecs {nanos} is not below one second"
            )));
        }
        text.push_str(&format!("{clock} {} {nanos}\n", offset.secs().unwrap_or(0)));
    }
    Ok(Some(cstr(text)?))
}

/// Process fields beyond args/env/user: capabilities, rlimits, oomScoreAdj,
/// ioPriority, scheduler.
struct ProcessExtras {
    caps: Option<CapSets>,
    rlimits: Vec<(libc::c_int, libc::rlimit)>,
    oom_score_adj: Option<CString>,
    ioprio: Option<libc::c_int>,
    scheduler: Option<(libc::c_int, libc::c_int)>,
}

/// Capability numbers by OCI name (linux/capability.h).
const CAPS: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

pub fn cap_number(name: &str) -> Option<u32> {
    let name = name.to_ascii_uppercase();
    let name = if name.starts_with("CAP_") {
        name
    } else {
        format!("CAP_{name}")
    };
    CAPS.iter().position(|c| *c == name).map(|i| i as u32)
}

fn cap_mask(set: &Option<oci_spec::runtime::Capabilities>, field: &str) -> Result<u64, SpecError> {
    let mut mask = 0u64;
    for c in set.iter().flatten() {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let n = cap_number(&name).ok_or_else(|| {
            SpecError::Invalid(format!(
                "process.capabilities.{field}: unknown capability {name:?}"
            ))
        })?;
        mask |= 1 << n;
    }
    Ok(mask)
}

fn rlimit_number(name: &str) -> Option<libc::c_int> {
    const NAMES: [&str; 16] = [
        "RLIMIT_CPU",
        "RLIMIT_FSIZE",
        "RLIMIT_DATA",
        "RLIMIT_STACK",
        "RLIMIT_CORE",
        "RLIMIT_RSS",
        "RLIMIT_NPROC",
        "RLIMIT_NOFILE",
        "RLIMIT_MEMLOCK",
        "RLIMIT_AS",
        "RLIMIT_LOCKS",
        "RLIMIT_SIGPENDING",
        "RLIMIT_MSGQUEUE",
        "RLIMIT_NICE",
        "RLIMIT_RTPRIO",
        "RLIMIT_RTTIME",
    ];
    NAMES
        .iter()
        .position(|n| *n == name)
        .map(|i| i as libc::c_int)
}

fn process_extras(process: &oci_spec::runtime::Process) -> Result<ProcessExtras, SpecError> {
    let caps = match process.capabilities() {
        Some(c) => Some(CapSets {
            bounding: cap_mask(c.bounding(), "bounding")?,
            effective: cap_mask(c.effective(), "effective")?,
            permitted: cap_mask(c.permitted(), "permitted")?,
            inheritable: cap_mask(c.inheritable(), "inheritable")?,
            ambient: cap_mask(c.ambient(), "ambient")?,
        }),
        None => None,
    };
    let mut rlimits = Vec::new();
    for (i, r) in process
        .rlimits()
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        let name = serde_json::to_value(r.typ())
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let res = rlimit_number(&name).ok_or_else(|| {
            SpecError::Invalid(format!("process.rlimits[{i}]: unknown type {name:?}"))
        })?;
        if r.soft() > r.hard() {
            return Err(SpecError::Invalid(format!(
                "process.rlimits[{i}] ({name}): soft limit {} above hard limit {}",
                r.soft(),
                r.hard()
            )));
        }
        rlimits.push((
            res,
            libc::rlimit {
                rlim_cur: r.soft(),
                rlim_max: r.hard(),
            },
        ));
    }
    let oom_score_adj = match process.oom_score_adj() {
        Some(v) if !(-1000..=1000).contains(&v) => {
            return Err(SpecError::Invalid(format!(
                "process.oomScoreAdj: {v} is outside -1000..1000"
            )))
        }
        Some(v) => Some(cstr(v.to_string())?),
        None => None,
    };
    let ioprio = match process.io_priority() {
        Some(p) => {
            use oci_spec::runtime::IOPriorityClass;
            let class = match p.class() {
                IOPriorityClass::IoprioClassRt => 1,
                IOPriorityClass::IoprioClassBe => 2,
                IOPriorityClass::IoprioClassIdle => 3,
            };
            if !(0..=7).contains(&p.priority()) {
                return Err(SpecError::Invalid(format!(
                    "process.ioPriority.priority: {} is outside 0..7",
                    p.priority()
                )));
            }
            Some((class << 13) | p.priority() as libc::c_int)
        }
        None => None,
    };
    let scheduler = match process.scheduler() {
        Some(s) => {
            let policy = serde_json::to_value(s.policy())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let p = match policy.as_str() {
                "SCHED_OTHER" => libc::SCHED_OTHER,
                "SCHED_FIFO" => libc::SCHED_FIFO,
                "SCHED_RR" => libc::SCHED_RR,
                "SCHED_BATCH" => libc::SCHED_BATCH,
                "SCHED_IDLE" => libc::SCHED_IDLE,
                other => {
                    return Err(SpecError::Invalid(format!(
                        "process.scheduler.policy: {other} is not supported in the guest"
                    )))
                }
            };
            Some((p, s.priority().unwrap_or(0)))
        }
        None => None,
    };
    Ok(ProcessExtras {
        caps,
        rlimits,
        oom_score_adj,
        ioprio,
        scheduler,
    })
}

struct LinuxExtras {
    sysctls: Vec<(CString, CString)>,
    seccomp: Option<crate::seccomp::SeccompProgram>,
    propagation: Option<libc::c_ulong>,
    personality: Option<libc::c_ulong>,
}

fn linux_extras(spec: &Spec, _root: &Path, unshare: libc::c_int) -> Result<LinuxExtras, SpecError> {
    let Some(linux) = spec.linux() else {
        return Ok(LinuxExtras {
            sysctls: Vec::new(),
            seccomp: None,
            propagation: None,
            personality: None,
        });
    };
    let mut sysctls = Vec::new();
    let mut keys: Vec<_> = linux.sysctl().iter().flatten().collect();
    keys.sort();
    for (k, v) in keys {
        if k.is_empty() || k.contains('/') || k.split('.').any(|p| p.is_empty() || p == "..") {
            return Err(SpecError::Invalid(format!(
                "linux.sysctl: invalid key {k:?}"
            )));
        }
        // Only sysctls of namespaces the container owns may be set: the
        // others would change the whole guest (shared by a pod's containers).
        let ns_ok = if k.starts_with("net.") {
            unshare & libc::CLONE_NEWNET != 0
        } else if k.starts_with("kernel.msg")
            || k.starts_with("kernel.sem")
            || k.starts_with("kernel.shm")
            || k.starts_with("fs.mqueue.")
        {
            unshare & libc::CLONE_NEWIPC != 0
        } else if k == "kernel.hostname" || k == "kernel.domainname" {
            unshare & libc::CLONE_NEWUTS != 0
        } else {
            false
        };
        if !ns_ok {
            return Err(SpecError::Invalid(format!(
                "linux.sysctl: {k} is not namespaced by a namespace the container creates"
            )));
        }
        let path = format!("/proc/sys/{}", k.replace('.', "/"));
        if !Path::new(&path).exists() {
            return Err(SpecError::Invalid(format!(
                "linux.sysctl: {k}: the guest kernel has no {path}"
            )));
        }
        sysctls.push((cstr(path)?, cstr(v)?));
    }
    let seccomp = match linux.seccomp() {
        Some(s) => Some(crate::seccomp::compile(s)?),
        None => None,
    };
    let propagation = match linux.rootfs_propagation().as_deref() {
        None | Some("") => None,
        Some(p) => Some(match p {
            "private" => libc::MS_PRIVATE,
            "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
            "shared" => libc::MS_SHARED,
            "rshared" => libc::MS_SHARED | libc::MS_REC,
            "slave" => libc::MS_SLAVE,
            "rslave" => libc::MS_SLAVE | libc::MS_REC,
            "unbindable" => libc::MS_UNBINDABLE,
            "runbindable" => libc::MS_UNBINDABLE | libc::MS_REC,
            other => {
                return Err(SpecError::Invalid(format!(
                    "linux.rootfsPropagation: unknown value {other:?}"
                )))
            }
        }),
    };
    let personality = match linux.personality() {
        Some(p) => {
            let d = serde_json::to_value(p.domain())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            Some(match d.as_str() {
                "LINUX" => 0,
                "LINUX32" => 8,
                other => {
                    return Err(SpecError::Invalid(format!(
                        "linux.personality.domain: unknown {other:?}"
                    )))
                }
            })
        }
        None => None,
    };
    Ok(LinuxExtras {
        sysctls,
        seccomp,
        propagation,
        personality,
    })
}

/// linux.devices as nodes to create, plus the directories they need.
fn linux_devices(spec: &Spec, root: &Path) -> Result<(Vec<DeviceNode>, Vec<CString>), SpecError> {
    use oci_spec::runtime::LinuxDeviceType;
    let mut nodes = Vec::new();
    let mut dirs: Vec<CString> = Vec::new();
    let Some(linux) = spec.linux() else {
        return Ok((nodes, dirs));
    };
    for (i, d) in linux.devices().as_deref().unwrap_or(&[]).iter().enumerate() {
        let field = format!("linux.devices[{i}] ({})", d.path().display());
        if !d.path().is_absolute() {
            return Err(SpecError::Invalid(format!(
                "{field}: path must be absolute"
            )));
        }
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
            LinuxDeviceType::B => libc::S_IFBLK,
            LinuxDeviceType::P => libc::S_IFIFO,
            LinuxDeviceType::A => {
                return Err(SpecError::Invalid(format!(
                    "{field}: type \"a\" is only valid in device cgroup rules"
                )))
            }
        };
        let target = join_inside(root, d.path());
        if let Some(parent) = target.parent() {
            for dir in dirs_to_create(root, parent)? {
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
        let perm = d.file_mode().unwrap_or(0o666) & 0o7777;
        nodes.push(DeviceNode {
            path: cpath(&target)?,
            mode: kind | perm,
            dev: if kind == libc::S_IFIFO {
                0
            } else {
                makedev(d.major() as u64, d.minor() as u64)
            },
            owner: Some((d.uid().unwrap_or(0), d.gid().unwrap_or(0))),
            bind_from: None,
        });
    }
    Ok((nodes, dirs))
}

/// Plans an exec into a running container whose init is `init_pid`.
pub fn plan_exec(
    process: &oci_spec::runtime::Process,
    init_pid: i32,
    root: &Path,
    cgroup_procs: &Path,
    seccomp: Option<crate::seccomp::SeccompProgram>,
) -> Result<LaunchPlan, SpecError> {
    let (args, env) = process_plan(process)?;
    if !find_executable(root, &args[0], &path_of(&env)) {
        return Err(SpecError::ExecutableNotFound(args[0].clone()));
    }
    let mut join = Vec::new();
    // The user namespace first (the others are owned by it); the child
    // opens every path before it joins any.
    for (name, flag) in [
        ("user", libc::CLONE_NEWUSER),
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("cgroup", libc::CLONE_NEWCGROUP),
        ("time", libc::CLONE_NEWTIME),
        ("mnt", libc::CLONE_NEWNS),
    ] {
        let ns = format!("/proc/{init_pid}/ns/{name}");
        let own = format!("/proc/self/ns/{name}");
        if std::fs::read_link(&ns).ok() != std::fs::read_link(&own).ok() {
            join.push((cstr(ns)?, flag));
        }
    }
    let (uid, gid, additional_gids, umask) = user_plan(process);
    let extras = process_extras(process)?;
    let pid_ns = {
        let ns = format!("/proc/{init_pid}/ns/pid");
        if std::fs::read_link(&ns).ok() != std::fs::read_link("/proc/self/ns/pid").ok() {
            PidNs::Join(cstr(ns)?)
        } else {
            PidNs::Inherit
        }
    };
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
        pid_ns,
        caps: extras.caps,
        rlimits: extras.rlimits,
        oom_score_adj: extras.oom_score_adj,
        sysctls: Vec::new(),
        domainname: None,
        seccomp,
        personality: None,
        ioprio: extras.ioprio,
        scheduler: extras.scheduler,
        hooks: None,
        park: None,
        time_offsets: None,
        user_ns: crate::userns::UserNs::Inherit,
        device_filter: None,
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
    for (res, lim) in &plan.rlimits {
        check!(
            diag,
            &names.rlimit,
            libc::setrlimit(*res as libc::__rlimit_resource_t, lim)
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
    if plan.unshare_flags != 0 {
        check!(diag, &names.unshare, libc::unshare(plan.unshare_flags));
    }
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
        // SAFETY: forwarded from the caller's contract.
        unsafe { loopback_up(names, diag)? };
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
        unsafe { setup_rootfs(rootfs, names, diag)? };
    }
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
    if let Some(hooks) = &plan.hooks {
        // SAFETY: forwarded from the caller's contract; the namespaces,
        // rootfs and hostname are in place.
        unsafe { crate::hooks::run_create(hooks, diag)? };
    }
    if let Some(park) = &plan.park {
        // SAFETY: forwarded from the caller's contract.
        unsafe { wait_for_start(park, names, diag)? };
    }
    if let Some(hooks) = &plan.hooks {
        // SAFETY: forwarded from the caller's contract.
        unsafe { crate::hooks::run_start(hooks, diag)? };
    }
    if plan.terminal {
        // SAFETY: forwarded from the caller's contract.
        unsafe { open_console(console_sock, names, diag)? };
    }
    if let Some(filter) = &plan.device_filter {
        check!(
            diag,
            &names.device_filter,
            crate::cgroup_devices::attach_raw(filter.attach_attr())
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

/// Tells the agent the container is created, then waits for `start`.
///
/// # Safety
/// Only between fork and exec.
unsafe fn wait_for_start(
    park: &ParkFds,
    names: &StepNames,
    diag: libc::c_int,
) -> std::io::Result<()> {
    check!(
        diag,
        &names.park,
        libc::write(park.parked_w, b"p".as_ptr().cast(), 1) as libc::c_int
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
    s: &crate::seccomp::SeccompProgram,
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
            check!(diag, &m.what, remount(&m.target, flags));
        }
        if let Some(p) = m.propagation {
            check!(
                diag,
                &m.what,
                libc::mount(null, m.target.as_ptr(), null, p, std::ptr::null())
            );
        }
    }
    for dir in &r.device_dirs {
        // SAFETY: mkdir of a prepared path; EEXIST is fine.
        if unsafe { libc::mkdir(dir.as_ptr(), 0o755) } < 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
        {
            return Err(fail(diag, &names.device));
        }
    }
    for d in &r.devices {
        if r.bind_devices {
            // SAFETY: forwarded from the caller's contract.
            unsafe { bind_device(d, names, diag)? };
            continue;
        }
        // SAFETY: mknod of a prepared path in the container's /dev.
        if unsafe { libc::mknod(d.path.as_ptr(), d.mode, d.dev) } < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return Err(fail(diag, &names.mknod));
            }
            if d.owner.is_some() {
                // A configured device replaces whatever is there.
                // SAFETY: unlink and mknod of a prepared path.
                unsafe { libc::unlink(d.path.as_ptr()) };
                check!(
                    diag,
                    &names.device,
                    libc::mknod(d.path.as_ptr(), d.mode, d.dev)
                );
            }
        }
        // mknod applies the umask: set the mode exactly (the defaults are
        // 0666, as runc makes them, not 0644).
        check!(
            diag,
            &names.device,
            libc::chmod(d.path.as_ptr(), d.mode & 0o7777)
        );
        if let Some((uid, gid)) = d.owner {
            check!(diag, &names.device, libc::chown(d.path.as_ptr(), uid, gid));
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
            remount(
                p,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC
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
    if let Some(p) = r.propagation {
        check!(
            diag,
            &names.propagation,
            libc::mount(null, c"/".as_ptr(), null, p, std::ptr::null())
        );
    }
    if r.readonly_root {
        check!(
            diag,
            &names.readonly_root,
            remount(c"/", libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY)
        );
    }
    Ok(())
}

/// The kernel's `struct statfs` on x86_64 (every field 64 bits).
#[repr(C)]
#[derive(Default)]
struct KernelStatfs {
    f_type: i64,
    f_bsize: i64,
    f_blocks: u64,
    f_bfree: u64,
    f_bavail: u64,
    f_files: u64,
    f_ffree: u64,
    f_fsid: [i32; 2],
    f_namelen: i64,
    f_frsize: i64,
    f_flags: i64,
    f_spare: [i64; 4],
}

/// A bind remount (mount(2) with MS_REMOUNT | MS_BIND) that keeps the flags
/// a user namespace locks: a mount copied into a mount namespace owned by a
/// user namespace keeps its nosuid, nodev, noexec, read-only and atime
/// flags, and a remount that would clear one fails with EPERM. Then the
/// mount's current flags (statfs) are added and it is tried again, as runc
/// does. Without a user namespace nothing is locked and the first call
/// stands.
///
/// # Safety
/// Only between fork and exec; a raw syscall wrapper.
unsafe fn remount(target: &std::ffi::CStr, flags: libc::c_ulong) -> libc::c_int {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: mount of a prepared path.
    let rc = unsafe { libc::mount(null, target.as_ptr(), null, flags, std::ptr::null()) };
    if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return rc;
    }
    let mut st = KernelStatfs::default();
    // SAFETY: statfs(2) of a prepared path into a buffer of the kernel's
    // struct statfs size (the libc crate does not expose f_flags).
    if unsafe { libc::syscall(libc::SYS_statfs, target.as_ptr(), &mut st) } < 0 {
        return -1;
    }
    let mut locked = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flags as libc::c_ulong & st_flag != 0 {
            locked |= ms_flag;
        }
    }
    // SAFETY: mount of a prepared path.
    unsafe {
        libc::mount(
            null,
            target.as_ptr(),
            null,
            flags | locked,
            std::ptr::null(),
        )
    }
}

/// Puts a device node in the container's /dev by bind-mounting `bind_from`
/// onto an empty file: mknod needs CAP_MKNOD in the initial user namespace,
/// and nodes on a file system mounted in a user namespace do not open. The
/// source carries mode and owner.
///
/// # Safety
/// Only between fork and exec.
unsafe fn bind_device(d: &DeviceNode, names: &StepNames, diag: libc::c_int) -> std::io::Result<()> {
    let Some(src) = &d.bind_from else {
        // SAFETY: setting errno for the report below.
        unsafe { *libc::__errno_location() = libc::EINVAL };
        return Err(fail(diag, &names.bind_device));
    };
    // SAFETY: creating the empty mount point file (a regular file needs no
    // CAP_MKNOD); whatever is already there serves as well.
    if unsafe { libc::mknod(d.path.as_ptr(), libc::S_IFREG | 0o644, 0) } < 0
        && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
    {
        return Err(fail(diag, &names.bind_device));
    }
    check!(
        diag,
        &names.bind_device,
        libc::mount(
            src.as_ptr(),
            d.path.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null()
        )
    );
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
