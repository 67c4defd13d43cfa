//! The planner: from an OCI runtime spec (and the host's request) to a
//! [`LaunchPlan`], everything the forked child does before exec.
//!
//! The agent's layers, bottom up (no module imports one above it):
//!
//! - `plan` (this module, the library): pure. Paths as CStrings, mount
//!   flags, ids, capability masks, rlimits, the seccomp program (compiled
//!   here, once per container), the user namespace's checked mappings. It
//!   asks the guest's file systems only through [`fs::GuestFs`], so tests
//!   plan against fixture trees and fuzz targets against arbitrary specs.
//!   Every spec error is found here, before anything exists, and names its
//!   field.
//! - the binary's `child`: applies a plan between fork and exec (raw
//!   syscalls only, no allocation: the agent is multi-threaded).
//! - `cgroup`, `pidns`, `userns` (the helper), `hooks`, `streams`,
//!   `process` (the reaper): one mechanism each.
//! - `error`: the agent's error enum over theirs.
//! - `container`: the registry of containers and the launcher that ties a
//!   plan, a cgroup and a fork together; `server` serves it.

pub mod fs;
mod linux;
pub mod mounts;
pub mod process;
pub mod seccomp;
pub mod seccomp_check;
pub mod userns;

use fs::GuestFs;
use linux::{default_devices, linux_devices, linux_extras, namespace_flag, time_offsets};
pub use mounts::join_inside;
use mounts::{cpath, cpath_field, cstr, cstr_field, early_mount_points, mount_step, MountContext};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
pub use process::{cap_number, find_executable};
use process::{path_of, process_extras, process_plan, user_plan};
pub use seccomp::SeccompProgram;
use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use userns::UserNs;

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

impl SpecError {
    /// The message without its `config.json: ` prefix, to put under
    /// another field's name.
    pub fn reason(&self) -> String {
        let text = self.to_string();
        match text.strip_prefix("config.json: ") {
            Some(rest) => rest.to_string(),
            None => text,
        }
    }
}

/// One mount(2) call, with the directories to create first.
#[derive(Debug)]
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

#[derive(Debug)]
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
#[derive(Debug)]
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
#[derive(Debug)]
pub enum PidNs {
    Inherit,
    New,
    Join(CString),
}

/// The five capability sets as bit masks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

/// Everything the forked child does before exec, precomputed.
#[derive(Debug)]
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
    pub rlimits: Vec<Rlimit>,
    /// process.oomScoreAdj as the text written to /proc/self/oom_score_adj.
    pub oom_score_adj: Option<CString>,
    /// linux.sysctl: (/proc/sys path, value).
    pub sysctls: Vec<(CString, CString)>,
    pub domainname: Option<CString>,
    /// linux.seccomp, compiled once: the container keeps it for its
    /// exec'd processes.
    pub seccomp: Option<Arc<SeccompProgram>>,
    /// linux.personality (PER_LINUX or PER_LINUX32).
    pub personality: Option<libc::c_ulong>,
    /// process.ioPriority as the ioprio_set value.
    pub ioprio: Option<libc::c_int>,
    /// process.scheduler: (policy, priority, flags).
    pub scheduler: Option<(libc::c_int, libc::c_int)>,
    /// The user namespace to create (through the binary's helper, see
    /// `userns` module there); a joined one is the first entry of `join`.
    pub user_ns: UserNs,
}

/// One process.rlimits entry as setrlimit(2) takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: libc::c_int,
    pub soft: u64,
    pub hard: u64,
}

/// What the host's CreateContainer request adds to the spec: where things
/// are in the guest.
pub struct ContainerRequest<'a> {
    /// The container's rootfs in the guest (inside `shared_dir`).
    pub root: &'a Path,
    /// Where the host's shared directory is mounted in the guest.
    pub shared_dir: &'a Path,
    /// Bind mounts whose source the host put in the share: destination →
    /// path relative to `shared_dir`.
    pub shared_mounts: &'a HashMap<String, String>,
    /// `cgroup.procs` of the container's cgroup.
    pub cgroup_procs: &'a Path,
    /// Move the rootfs to / instead of pivot_root (a rootfs on ramfs).
    pub no_pivot: bool,
    /// Where linux.devices nodes are staged for a user namespace.
    pub device_stage: &'a Path,
    /// The container may take the guest's own network namespace where the
    /// spec asks for a new one (`CreateContainerRequest`'s
    /// `guest_network_namespace`, not yet granted in this guest).
    pub guest_network_namespace: bool,
}

