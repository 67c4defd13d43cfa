//! User namespaces (`linux.namespaces` type user, `linux.uidMappings`,
//! `linux.gidMappings`).
//!
//! The container's process cannot create its own user namespace and still
//! be what the rest of the agent expects: a direct child of the agent, PID 2
//! of a pid namespace that the user namespace owns (proc can only be
//! mounted by a process with CAP_SYS_ADMIN over the pid namespace's owner).
//! The agent itself cannot enter a new user namespace either (it is
//! multi-threaded). So a short-lived helper, forked from the agent, makes
//! the namespaces: it unshares CLONE_NEWUSER (or joins the `path`) and, when
//! the container gets a new pid namespace, CLONE_NEWPID in the same call, so
//! that pid namespace is owned by the user namespace, and forks the pid
//! namespace's holder (its PID 1, see container.rs; a pid namespace cannot
//! be entered through /proc before it has one). The agent writes the
//! helper's uid_map and gid_map (from the initial namespace, so any mapping
//! is allowed and setgroups stays allowed), enters the holder's pid
//! namespace for its next fork (the container process, PID 2, a direct
//! child of the agent as without a user namespace), and that child joins
//! the user namespace through `/proc/<helper>/ns/user` before it creates
//! the other namespaces, which are therefore owned by it. The helper is
//! killed once the container process runs (the holder, orphaned, is then
//! the agent's, PID 1 of the guest); the namespaces live on in the
//! container's processes.

use crate::spec::SpecError;
use oci_spec::runtime::LinuxIdMapping;
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    /// The helper process could not be started or could not make the
    /// namespaces.
    #[error("creating the user namespace (linux.namespaces): {step}: {source}")]
    Helper {
        step: &'static str,
        source: std::io::Error,
    },
    /// The kernel refused a mapping.
    #[error("writing {field} to {path}: {source}")]
    WriteMap {
        field: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// The kernel's limit on lines in uid_map / gid_map.
const MAX_EXTENTS: usize = 340;

/// One line of a uid or gid map: `size` ids from `container` on map to
/// ids from `host` on in the parent (the guest's initial) namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMap {
    pub container: u32,
    pub host: u32,
    pub size: u32,
}

/// How the container gets its user namespace.
pub enum UserNs {
    /// The agent's (the guest's initial) user namespace.
    Inherit,
    /// A new one with these mappings.
    New { uid: Vec<IdMap>, gid: Vec<IdMap> },
    /// An existing one (`path`); the child joins it first.
    Join(CString),
}

impl UserNs {
    /// Container id → id in the guest's initial namespace. Ids of a joined
    /// namespace whose mappings are unknown are taken as they are.
    pub fn host_ids(&self, uid: u32, gid: u32) -> Option<(u32, u32)> {
        match self {
            UserNs::New { uid: u, gid: g } => Some((map_id(u, uid)?, map_id(g, gid)?)),
            UserNs::Join(path) => {
                match (joined_map(path, "uid_map"), joined_map(path, "gid_map")) {
                    (Some(u), Some(g)) => Some((map_id(&u, uid)?, map_id(&g, gid)?)),
                    _ => Some((uid, gid)),
                }
            }
            UserNs::Inherit => Some((uid, gid)),
        }
    }
}

/// The maps of a namespace joined by a `/proc/<pid>/ns/user` path (read
/// from `/proc/<pid>/<file>`); None for other paths.
fn joined_map(path: &CString, file: &str) -> Option<Vec<IdMap>> {
    use std::os::unix::ffi::OsStrExt;
    let ns = std::path::Path::new(std::ffi::OsStr::from_bytes(path.as_bytes()));
    read_proc_map(&ns.parent()?.parent()?.join(file))
}

/// The id `id` maps to, if a line covers it.
pub fn map_id(maps: &[IdMap], id: u32) -> Option<u32> {
    maps.iter().find_map(|m| {
        let offset = id.checked_sub(m.container)?;
        (offset < m.size).then(|| m.host + offset)
    })
}

