//! The directory a sandbox exports to its guest through virtio-fs, built so
//! that a guest writing to it cannot steer what the host does.
//!
//! The guest is assumed hostile: anything it can write, it can turn into a
//! symlink or a directory at the moment the host walks that path (the class
//! of Kata's CVE-2020-2024/2026 and CVE-2020-28914). So the host never makes
//! a mount point, a file or a mount where the guest can write. Kata's layout:
//!
//! ```text
//! <sandbox>/host/                  host-only: every rootfs and bind mount is
//!           host/<cid>/rootfs        made here, by the host
//!           host/<cid>/mounts/<n>
//! <sandbox>/shared/                what virtiofsd exports: a bind of host/,
//!                                  read-only, nosuid, nodev; a slave of host/
//!                                  (so the mounts made there appear) and shared
//!                                  (so they reach virtiofsd's mount namespace)
//! ```
//!
//! The guest sees `shared/` and the directories in it read-only: it cannot
//! plant anything where the host will later create a container's
//! directories. Only the mounts inside (a container's rootfs, its rw
//! volumes) are writable, and the host never creates anything inside those.
//!
//! Every bind is made detached — `open_tree(OPEN_TREE_CLONE)` — given its
//! flags with `mount_setattr` (nosuid and nodev always, read-only as the spec
//! asks), and only then attached with `move_mount`: the copy that propagates
//! to the guest's view is read-only from its first instant, never a plain
//! rw bind remounted later. Mount points are reached with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`, so even
//! a directory that is not where it should be cannot lead out of `host/` or
//! into a mount.
//!
//! nix 0.29 has none of open_tree, move_mount, mount_setattr or openat2, so
//! they are called through libc here, each behind a safe wrapper.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// How read-only a shared bind is on the host (OCI `ro` vs `rro`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOnly {
    /// Writable (the spec's `rw`, or no option).
    No,
    /// The bind itself is read-only; mounts below it keep their own flags
    /// (OCI `ro`, as runc applies it).
    Top,
    /// The bind and every mount below it are read-only (OCI `rro`).
    Recursive,
}

impl ReadOnly {
    /// From a spec mount's options: the last of `ro`/`rw` wins, `rro` makes
    /// it recursive.
    pub fn from_options<S: AsRef<str>>(options: &[S]) -> ReadOnly {
        let mut ro = false;
        let mut rro = false;
        for o in options {
            match o.as_ref() {
                "ro" => ro = true,
                "rw" => ro = false,
                "rro" => rro = true,
                "rrw" => rro = false,
                _ => {}
            }
        }
        match (ro, rro) {
            (_, true) => ReadOnly::Recursive,
            (true, false) => ReadOnly::Top,
            (false, false) => ReadOnly::No,
        }
    }
}

/// Which way mounts propagate between a volume's host source and its bind
/// in the share (OCI `rprivate` vs `rslave`/`rshared`).
///
/// A bind never sends: the guest's mounts are made in the guest's kernel
/// and cannot reach the host, and a bind that sent would let husk's own
/// unmounts at teardown reach the source. So `rshared` is given as
/// `rslave`: the host's mounts under the source appear in the container,
/// nothing comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// Nothing propagates either way (`private`, `rprivate`, no option).
    Private,
    /// Mounts made under the source on the host later appear in the bind
    /// (`slave`, `rslave`, `shared`, `rshared`).
    FromHost,
}

impl Propagation {
    /// From a spec mount's options: the last propagation option wins.
    pub fn from_options<S: AsRef<str>>(options: &[S]) -> Propagation {
        let mut propagation = Propagation::Private;
        for o in options {
            match o.as_ref() {
                "private" | "rprivate" | "unbindable" | "runbindable" => {
                    propagation = Propagation::Private
                }
                "slave" | "rslave" | "shared" | "rshared" => propagation = Propagation::FromHost,
                _ => {}
            }
        }
        propagation
    }

    /// The `mount_attr.propagation` value for the detached copy.
    fn mount_attr(self) -> u64 {
        match self {
            Propagation::Private => libc::MS_PRIVATE,
            Propagation::FromHost => libc::MS_SLAVE,
        }
    }
}

/// How a volume is bound into the share: its read-only-ness and its
/// propagation, both from the spec mount's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindMode {
    pub readonly: ReadOnly,
    pub propagation: Propagation,
}

