//! `linux`: namespaces, the default and configured device nodes, sysctls,
//! rootfsPropagation, personality, timeOffsets and the seccomp program.

use super::fs::GuestFs;
use super::mounts::{cpath, cpath_field, cstr, cstr_field, dirs_to_create, join_inside};
use super::seccomp::SeccompProgram;
use super::{DeviceNode, SpecError};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use std::ffi::CString;
use std::path::Path;
use std::sync::Arc;

pub(super) fn namespace_flag(t: LinuxNamespaceType) -> libc::c_int {
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

pub(super) fn makedev(major: u64, minor: u64) -> libc::dev_t {
    libc::makedev(major as u32, minor as u32)
}

/// Default devices every container gets when its /dev is a fresh tmpfs.
/// Symlinks to create: (target, link path).
pub(super) type Symlinks = Vec<(CString, CString)>;

pub(super) fn default_devices(root: &Path) -> Result<(Vec<DeviceNode>, Symlinks), SpecError> {
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

/// linux.timeOffsets as the text /proc/self/timens_offsets takes
/// (`monotonic <secs> <nanosecs>` per clock); they need a new time namespace.
pub(super) fn time_offsets(
    spec: &Spec,
    unshare_flags: libc::c_int,
) -> Result<Option<CString>, SpecError> {
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

pub(super) struct LinuxExtras {
    pub sysctls: Vec<(CString, CString)>,
    pub seccomp: Option<Arc<SeccompProgram>>,
    pub propagation: Option<libc::c_ulong>,
    pub personality: Option<libc::c_ulong>,
}

pub(super) fn linux_extras(
    spec: &Spec,
    unshare: libc::c_int,
    fs: &dyn GuestFs,
) -> Result<LinuxExtras, SpecError> {
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
        if !fs.exists(Path::new(&path)) {
            return Err(SpecError::Invalid(format!(
                "linux.sysctl: {k}: the guest kernel has no {path}"
            )));
        }
        sysctls.push((
            cstr_field("linux.sysctl", path)?,
            cstr_field("linux.sysctl", v)?,
        ));
    }
    let seccomp = match linux.seccomp() {
        Some(s) => Some(Arc::new(super::seccomp::compile(s)?)),
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
pub(super) fn linux_devices(
    spec: &Spec,
    root: &Path,
) -> Result<(Vec<DeviceNode>, Vec<CString>), SpecError> {
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
            let parents = dirs_to_create(root, parent)
                .map_err(|e| SpecError::Invalid(format!("{field}: {}", e.reason())))?;
            for dir in parents {
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
        let perm = d.file_mode().unwrap_or(0o666) & 0o7777;
        nodes.push(DeviceNode {
            path: cpath_field(&field, &target)?,
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