/// The text written to uid_map / gid_map: one "container host size" line
/// per mapping, all in one write as the kernel requires.
pub fn map_text(maps: &[IdMap]) -> String {
    maps.iter()
        .map(|m| format!("{} {} {}\n", m.container, m.host, m.size))
        .collect()
}

/// Parses /proc/<pid>/uid_map or gid_map.
pub fn read_proc_map(path: &std::path::Path) -> Option<Vec<IdMap>> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .map(|l| {
            let mut f = l.split_whitespace().map(str::parse::<u32>);
            Some(IdMap {
                container: f.next()?.ok()?,
                host: f.next()?.ok()?,
                size: f.next()?.ok()?,
            })
        })
        .collect()
}

/// Validates a spec's mappings the way the kernel will (so `create`, not
/// `start`, fails on them): at most 340 lines, no empty or wrapping
/// range, no two ranges overlapping on either side.
pub fn maps_from_spec(field: &str, spec: &[LinuxIdMapping]) -> Result<Vec<IdMap>, SpecError> {
    if spec.len() > MAX_EXTENTS {
        return Err(SpecError::Invalid(format!(
            "{field}: {} mappings, the kernel takes at most {MAX_EXTENTS}",
            spec.len()
        )));
    }
    let mut maps: Vec<IdMap> = Vec::with_capacity(spec.len());
    for (i, m) in spec.iter().enumerate() {
        let map = IdMap {
            container: m.container_id(),
            host: m.host_id(),
            size: m.size(),
        };
        // The kernel refuses a range that wraps past 2^32-1.
        let fits = |first: u32| first.checked_add(map.size).is_some();
        if map.size == 0 || !fits(map.container) || !fits(map.host) {
            return Err(SpecError::Invalid(format!(
                "{field}[{i}]: containerID {} hostID {} size {} is empty or runs past 2^32-1",
                map.container, map.host, map.size
            )));
        }
        // Nor ranges that overlap, on either side.
        let overlap = |a: u32, b: u32, b_size: u32| {
            u64::from(a) < u64::from(b) + u64::from(b_size)
                && u64::from(b) < u64::from(a) + u64::from(map.size)
        };
        if let Some(j) = maps.iter().position(|p| {
            overlap(map.container, p.container, p.size) || overlap(map.host, p.host, p.size)
        }) {
            return Err(SpecError::Invalid(format!(
                "{field}[{i}] overlaps {field}[{j}]"
            )));
        }
        maps.push(map);
    }
    Ok(maps)
}