impl BindMode {
    pub fn from_options<S: AsRef<str>>(options: &[S]) -> BindMode {
        BindMode {
            readonly: ReadOnly::from_options(options),
            propagation: Propagation::from_options(options),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("share path {0:?} must be relative, without `..`")]
    BadPath(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ShareError + 'a {
    move |source| ShareError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The mode of every directory husk makes in the share, whatever the umask.
const DIR_MODE: u32 = 0o711;

/// A sandbox's share: the host-only tree and the guest's read-only view.
#[derive(Debug, Clone)]
pub struct Share {
    host: PathBuf,
    guest_view: PathBuf,
}

impl Share {
    /// The directory names under a sandbox's directory.
    pub const HOST: &'static str = "host";
    pub const GUEST_VIEW: &'static str = "shared";

    /// Makes `<dir>/host` and `<dir>/shared` as described in the module
    /// documentation. On error, what was made is undone.
    pub fn create(dir: &Path) -> Result<Share, ShareError> {
        let share = Share::at(dir);
        let made = share.make();
        if made.is_err() {
            let _ = share.remove();
        }
        made.map(|()| share)
    }

    /// The share of sandbox directory `dir`, as [`Share::create`] made it.
    pub fn at(dir: &Path) -> Share {
        Share {
            host: dir.join(Self::HOST),
            guest_view: dir.join(Self::GUEST_VIEW),
        }
    }

    fn make(&self) -> Result<(), ShareError> {
        use nix::mount::MsFlags;
        for d in [&self.host, &self.guest_view] {
            std::fs::create_dir(d).map_err(io("creating", d))?;
            // Searchable, not listable or writable, by anyone but root: a
            // container that is the root of a user namespace walks these
            // directories in the guest (which sees this mode) before its
            // pivot_root.
            set_mode(d, DIR_MODE)?;
        }
        // host/: a mount of its own in a peer group of its own (private
        // first, so it joins no peer group of the host's /).
        mount_flags(Some(&self.host), &self.host, MsFlags::MS_BIND)?;
        mount_flags(None, &self.host, MsFlags::MS_PRIVATE)?;
        mount_flags(None, &self.host, MsFlags::MS_SHARED)?;
        // shared/: a bind of host/ (a peer), turned slave (it receives
        // host/'s mounts, never sends), then shared again (so virtiofsd's
        // namespace, a slave copy taken at its start, receives them too).
        mount_flags(Some(&self.host), &self.guest_view, MsFlags::MS_BIND)?;
        mount_flags(None, &self.guest_view, MsFlags::MS_SLAVE)?;
        mount_flags(None, &self.guest_view, MsFlags::MS_SHARED)?;
        mount_flags(
            None,
            &self.guest_view,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
        )?;
        Ok(())
    }

    /// What virtiofsd exports.
    pub fn guest_view(&self) -> &Path {
        &self.guest_view
    }

    /// The host-only side, where mounts are made.
    pub fn host_dir(&self) -> &Path {
        &self.host
    }

    /// Binds `source` (a file or a directory, recursively) at `rel` under
    /// the share with nosuid, nodev and `mode`; returns `rel`.
    ///
    /// The copy open_tree makes of a shared mount is a peer of it, which
    /// would send both ways; it is made a slave of the source (or private)
    /// before it is attached, so nothing husk does to it, its teardown
    /// included, reaches the host's mounts.
    pub fn bind(&self, source: &Path, rel: &str, mode: BindMode) -> Result<String, ShareError> {
        let BindMode {
            readonly,
            propagation,
        } = mode;
        let meta = std::fs::metadata(source).map_err(io("bind source", source))?;
        let tree = open_tree_clone(source)?;
        let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
        if readonly == ReadOnly::Recursive {
            set |= libc::MOUNT_ATTR_RDONLY;
        }
        mount_setattr(&tree, set, propagation.mount_attr(), true, source)?;
        if readonly == ReadOnly::Top {
            mount_setattr(&tree, libc::MOUNT_ATTR_RDONLY, 0, false, source)?;
        }
        let target = self.mount_point(rel, meta.is_dir())?;
        move_mount(&tree, &target, &self.host.join(rel))?;
        Ok(rel.to_string())
    }

    /// Creates the mount point `rel` under host/ (its parents as
    /// directories), never following a symlink or leaving host/'s mount,
    /// and returns it opened O_PATH.
    fn mount_point(&self, rel: &str, dir: bool) -> Result<OwnedFd, ShareError> {
        let parts = components(rel)?;
        let Some((last, parents)) = parts.split_last() else {
            return Err(ShareError::BadPath(rel.into()));
        };
        let mut at = open_dir(&self.host)?;
        let mut walked = self.host.clone();
        for p in parents {
            walked.push(std::ffi::OsStr::from_bytes(p.as_bytes()));
            at = mkdir_beneath(&at, p, &walked)?;
        }
        walked.push(std::ffi::OsStr::from_bytes(last.as_bytes()));
        if dir {
            mkdir_beneath(&at, last, &walked)
        } else {
            create_file_beneath(&at, last, &walked)
        }
    }

    /// Detaches every mount at or below `rel` (in host/ and, should one be
    /// left, in the guest's view) and removes the host-only directories.
    pub fn remove_below(&self, rel: &str) -> Result<(), ShareError> {
        components(rel)?;
        for base in [&self.host, &self.guest_view] {
            unmount_below(&base.join(rel))?;
        }
        remove_tree(&self.host.join(rel))
    }

    /// Detaches everything and removes both directories.
    pub fn remove(&self) -> Result<(), ShareError> {
        // The view first: it is a slave of host/, and host/ then has no
        // mount left below it that propagation could re-create.
        unmount_below(&self.guest_view)?;
        unmount_below(&self.host)?;
        for d in [&self.guest_view, &self.host] {
            remove_tree(d)?;
        }
        Ok(())
    }
}

/// `sandbox::remove_tree_same_fs` (never crossing into a mount), its error
/// as this module's.
fn remove_tree(dir: &Path) -> Result<(), ShareError> {
    crate::sandbox::remove_tree_same_fs(dir).map_err(|e| ShareError::Io {
        what: "removing",
        path: dir.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// `rel`'s normal components; anything else (absolute, `..`, `.`) refused.
fn components(rel: &str) -> Result<Vec<CString>, ShareError> {
    let path = Path::new(rel);
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(
                CString::new(n.as_bytes()).map_err(|_| ShareError::BadPath(rel.to_string()))?,
            ),
            _ => return Err(ShareError::BadPath(rel.to_string())),
        }
    }
    if out.is_empty() {
        return Err(ShareError::BadPath(rel.to_string()));
    }
    Ok(out)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ShareError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("setting the mode of", path))
}

fn mount_flags(
    source: Option<&Path>,
    target: &Path,
    flags: nix::mount::MsFlags,
) -> Result<(), ShareError> {
    nix::mount::mount(source, target, None::<&str>, flags, None::<&str>).map_err(|e| {
        ShareError::Io {
            what: "mounting",
            path: target.to_path_buf(),
            source: e.into(),
        }
    })
}

fn cpath(path: &Path) -> Result<CString, ShareError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| ShareError::BadPath(path.display().to_string()))
}

/// Takes ownership of a file descriptor a syscall returned, or its error.
fn owned(fd: libc::c_long, what: &'static str, path: &Path) -> Result<OwnedFd, ShareError> {
    if fd < 0 {
        return Err(io(what, path)(std::io::Error::last_os_error()));
    }
    let fd = RawFd::try_from(fd)
        .map_err(|_| io(what, path)(std::io::Error::other("file descriptor out of range")))?;
    // SAFETY: the kernel just returned `fd` to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir(path: &Path) -> Result<OwnedFd, ShareError> {
    let c = cpath(path)?;
    // SAFETY: `c` is a valid C string; open returns a new fd or -1.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    owned(fd.into(), "opening", path)
}

/// A path the guest will mount on (or change into) inside a rootfs that is
/// shared read-only (`root.readonly`): the host makes it before the share,
/// since the guest can no longer write there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPoint {
    /// Absolute, inside the container's root.
    pub path: PathBuf,
    /// A file (a bind of a file), not a directory.
    pub file: bool,
}