#[derive(Debug)]
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

/// Plans a container's init process from its spec.
pub fn plan_container(
    spec: &Spec,
    req: &ContainerRequest<'_>,
    fs: &dyn GuestFs,
) -> Result<LaunchPlan, SpecError> {
    let ContainerRequest {
        root,
        shared_dir,
        shared_mounts,
        cgroup_procs,
        no_pivot,
        device_stage,
        guest_network_namespace,
    } = *req;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::Invalid("process is missing".into()))?;
    let (args, env) = process_plan(process)?;
    if !fs.is_dir(root) {
        return Err(SpecError::MissingRootfs(root.to_path_buf()));
    }
    if !find_executable(root, &args[0], &path_of(&env), fs) {
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
                            if !fs.exists(p) {
                                return Err(SpecError::Namespace(format!(
                                    "[{i}]: pid namespace path {} does not exist in the guest",
                                    p.display()
                                )));
                            }
                            PidNs::Join(cpath_field("linux.namespaces", p)?)
                        }
                        None => PidNs::New,
                    };
                    continue;
                }
                LinuxNamespaceType::User => {
                    user_decl = Some(match ns.path() {
                        Some(p) => {
                            if !fs.exists(p) {
                                return Err(SpecError::Namespace(format!(
                                    "[{i}]: user namespace path {} does not exist in the guest",
                                    p.display()
                                )));
                            }
                            Some(cpath_field("linux.namespaces", p)?)
                        }
                        None => None,
                    });
                    continue;
                }
                _ => {}
            }
            match ns.path() {
                Some(path) => {
                    if !fs.exists(path) {
                        return Err(SpecError::Namespace(format!(
                            "[{i}]: {:?} namespace path {} does not exist in the guest",
                            ns.typ(),
                            path.display()
                        )));
                    }
                    join.push((cpath_field("linux.namespaces", path)?, flag))
                }
                None => unshare_flags |= flag,
            }
        }
    }
    // The sandbox's network owner stays in the guest's own network
    // namespace, where the VM's virtio-net devices and a loopback already
    // up are: nothing to make now and no device to move later. Not with a
    // new user namespace: that one must own the container's network
    // namespace, or the container's root could not configure it.
    let net_owned = unshare_flags & libc::CLONE_NEWNET != 0;
    if guest_network_namespace && net_owned && user_decl.is_none() {
        unshare_flags &= !libc::CLONE_NEWNET;
    }
    let user_ns = match spec.linux() {
        Some(linux) => userns::plan(linux, user_decl, process, fs)?,
        None => UserNs::Inherit,
    };
    if let UserNs::Join(path) = &user_ns {
        // First: the namespaces joined or created after it must be
        // entered with its capabilities (as runc orders them).
        join.insert(0, (path.clone(), libc::CLONE_NEWUSER));
    }
    let (uid, gid, additional_gids, umask) = user_plan(process);
    let extras = process_extras(process)?;
    // Sysctls of the network namespace are the container's either way.
    let owned_flags = unshare_flags | if net_owned { libc::CLONE_NEWNET } else { 0 };
    let linux_extras = linux_extras(spec, owned_flags, fs)?;
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
        let cx = MountContext {
            root,
            shared_dir,
            shared_mounts,
            own_cgroup,
        };
        mounts.push(mount_step(i, m, &cx, fs)?);
    }
    let (early_mkdirs, early_files) = if matches!(user_ns, UserNs::Inherit) {
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
    let bind_devices = !matches!(user_ns, UserNs::Inherit);
    let mut staged_devices = Vec::new();
    if bind_devices {
        for (i, d) in spec_devices.iter_mut().enumerate() {
            let (uid, gid) = d.owner.unwrap_or((0, 0));
            let (uid, gid) = user_ns.host_ids(uid, gid, fs).ok_or_else(|| {
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
                .map(|p| cpath_field("linux.maskedPaths", &join_inside(root, Path::new(p))))
                .collect::<Result<_, _>>()?,
            linux
                .readonly_paths()
                .as_deref()
                .unwrap_or(&[])
                .iter()
                .map(|p| cpath_field("linux.readonlyPaths", &join_inside(root, Path::new(p))))
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
        cwd: cpath_field("process.cwd", process.cwd())?,
        uid,
        gid,
        additional_gids,
        umask,
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        hostname: match spec.hostname() {
            Some(h) if unshare_flags & libc::CLONE_NEWUTS != 0 => Some(cstr_field("hostname", h)?),
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
            Some(d) if unshare_flags & libc::CLONE_NEWUTS != 0 => {
                Some(cstr_field("domainname", d)?)
            }
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
        user_ns,
    })
}

/// Plans an exec into a running container whose init is `init_pid`.
pub fn plan_exec(
    process: &oci_spec::runtime::Process,
    init_pid: i32,
    root: &Path,
    cgroup_procs: &Path,
    seccomp: Option<Arc<SeccompProgram>>,
    fs: &dyn GuestFs,
) -> Result<LaunchPlan, SpecError> {
    let (args, env) = process_plan(process)?;
    if !find_executable(root, &args[0], &path_of(&env), fs) {
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
        if fs.read_link(Path::new(&ns)) != fs.read_link(Path::new(&own)) {
            join.push((cstr(ns)?, flag));
        }
    }
    let (uid, gid, additional_gids, umask) = user_plan(process);
    let extras = process_extras(process)?;
    let pid_ns = {
        let ns = format!("/proc/{init_pid}/ns/pid");
        if fs.read_link(Path::new(&ns)) != fs.read_link(Path::new("/proc/self/ns/pid")) {
            PidNs::Join(cstr(ns)?)
        } else {
            PidNs::Inherit
        }
    };
    Ok(LaunchPlan {
        args,
        env,
        terminal: process.terminal().unwrap_or(false),
        cwd: cpath_field("process.cwd", process.cwd())?,
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
        time_offsets: None,
        user_ns: UserNs::Inherit,
    })
}

#[cfg(test)]
mod tests {
    use super::fs::LiveFs;
    use super::mounts::mount_options;
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

    /// A volume the host shared is left writable in the guest for `ro`
    /// (the host's bind is read-only at its top only; a guest remount
    /// would make the host submounts the guest automounts below it
    /// read-only too), read-only for `rro`; a guest path keeps its `ro`.
    #[test]
    fn only_rro_shared_volumes_are_remounted_read_only_in_the_guest() {
        use super::fs::{Entry, MapFs};
        use super::mounts::{mount_step, MountContext};
        let mut fs = MapFs::new();
        fs.insert("/shared/c/mounts/0", Entry::Dir);
        fs.insert("/guest-dir", Entry::Dir);
        let shared_mounts: HashMap<String, String> =
            [("/vol".to_string(), "c/mounts/0".to_string())].into();
        let cx = MountContext {
            root: Path::new("/r"),
            shared_dir: Path::new("/shared"),
            shared_mounts: &shared_mounts,
            own_cgroup: None,
        };
        let remount = |destination: &str, source: &str, options: &[&str]| {
            let m: oci_spec::runtime::Mount = serde_json::from_value(serde_json::json!({
                "destination": destination,
                "type": "bind",
                "source": source,
                "options": options,
            }))
            .unwrap();
            let step = mount_step(0, &m, &cx, &fs).unwrap();
            step.remount_flags.map(|f| f & libc::MS_RDONLY != 0)
        };
        assert_eq!(
            remount("/vol", "/host/vol", &["rbind", "ro", "nosuid"]),
            Some(false)
        );
        assert_eq!(remount("/vol", "/host/vol", &["rbind", "ro"]), None);
        assert_eq!(
            remount("/vol", "/host/vol", &["rbind", "ro", "rro"]),
            Some(true)
        );
        assert_eq!(remount("/g", "/guest-dir", &["rbind", "ro"]), Some(true));
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
        assert!(find_executable(&dir, "sh", "/usr/bin:/bin", &LiveFs));
        assert!(find_executable(&dir, "/bin/sh", "", &LiveFs));
        assert!(!find_executable(&dir, "nope", "/usr/bin:/bin", &LiveFs));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