/// The user namespace part of a container's plan, from `linux`: `decl` is
/// what `linux.namespaces` says (None: no user namespace; Some(None): a new
/// one; Some(Some(path)): join). Mappings without a user namespace, a new
/// one without mappings, and a `process.user` the mappings do not cover
/// are refused, naming the field.
pub fn plan(
    linux: &oci_spec::runtime::Linux,
    decl: Option<Option<CString>>,
    process: &oci_spec::runtime::Process,
) -> Result<UserNs, SpecError> {
    let uid_spec = linux.uid_mappings().as_deref();
    let gid_spec = linux.gid_mappings().as_deref();
    let given = |m: Option<&[LinuxIdMapping]>| m.is_some_and(|m| !m.is_empty());
    match decl {
        None => {
            for (field, m) in [
                ("linux.uidMappings", uid_spec),
                ("linux.gidMappings", gid_spec),
            ] {
                if given(m) {
                    return Err(SpecError::Invalid(format!(
                        "{field}: mappings need a user namespace, and linux.namespaces has \
                         none of type user"
                    )));
                }
            }
            Ok(UserNs::Inherit)
        }
        Some(Some(path)) => {
            if given(uid_spec) || given(gid_spec) {
                // runc accepts mappings next to a path only when they are
                // the joined namespace's own; check that where they can be
                // read (/proc/<pid>/ns/user).
                for (field, m, name) in [
                    ("linux.uidMappings", uid_spec, "uid_map"),
                    ("linux.gidMappings", gid_spec, "gid_map"),
                ] {
                    let want = maps_from_spec(field, m.unwrap_or(&[]))?;
                    if joined_map(&path, name).as_deref() != Some(&want[..]) {
                        return Err(SpecError::Invalid(format!(
                            "{field}: the user namespace is joined by path (linux.namespaces), \
                             whose own mappings apply; these differ or cannot be read"
                        )));
                    }
                }
            }
            Ok(UserNs::Join(path))
        }
        Some(None) => {
            let uid = maps_from_spec("linux.uidMappings", uid_spec.unwrap_or(&[]))?;
            let gid = maps_from_spec("linux.gidMappings", gid_spec.unwrap_or(&[]))?;
            for (field, maps) in [("linux.uidMappings", &uid), ("linux.gidMappings", &gid)] {
                if maps.is_empty() {
                    return Err(SpecError::Invalid(format!(
                        "{field}: a new user namespace (linux.namespaces) needs mappings: \
                         without them no id, root included, exists in it"
                    )));
                }
            }
            // The set-up runs as the namespace's root (see spec.rs).
            if map_id(&uid, 0).is_none() || map_id(&gid, 0).is_none() {
                return Err(SpecError::Invalid(
                    "linux.uidMappings / linux.gidMappings: container uid and gid 0 must be \
                     mapped (the container is set up as the root of its user namespace, as \
                     runc does)"
                        .into(),
                ));
            }
            let user = process.user();
            if map_id(&uid, user.uid()).is_none() {
                return Err(SpecError::Invalid(format!(
                    "process.user.uid {} is not mapped by linux.uidMappings",
                    user.uid()
                )));
            }
            for g in
                std::iter::once(user.gid()).chain(user.additional_gids().iter().flatten().copied())
            {
                if map_id(&gid, g).is_none() {
                    return Err(SpecError::Invalid(format!(
                        "process.user gid {g} is not mapped by linux.gidMappings"
                    )));
                }
            }
            Ok(UserNs::New { uid, gid })
        }
    }
}

/// The helper process holding a container's new namespaces until its
/// process has joined them. Killed on drop.
pub struct Helper {
    pid: i32,
    /// PID 1 of the new pid namespace, until the caller takes it.
    holder: Option<i32>,
}

impl Helper {
    /// Whether a helper is needed: for a new user namespace (someone must
    /// write its maps before the container's process uses it), and for a
    /// new pid namespace that a joined user namespace must own.
    pub fn needed(user: &UserNs, new_pid_ns: bool) -> bool {
        match user {
            UserNs::Inherit => false,
            UserNs::New { .. } => true,
            UserNs::Join(_) => new_pid_ns,
        }
    }