/// The mount points the guest needs in the rootfs itself, in spec order:
/// `mounts` gives each destination with, for a bind, its host source (to
/// tell a file from a directory). A destination below an earlier one is
/// made by the guest inside that mount (`/dev/pts` in the `/dev` tmpfs), not
/// in the rootfs; so is a `cwd` below a mount.
pub fn rootfs_mount_points<'a>(
    mounts: impl IntoIterator<Item = (&'a str, Option<&'a Path>)>,
    cwd: Option<&str>,
) -> Vec<MountPoint> {
    let mut points: Vec<MountPoint> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    let below_a_mount =
        |seen: &[PathBuf], p: &Path| seen.iter().any(|m| p != m.as_path() && p.starts_with(m));
    for (destination, bind_source) in mounts {
        let path = Path::new("/").join(destination);
        if !below_a_mount(&seen, &path) && path != Path::new("/") {
            let file = bind_source.is_some_and(|s| s.metadata().is_ok_and(|m| !m.is_dir()));
            points.push(MountPoint {
                path: path.clone(),
                file,
            });
        }
        seen.push(path);
    }
    if let Some(cwd) = cwd {
        let path = Path::new("/").join(cwd);
        if !below_a_mount(&seen, &path) && !seen.contains(&path) && path != Path::new("/") {
            points.push(MountPoint { path, file: false });
        }
    }
    points
}

