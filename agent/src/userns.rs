//! The user namespace helper: how the agent makes a container's user
//! namespace (the mappings were checked by the planner,
//! `husk_agent::plan::userns`).
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
//! namespace's holder (its PID 1, see pidns.rs; a pid namespace cannot
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

use crate::pidns::kill_holder;
use husk_agent::plan::userns::{map_text, UserNs};
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
        // Only its two fds stay: it lives as long as its container is
        // created, and must not keep another launch's pipes open (their
        // EOF tells the agent a child exec'd or failed).
        close_all_but(join_fd, ready);
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
                crate::pidns::holder_main();
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

/// Closes every fd but `a` and `b` (either may be -1).
///
/// # Safety
/// Only in a freshly forked child: raw syscalls only.
unsafe fn close_all_but(a: libc::c_int, b: libc::c_int) {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    let mut next: libc::c_int = 0;
    for keep in [low, high] {
        if keep < 0 {
            continue;
        }
        if keep > next {
            // SAFETY: close_range(2) of fds this child does not use.
            unsafe { libc::syscall(libc::SYS_close_range, next as u32, (keep - 1) as u32, 0u32) };
        }
        next = keep + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, next as u32, u32::MAX, 0u32) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_agent::plan::userns::{parse_id_map, IdMap};

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
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(parse_id_map(&text), Some(maps.clone()));
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
}