    /// Forks the helper, lets it make the namespaces and, for a new user
    /// namespace, writes its maps.
    pub fn start(user: &UserNs, new_pid_ns: bool) -> Result<Helper, UsernsError> {
        let helper_err = |step| move |source| UsernsError::Helper { step, source };
        let join_fd = match user {
            UserNs::Join(path) => {
                // SAFETY: open of a prepared CString path.
                let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                if fd < 0 {
                    return Err(helper_err("opening the user namespace path")(
                        std::io::Error::last_os_error(),
                    ));
                }
                // SAFETY: the fd was just opened and is owned here.
                Some(unsafe { OwnedFd::from_raw_fd(fd) })
            }
            _ => None,
        };
        let mut flags = if new_pid_ns { libc::CLONE_NEWPID } else { 0 };
        if matches!(user, UserNs::New { .. }) {
            // In one unshare call the user namespace is made first and owns
            // the pid namespace made with it.
            flags |= libc::CLONE_NEWUSER;
        }
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| helper_err("creating a pipe")(e.into()))?;
        let join_raw = join_fd.as_ref().map_or(-1, |fd| fd.as_raw_fd());
        let ready_raw = ready_w.as_raw_fd();
        // SAFETY: fork; the child makes only raw syscalls and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(helper_err("fork")(std::io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: async-signal-safe syscalls only, in the forked child,
            // on fds inherited from the parent.
            unsafe { helper_main(join_raw, flags, ready_raw) }
        }
        let mut helper = Helper { pid, holder: None };
        drop(ready_w);
        let mut status = [0u8; 8];
        File::from(ready_r)
            .read_exact(&mut status)
            .map_err(helper_err("waiting for the helper"))?;
        let [e0, e1, e2, e3, h0, h1, h2, h3] = status;
        let errno = i32::from_ne_bytes([e0, e1, e2, e3]);
        let holder = i32::from_ne_bytes([h0, h1, h2, h3]);
        if holder > 0 {
            helper.holder = Some(holder);
        }
        if errno != 0 {
            let step = if join_raw >= 0 {
                "setns into the user namespace path / unshare(CLONE_NEWPID)"
            } else {
                "unshare(CLONE_NEWUSER)"
            };
            return Err(helper_err(step)(std::io::Error::from_raw_os_error(errno)));
        }
        if let UserNs::New { uid, gid } = user {
            for (field, file, maps) in [
                ("linux.uidMappings", "uid_map", uid),
                ("linux.gidMappings", "gid_map", gid),
            ] {
                let path = format!("/proc/{pid}/{file}");
                std::fs::write(&path, map_text(maps)).map_err(|source| UsernsError::WriteMap {
                    field,
                    path,
                    source,
                })?;
            }
        }
        Ok(helper)
    }

    /// The user namespace, as a path for the child to join.
    pub fn user_ns_path(&self) -> CString {
        // A number in a fixed text: no NUL byte.
        CString::new(format!("/proc/{}/ns/user", self.pid)).unwrap_or_default()
    }

    /// The new pid namespace: its holder's pid and a path to enter it.
    /// The holder then belongs to the caller (killed with the container,
    /// not with the helper).
    pub fn pid_ns(&mut self) -> Option<(i32, CString)> {
        let h = self.holder.take()?;
        Some((
            h,
            CString::new(format!("/proc/{h}/ns/pid")).unwrap_or_default(),
        ))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the helper this agent forked. It never exits on
        // its own (it waits for this), so its pid is not yet reaped nor
        // reused; the reaper collects it.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if let Some(h) = self.holder {
            kill_holder(h);
        }
    }
}

/// Kills a pid namespace holder the helper forked. Like the helper, a
/// holder only dies of SIGKILL from the agent, so its pid is still its own.
pub fn kill_holder(holder: i32) {
    // SAFETY: kill(2) of a holder that only dies of this.
    unsafe { libc::kill(holder, libc::SIGKILL) };
}