/// Makes `points` in `rootfs` where they are missing, as the guest would
/// have: every path resolved from the rootfs with `RESOLVE_IN_ROOT` (an
/// absolute symlink in the image means the image's path, never the
/// host's), no magic links, no crossing into another mount. A point that
/// cannot be made (a dangling link, a file where a directory goes) is
/// left: the guest then reports it, as it does today.
pub fn make_mount_points(rootfs: &Path, points: &[MountPoint]) -> Result<(), ShareError> {
    let root = open_dir(rootfs)?;
    for point in points {
        if let Err(e) = make_mount_point(&root, rootfs, point) {
            log::warn!(
                "mount point {} in {}: {e}",
                point.path.display(),
                rootfs.display()
            );
        }
    }
    Ok(())
}

fn make_mount_point(root: &OwnedFd, rootfs: &Path, point: &MountPoint) -> Result<(), ShareError> {
    let names: Vec<&std::ffi::OsStr> = point
        .path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    if point.path.components().any(|c| c == Component::ParentDir) {
        return Err(ShareError::BadPath(point.path.display().to_string()));
    }
    let shown = rootfs.join(point.path.strip_prefix("/").unwrap_or(&point.path));
    let prefix = |n: usize| -> Result<CString, ShareError> {
        let rel: PathBuf = names[..n].iter().collect();
        cpath(if n == 0 { Path::new(".") } else { &rel })
    };
    for i in 1..=names.len() {
        let last = i == names.len();
        let want_file = last && point.file;
        let flags = if want_file {
            libc::O_PATH
        } else {
            libc::O_PATH | libc::O_DIRECTORY
        };
        match openat2_in_root(root, &prefix(i)?, flags, 0, &shown) {
            Ok(_) => continue,
            Err(ShareError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let parent = openat2_in_root(
            root,
            &prefix(i - 1)?,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            &shown,
        )?;
        let name = cpath(Path::new(names[i - 1]))?;
        // SAFETY: `parent` is an open directory fd and `name` one plain
        // component (no slash), so nothing is resolved.
        let rc = unsafe {
            if want_file {
                let fd = libc::openat(
                    parent.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_WRONLY
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    0o644,
                );
                if fd >= 0 {
                    libc::close(fd);
                }
                fd.min(0)
            } else {
                libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755)
            }
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // A dangling symlink in the image: the guest reports it.
            return Err(io("making the mount point", &shown)(e));
        }
    }
    Ok(())
}

/// openat2 resolving inside `root` as the root directory (an image's
/// symlinks stay in the image), no magic links, no other mount.
fn openat2_in_root(
    root: &OwnedFd,
    name: &CString,
    flags: libc::c_int,
    mode: libc::mode_t,
    path: &Path,
) -> Result<OwnedFd, ShareError> {
    openat2_resolving(
        root,
        name,
        flags | libc::O_CLOEXEC,
        mode,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV,
        path,
    )
}

/// openat2 below `dir`: no symlink, no `..` escape, no other mount.
fn openat2_beneath(
    dir: &OwnedFd,
    name: &CString,
    flags: libc::c_int,
    mode: libc::mode_t,
    path: &Path,
) -> Result<OwnedFd, ShareError> {
    openat2_resolving(
        dir,
        name,
        flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        mode,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_XDEV,
        path,
    )
}

fn openat2_resolving(
    dir: &OwnedFd,
    name: &CString,
    flags: libc::c_int,
    mode: libc::mode_t,
    resolve: u64,
    path: &Path,
) -> Result<OwnedFd, ShareError> {
    // SAFETY: open_how is plain data; all-zero is its valid default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.mode = u64::from(mode);
    how.resolve = resolve;
    // SAFETY: `dir` is an open fd, `name` a valid C string, `how` a valid
    // open_how of the size passed; openat2 returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    owned(fd, "opening", path)
}

/// `name` as a directory below `dir` (made if missing, mode [`DIR_MODE`]),
/// opened O_PATH.
fn mkdir_beneath(dir: &OwnedFd, name: &CString, path: &Path) -> Result<OwnedFd, ShareError> {
    // SAFETY: `dir` is an open fd and `name` a valid C string.
    let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), DIR_MODE) };
    let made = rc == 0;
    if !made {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(io("creating", path)(e));
        }
    }
    let fd = openat2_beneath(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0, path)?;
    if made {
        // mkdirat applied the umask. chmod through the O_PATH descriptor's
        // /proc link reaches exactly the directory just opened.
        set_mode(
            Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())),
            DIR_MODE,
        )?;
    }
    Ok(fd)
}

