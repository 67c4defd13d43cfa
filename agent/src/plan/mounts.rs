//! `mounts`: each entry as one mount(2) call (flags, data, propagation, a
//! second remount for read-only binds), the directories it needs, and the
//! paths joined below the rootfs so `..` never climbs out of it.

use super::fs::GuestFs;
use super::{MountStep, SpecError};
use oci_spec::runtime::Mount;
use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Component, Path, PathBuf};

/// A C string of `s`; a NUL byte in it (which no syscall could take) is
/// an error showing the string.
pub(super) fn cstr(s: impl AsRef<[u8]>) -> Result<CString, SpecError> {
    CString::new(s.as_ref().to_vec()).map_err(|e| {
        SpecError::Invalid(format!(
            "{:?} contains a NUL byte",
            String::from_utf8_lossy(&e.into_vec())
        ))
    })
}

/// As `cstr`, the error naming the spec field `s` comes from.
pub(super) fn cstr_field(field: &str, s: impl AsRef<[u8]>) -> Result<CString, SpecError> {
    cstr(s).map_err(|e| SpecError::Invalid(format!("{field}: {}", e.reason())))
}

pub(super) fn cpath(p: &Path) -> Result<CString, SpecError> {
    use std::os::unix::ffi::OsStrExt;
    cstr(p.as_os_str().as_bytes())
}

/// As `cpath`, the error naming the spec field `p` comes from.
pub(super) fn cpath_field(field: &str, p: &Path) -> Result<CString, SpecError> {
    use std::os::unix::ffi::OsStrExt;
    cstr_field(field, p.as_os_str().as_bytes())
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
pub(super) fn mount_options(
    options: &[String],
) -> (libc::c_ulong, Option<libc::c_ulong>, Vec<String>, bool) {
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
pub(super) fn dirs_to_create(root: &Path, path: &Path) -> Result<Vec<CString>, SpecError> {
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
pub(super) fn early_mount_points(mounts: &[MountStep]) -> (Vec<CString>, Vec<CString>) {
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

/// Where a mount's paths lie in the guest.
pub(super) struct MountContext<'a> {
    pub root: &'a Path,
    pub shared_dir: &'a Path,
    pub shared_mounts: &'a HashMap<String, String>,
    /// The container's own cgroup, bound for a cgroup2 mount when it has no
    /// cgroup namespace.
    pub own_cgroup: Option<&'a Path>,
}

pub(super) fn mount_step(
    index: usize,
    m: &Mount,
    cx: &MountContext<'_>,
    fs: &dyn GuestFs,
) -> Result<MountStep, SpecError> {
    let root = cx.root;
    let destination = m.destination();
    let err = |reason: String| SpecError::Mount {
        index,
        destination: destination.display().to_string(),
        reason,
    };
    if !destination.is_absolute() {
        return Err(err("destination must be an absolute path".into()));
    }
    let nul = |e: SpecError| err(e.reason());
    let target = join_inside(root, destination);
    let options = m.options().as_deref().unwrap_or(&[]);
    let (mut flags, propagation, data, bind_opt) = mount_options(options);
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
    let cgroup_bind = match cx.own_cgroup {
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
        let src = if let Some(rel) = cx.shared_mounts.get(&dest_key) {
            // A non-recursive `ro` volume (OCI `ro` without `rro`): the host
            // made its bind read-only at the top only, and virtio-fs
            // answers EROFS for it. Remounting it read-only here as well
            // would make its submounts read-only too: the guest mounts
            // each host submount when it is first walked (an automount),
            // with the flags of the mount it is found under. So the guest
            // leaves the bind writable and the host enforces `ro`; with
            // `rro` the host bind is read-only throughout, and so is this.
            if !options.iter().any(|o| o == "rro") {
                flags &= !libc::MS_RDONLY;
            }
            join_inside(cx.shared_dir, Path::new(rel))
        } else {
            source
                .clone()
                .ok_or_else(|| err("bind mount without a source".into()))?
        };
        let entry = fs
            .stat(&src)
            .map_err(|e| err(format!("source {}: {e}", src.display())))?;
        target_is_file = entry != super::fs::Entry::Dir;
        source = Some(src);
    }
    let mut mkdirs = dirs_to_create(root, &target).map_err(nul)?;
    if target_is_file {
        mkdirs.pop();
    }
    let data = if data.is_empty() {
        None
    } else {
        Some(cstr(data.join(",")).map_err(nul)?)
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
        ))
        .map_err(nul)?,
        source: match &source {
            Some(s) => Some(cpath(s).map_err(nul)?),
            None => Some(cstr(&fstype).map_err(nul)?),
        },
        target: cpath(&target).map_err(nul)?,
        fstype: if bind {
            None
        } else {
            Some(cstr(&fstype).map_err(nul)?)
        },
        flags,
        data,
        mkdirs,
        target_is_file,
        remount_flags,
        propagation,
    })
}