/// The helper: join or create the namespaces, fork the holder of a new pid
/// namespace, report the errno (0: none) and the holder's pid (0: none),
/// then wait to be killed (never exit: see `Drop`).
///
/// # Safety
/// Only in a freshly forked child.
unsafe fn helper_main(join_fd: libc::c_int, flags: libc::c_int, ready: libc::c_int) -> ! {
    // SAFETY: raw syscalls on inherited fds and integer arguments; the
    // holder's body is async-signal-safe too.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"husk-userns".as_ptr());
        let mut rc = 0;
        if join_fd >= 0 && libc::setns(join_fd, libc::CLONE_NEWUSER) < 0 {
            rc = -1;
        }
        if rc == 0 && flags != 0 && libc::unshare(flags) < 0 {
            rc = -1;
        }
        let mut holder = 0;
        if rc == 0 && flags & libc::CLONE_NEWPID != 0 {
            holder = libc::fork();
            if holder == 0 {
                crate::container::pidns_holder_main();
            }
            if holder < 0 {
                rc = -1;
                holder = 0;
            }
        }
        let errno = if rc < 0 { *libc::__errno_location() } else { 0 };
        let mut report = [0u8; 8];
        report[..4].copy_from_slice(&errno.to_ne_bytes());
        report[4..].copy_from_slice(&holder.to_ne_bytes());
        libc::write(ready, report.as_ptr().cast(), report.len());
        loop {
            libc::pause();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux(json: serde_json::Value) -> oci_spec::runtime::Linux {
        serde_json::from_value(json).unwrap()
    }

    fn process(uid: u32, gid: u32, extra: &[u32]) -> oci_spec::runtime::Process {
        serde_json::from_value(serde_json::json!({
            "user": {"uid": uid, "gid": gid, "additionalGids": extra},
            "args": ["sh"], "cwd": "/"
        }))
        .unwrap()
    }

    fn mapping(c: u32, h: u32, s: u32) -> serde_json::Value {
        serde_json::json!({"containerID": c, "hostID": h, "size": s})
    }

    #[test]
    fn ids_map_through_the_ranges() {
        let maps = [
            IdMap {
                container: 0,
                host: 1000,
                size: 10,
            },
            IdMap {
                container: 100,
                host: 5000,
                size: 1,
            },
        ];
        assert_eq!(map_id(&maps, 0), Some(1000));
        assert_eq!(map_id(&maps, 9), Some(1009));
        assert_eq!(map_id(&maps, 10), None);
        assert_eq!(map_id(&maps, 100), Some(5000));
        assert_eq!(map_text(&maps), "0 1000 10\n100 5000 1\n");
    }

    #[test]
    fn a_new_user_namespace_gets_validated_mappings() {
        let l = linux(serde_json::json!({
            "uidMappings": [mapping(0, 1000, 65536)],
            "gidMappings": [mapping(0, 1000, 65536)]
        }));
        match plan(&l, Some(None), &process(0, 0, &[5])).unwrap() {
            UserNs::New { uid, gid } => {
                assert_eq!(
                    uid,
                    vec![IdMap {
                        container: 0,
                        host: 1000,
                        size: 65536
                    }]
                );
                assert_eq!(gid.len(), 1);
            }
            _ => panic!("not a new user namespace"),
        }
    }

    #[test]
    fn bad_user_namespace_specs_name_the_field() {
        let both = serde_json::json!({
            "uidMappings": [mapping(0, 1000, 10)],
            "gidMappings": [mapping(0, 1000, 10)]
        });
        let cases: Vec<(
            serde_json::Value,
            Option<Option<CString>>,
            oci_spec::runtime::Process,
            &str,
        )> = vec![
            // Mappings without a user namespace.
            (both.clone(), None, process(0, 0, &[]), "linux.uidMappings"),
            (
                serde_json::json!({"gidMappings": [mapping(0, 1000, 10)]}),
                None,
                process(0, 0, &[]),
                "linux.gidMappings",
            ),
            // A new user namespace without mappings.
            (
                serde_json::json!({}),
                Some(None),
                process(0, 0, &[]),
                "linux.uidMappings",
            ),
            (
                serde_json::json!({"uidMappings": [mapping(0, 1000, 10)]}),
                Some(None),
                process(0, 0, &[]),
                "linux.gidMappings",
            ),
            // Bad ranges.
            (
                serde_json::json!({"uidMappings": [mapping(0, 1000, 0)], "gidMappings": [mapping(0, 1000, 1)]}),
                Some(None),
                process(0, 0, &[]),
                "linux.uidMappings[0]",
            ),
            (
                serde_json::json!({"uidMappings": [mapping(0, u32::MAX - 1, 2)], "gidMappings": [mapping(0, 1000, 1)]}),
                Some(None),
                process(0, 0, &[]),
                "linux.uidMappings[0]",
            ),
            (
                serde_json::json!({"uidMappings": [mapping(0, 1000, 10), mapping(5, 2000, 10)], "gidMappings": [mapping(0, 1000, 1)]}),
                Some(None),
                process(0, 0, &[]),
                "linux.uidMappings[1] overlaps",
            ),
            (
                serde_json::json!({"uidMappings": [mapping(0, 1000, 10), mapping(50, 1005, 1)], "gidMappings": [mapping(0, 1000, 1)]}),
                Some(None),
                process(0, 0, &[]),
                "linux.uidMappings[1] overlaps",
            ),
            // Root not mapped: the set-up runs as the namespace's root.
            (
                serde_json::json!({"uidMappings": [mapping(1, 1000, 10)], "gidMappings": [mapping(0, 1000, 10)]}),
                Some(None),
                process(1, 0, &[]),
                "uid and gid 0 must be mapped",
            ),
            // process.user outside the mappings.
            (
                both.clone(),
                Some(None),
                process(10, 0, &[]),
                "process.user.uid 10",
            ),
            (both.clone(), Some(None), process(0, 0, &[42]), "gid 42"),
        ];
        for (l, decl, p, want) in cases {
            let err = match plan(&linux(l.clone()), decl, &p) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{l} was accepted"),
            };
            assert!(err.contains(want), "{l}: {err}");
        }
    }

    fn ns_inode(path: &std::ffi::CStr) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let p = path.to_str().unwrap();
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .ino()
    }

    /// The user namespace owning a namespace (ioctl NS_GET_USERNS).
    fn owner_inode(path: &std::ffi::CStr) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let ns = File::open(path.to_str().unwrap()).unwrap();
        // SAFETY: NS_GET_USERNS (_IO(0xb7, 1)) on an nsfs fd returns a new fd.
        let fd = unsafe { libc::ioctl(ns.as_raw_fd(), 0xb701) };
        assert!(
            fd >= 0,
            "NS_GET_USERNS: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the fd was just returned to us.
        let owner = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        owner.metadata().unwrap().ino()
    }

    /// The helper as the agent uses it, on the host (as root, like the
    /// agent): a new user namespace with its maps owning a new pid
    /// namespace, then a second helper joining that user namespace by path
    /// for another pid namespace it owns.
    #[test]
    fn the_helper_makes_and_joins_user_namespaces() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test creates namespaces as the agent does: run it as root"
        );
        let maps = vec![IdMap {
            container: 0,
            host: 100_000,
            size: 65536,
        }];
        let new = UserNs::New {
            uid: maps.clone(),
            gid: maps.clone(),
        };
        let mut first = Helper::start(&new, true).unwrap();
        let user = first.user_ns_path();
        for file in ["uid_map", "gid_map"] {
            let path = format!("/proc/{}/{file}", first.pid);
            assert_eq!(
                read_proc_map(std::path::Path::new(&path)),
                Some(maps.clone())
            );
        }
        let (holder, pid_ns) = first.pid_ns().expect("a pid namespace holder");
        assert_ne!(ns_inode(&pid_ns), ns_inode(c"/proc/self/ns/pid"));
        assert_eq!(owner_inode(&pid_ns), ns_inode(&user));

        let mut second = Helper::start(&UserNs::Join(user.clone()), true).unwrap();
        assert_eq!(ns_inode(&second.user_ns_path()), ns_inode(&user));
        let (holder2, pid_ns2) = second.pid_ns().expect("a pid namespace holder");
        assert_ne!(ns_inode(&pid_ns2), ns_inode(&pid_ns));
        assert_eq!(owner_inode(&pid_ns2), ns_inode(&user));

        let helpers = [first.pid, second.pid];
        drop(first);
        drop(second);
        kill_holder(holder);
        kill_holder(holder2);
        for pid in helpers {
            let mut status = 0;
            // SAFETY: waitpid of a child this test forked (through start).
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        }
    }

    #[test]
    fn proc_maps_parse() {
        let dir = std::env::temp_dir().join(format!("husk-userns-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("uid_map"), "         0       1000      65536\n").unwrap();
        assert_eq!(
            read_proc_map(&dir.join("uid_map")),
            Some(vec![IdMap {
                container: 0,
                host: 1000,
                size: 65536
            }])
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