/// `name` as a regular file below `dir` (made if missing), opened O_PATH.
fn create_file_beneath(dir: &OwnedFd, name: &CString, path: &Path) -> Result<OwnedFd, ShareError> {
    // O_PATH cannot create: create with a real open, then reopen O_PATH.
    drop(openat2_beneath(
        dir,
        name,
        libc::O_CREAT | libc::O_WRONLY,
        0o644,
        path,
    )?);
    openat2_beneath(dir, name, libc::O_PATH, 0, path)
}

/// A detached recursive copy of the mount tree at `source`.
fn open_tree_clone(source: &Path) -> Result<OwnedFd, ShareError> {
    let c = cpath(source)?;
    let flags =
        libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: `c` is a valid C string; open_tree returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    owned(fd, "cloning the mount tree of", source)
}

/// Sets `set` and `propagation` (0: unchanged) on the detached tree `tree`
/// (its root only, or recursively).
fn mount_setattr(
    tree: &OwnedFd,
    set: u64,
    propagation: u64,
    recursive: bool,
    source: &Path,
) -> Result<(), ShareError> {
    // SAFETY: mount_attr is plain data; all-zero means "change nothing".
    let mut attr: libc::mount_attr = unsafe { std::mem::zeroed() };
    attr.attr_set = set;
    attr.propagation = propagation;
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    let empty = c"";
    // SAFETY: `tree` is an open fd, `empty` a valid C string, `attr` a valid
    // mount_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        return Err(io("setting mount flags of", source)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Attaches the detached tree `tree` on the mount point `target`.
fn move_mount(tree: &OwnedFd, target: &OwnedFd, path: &Path) -> Result<(), ShareError> {
    let empty = c"";
    // SAFETY: both fds are open, `empty` is a valid C string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(io("mounting on", path)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo,
/// whose paths escape space, tab, newline and backslash as octal).
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

fn unescape_mountinfo(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if let (b'\\', Some(&[a, b, c])) = (bytes[i], bytes.get(i + 1..i + 4)) {
            if [a, b, c].iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = u32::from(a - b'0') * 64 + u32::from(b - b'0') * 8 + u32::from(c - b'0');
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Detaches every mount at or below `dir`, deepest first, never following
/// a symlink at the mount point (UMOUNT_NOFOLLOW).
pub fn unmount_below(dir: &Path) -> Result<(), ShareError> {
    use nix::mount::MntFlags;
    for m in mounts_below(dir) {
        match nix::mount::umount2(&m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(io("unmounting", &m)(e.into())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_follows_the_last_option() {
        assert_eq!(ReadOnly::from_options::<&str>(&[]), ReadOnly::No);
        assert_eq!(ReadOnly::from_options(&["rbind", "ro"]), ReadOnly::Top);
        assert_eq!(ReadOnly::from_options(&["ro", "rw"]), ReadOnly::No);
        assert_eq!(ReadOnly::from_options(&["rro"]), ReadOnly::Recursive);
        assert_eq!(ReadOnly::from_options(&["ro", "rro", "rrw"]), ReadOnly::Top);
    }

    #[test]
    fn propagation_is_from_the_host_only_and_follows_the_last_option() {
        assert_eq!(Propagation::from_options::<&str>(&[]), Propagation::Private);
        assert_eq!(
            Propagation::from_options(&["rbind", "rprivate", "ro"]),
            Propagation::Private
        );
        for from_host in ["rslave", "slave", "rshared", "shared"] {
            assert_eq!(
                Propagation::from_options(&["rbind", from_host]),
                Propagation::FromHost,
                "{from_host}"
            );
        }
        assert_eq!(
            Propagation::from_options(&["rshared", "rprivate"]),
            Propagation::Private
        );
        // Never a peer (MS_SHARED): nothing goes back to the host.
        assert_eq!(Propagation::FromHost.mount_attr(), libc::MS_SLAVE);
        assert_eq!(Propagation::Private.mount_attr(), libc::MS_PRIVATE);
        assert_eq!(
            BindMode::from_options(&["rbind", "rslave", "ro"]),
            BindMode {
                readonly: ReadOnly::Top,
                propagation: Propagation::FromHost
            }
        );
    }

    #[test]
    fn share_paths_are_relative_and_never_climb() {
        for bad in ["", "/etc", "a/../../etc", "..", "./x"] {
            assert!(components(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(components("c1/mounts/3").map(|c| c.len()).ok(), Some(3));
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(
            unescape_mountinfo(r"/run/a\040b\011c\134d"),
            PathBuf::from("/run/a b\tc\\d")
        );
        assert_eq!(unescape_mountinfo(r"/x\9"), PathBuf::from(r"/x\9"));
    }

    #[test]
    fn rootfs_mount_points_skip_what_lies_in_an_earlier_mount() {
        let dir = std::env::temp_dir().join(format!("husk-mp-list-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hosts");
        std::fs::write(&file, "").unwrap();
        let points = rootfs_mount_points(
            [
                ("/proc", None),
                ("/dev", None),
                ("/dev/pts", None),
                ("/etc/hosts", Some(file.as_path())),
                ("/data", Some(dir.as_path())),
                ("/data/sub", None),
                ("sys", None),
            ],
            Some("/work/here"),
        );
        let got: Vec<(String, bool)> = points
            .iter()
            .map(|p| (p.path.display().to_string(), p.file))
            .collect();
        assert_eq!(
            got,
            [
                ("/proc".to_string(), false),
                ("/dev".into(), false),
                ("/etc/hosts".into(), true),
                ("/data".into(), false),
                ("/sys".into(), false),
                ("/work/here".into(), false),
            ]
        );
        // A cwd inside a mount is the guest's to make.
        assert!(rootfs_mount_points([("/tmp", None)], Some("/tmp/x")).len() == 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mount_points_are_made_inside_the_image_never_outside() {
        let base = std::env::temp_dir().join(format!("husk-mp-make-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let rootfs = base.join("rootfs");
        let outside = base.join("outside");
        std::fs::create_dir_all(rootfs.join("run")).unwrap();
        std::fs::create_dir_all(rootfs.join("var")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // The image's absolute links mean the image's paths.
        std::os::unix::fs::symlink("/run", rootfs.join("var/run")).unwrap();
        std::os::unix::fs::symlink(&outside, rootfs.join("escape")).unwrap();
        std::os::unix::fs::symlink("../../../..", rootfs.join("up")).unwrap();
        std::os::unix::fs::symlink("/nowhere/file", rootfs.join("dangling")).unwrap();
        let points = [
            MountPoint {
                path: "/var/run/secrets/token".into(),
                file: true,
            },
            MountPoint {
                path: "/escape/made-by-host".into(),
                file: false,
            },
            MountPoint {
                path: "/up/tmp/husk-up".into(),
                file: false,
            },
            MountPoint {
                path: "/dangling".into(),
                file: false,
            },
            MountPoint {
                path: "/new/deep/dir".into(),
                file: false,
            },
            MountPoint {
                path: "/etc/hostname".into(),
                file: true,
            },
        ];
        make_mount_points(&rootfs, &points).unwrap();
        assert!(rootfs.join("run/secrets/token").is_file());
        // The host-absolute link resolved inside the image.
        assert!(rootfs.join("escape").is_symlink());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // Its in-image target does not exist: left for the guest to report.
        assert!(rootfs.join("tmp/husk-up").is_dir());
        assert!(!Path::new("/tmp/husk-up").exists());
        assert!(rootfs.join("new/deep/dir").is_dir());
        assert!(rootfs.join("etc/hostname").is_file());
        assert!(!Path::new("/nowhere").exists());
        let _ = std::fs::remove_dir_all(&base);
    }
}
