//! Waiting for events instead of polling for them: a process's exit (a
//! pidfd), a file appearing in a directory (inotify), a wake-up from
//! another thread (an eventfd), several of them at once with a deadline.
//!
//! The waits are poll(2) over a handful of descriptors, rebuilt at each
//! call. epoll (or an event loop such as `event-manager`) pays off for many
//! long-lived descriptors registered once; here a wait has two to five, and
//! most of them live only for that wait, so a poll set is simpler and
//! leaves no kernel object to keep in step.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("opening a pidfd for process {pid}: {source}")]
    PidFdOpen { pid: u32, source: std::io::Error },
    #[error("duplicating a descriptor to wait on: {0}")]
    Dup(std::io::Error),
    #[error("waiting for events: {0}")]
    Poll(nix::Error),
    #[error("making an eventfd: {0}")]
    EventFd(nix::Error),
    #[error("watching directory {path}: {source}")]
    Inotify { path: PathBuf, source: nix::Error },
}

/// A process, by a descriptor that names it for as long as it is open (its
/// pid may be reused once it is reaped; the pidfd is not). Readable once
/// the process has exited, reaped or not.
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: u32,
}

impl PidFd {
    /// Opens a pidfd for `pid`. Race-free for a child not yet reaped (its
    /// pid cannot be reused before); for any other process the caller
    /// accepts that `pid` may already name another one.
    pub fn open(pid: u32) -> Result<PidFd, EventError> {
        let raw_pid = libc::pid_t::try_from(pid).map_err(|_| EventError::PidFdOpen {
            pid,
            source: std::io::Error::from_raw_os_error(libc::ESRCH),
        })?;
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd
        // or -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0u32) };
        if fd < 0 {
            return Err(EventError::PidFdOpen {
                pid,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: pidfd_open returned a new descriptor (with O_CLOEXEC,
        // always set on pidfds) that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(PidFd { fd, pid })
    }

    /// A pidfd received from another process (SCM_RIGHTS) that named it
    /// `pid`.
    pub fn from_owned(fd: OwnedFd, pid: u32) -> PidFd {
        PidFd { fd, pid }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has exited (without waiting).
    pub fn has_exited(&self) -> Result<bool, EventError> {
        Ok(wait_any(&[self.fd.as_fd()], Some(Instant::now()))?.is_some())
    }

    /// Waits up to `timeout` for the process to exit; true if it did. The
    /// exit status is left for the parent's wait(2).
    pub fn wait_timeout(&self, timeout: Duration) -> Result<bool, EventError> {
        Ok(wait_any(&[self.fd.as_fd()], Instant::now().checked_add(timeout))?.is_some())
    }

    /// Sends `signal` through the pidfd: to this process, never to one
    /// that reused its pid.
    pub fn send_signal(&self, signal: i32) {
        // SAFETY: pidfd_send_signal(2) on a pidfd we own, with no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
    }

    /// A second pidfd for the same process, for another thread.
    pub fn try_clone(&self) -> Result<PidFd, EventError> {
        Ok(PidFd {
            fd: self.fd.try_clone().map_err(EventError::Dup)?,
            pid: self.pid,
        })
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A flag one thread raises and others wait on (an eventfd that is written
/// once and never read: it stays readable). Clones share the flag.
#[derive(Debug)]
pub struct Flag {
    fd: OwnedFd,
}

impl Flag {
    pub fn new() -> Result<Flag, EventError> {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let fd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(EventError::EventFd)?;
        Ok(Flag { fd: fd.into() })
    }

    /// Raises the flag: every wait on it (or a clone) returns.
    pub fn raise(&self) {
        // A full counter (EAGAIN) means the flag is raised already.
        let _ = nix::unistd::write(&self.fd, &1u64.to_ne_bytes());
    }

    pub fn is_raised(&self) -> bool {
        matches!(
            wait_any(&[self.fd.as_fd()], Some(Instant::now())),
            Ok(Some(_))
        )
    }

    pub fn try_clone(&self) -> Result<Flag, EventError> {
        Ok(Flag {
            fd: self.fd.try_clone().map_err(EventError::Dup)?,
        })
    }
}

impl AsFd for Flag {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The poll timeout left until `deadline` (None: no deadline), rounded up
/// so that a wait never ends before its deadline.
fn timeout_until(deadline: Option<Instant>) -> PollTimeout {
    let Some(deadline) = deadline else {
        return PollTimeout::NONE;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = left.as_micros().div_ceil(1000);
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

/// Waits until one of `fds` is readable (or hung up, or in error), or
/// `deadline` passes. The index of the first ready one; None at the
/// deadline.
pub fn wait_any(
    fds: &[BorrowedFd<'_>],
    deadline: Option<Instant>,
) -> Result<Option<usize>, EventError> {
    let ready = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
    loop {
        let mut set: Vec<PollFd<'_>> = fds
            .iter()
            .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
            .collect();
        match nix::poll::poll(&mut set, timeout_until(deadline)) {
            Ok(0) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(None);
                }
            }
            Ok(_) => {
                return Ok(set
                    .iter()
                    .position(|p| p.revents().is_some_and(|r| r.intersects(ready))))
            }
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(EventError::Poll(e)),
        }
    }
}

/// Waits until every one of `fds` is readable, or `deadline` passes; true
/// if all were.
pub fn wait_all(fds: &[BorrowedFd<'_>], deadline: Option<Instant>) -> Result<bool, EventError> {
    let mut pending: Vec<BorrowedFd<'_>> = fds.to_vec();
    while !pending.is_empty() {
        match wait_any(&pending, deadline)? {
            Some(i) => {
                pending.swap_remove(i);
            }
            None => return Ok(false),
        }
    }
    Ok(true)
}

/// Watches a directory for entries made in it (created, or moved in).
pub struct DirWatch {
    inotify: nix::sys::inotify::Inotify,
}

impl DirWatch {
    pub fn new(dir: &Path) -> Result<DirWatch, EventError> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let err = |source| EventError::Inotify {
            path: dir.to_path_buf(),
            source,
        };
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).map_err(err)?;
        inotify
            .add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            .map_err(err)?;
        Ok(DirWatch { inotify })
    }

    /// Empties the queue of events (their names are not needed: the caller
    /// checks what it waits for after each wake-up).
    pub fn drain(&self) {
        while matches!(self.inotify.read_events(), Ok(ev) if !ev.is_empty()) {}
    }
}

impl Drop for DirWatch {
    /// The instance's last descriptor is closed on a thread of its own:
    /// closing an inotify instance that holds a watch waits for the kernel's
    /// mark reaper (a deferred work item, then an SRCU grace period: 5 to 16
    /// ms here), and every sandbox start drops two of these on its way to
    /// the VMM (`wait_for_socket`): 30 ms of each cold start. A duplicate
    /// goes to the thread, so the field's own close, right after this, is
    /// not the last one. Should neither the duplicate nor the thread be had,
    /// the close waits here as before.
    fn drop(&mut self) {
        if let Ok(last) = self.inotify.as_fd().try_clone_to_owned() {
            let _ = std::thread::Builder::new()
                .name("inotify-close".into())
                .spawn(move || drop(last));
        }
    }
}

impl AsFd for DirWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}

impl std::fmt::Debug for DirWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirWatch({})", self.inotify.as_fd().as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_pidfd_is_readable_when_its_child_exits() {
        let mut child = Command::new("/bin/sh")
            .args(["-c", "read x; exit 3"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pidfd = PidFd::open(child.id()).unwrap();
        assert!(!pidfd.has_exited().unwrap());
        let t = Instant::now();
        assert!(!pidfd.wait_timeout(Duration::from_millis(100)).unwrap());
        assert!(
            t.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        drop(child.stdin.take());
        assert!(pidfd.wait_timeout(Duration::from_secs(10)).unwrap());
        // Not reaped by the wait: the status is still the parent's.
        assert!(pidfd.has_exited().unwrap());
        assert_eq!(child.wait().unwrap().code(), Some(3));
        // A clone names the same (now reaped) process.
        assert!(pidfd.try_clone().unwrap().has_exited().unwrap());
    }

    #[test]
    fn a_pidfd_of_no_process_is_an_error() {
        let e = PidFd::open(u32::MAX).unwrap_err();
        assert!(e.to_string().contains("pidfd"), "{e}");
        // A pid that fits but names nobody (above the kernel's pid_max).
        assert!(PidFd::open(1 << 30).is_err());
    }

    #[test]
    fn wait_any_names_the_ready_fd_and_times_out_otherwise() {
        let (a, b, c) = (
            Flag::new().unwrap(),
            Flag::new().unwrap(),
            Flag::new().unwrap(),
        );
        let fds = [a.as_fd(), b.as_fd(), c.as_fd()];
        let t = Instant::now();
        let deadline = Instant::now() + Duration::from_millis(50);
        assert_eq!(wait_any(&fds, Some(deadline)).unwrap(), None);
        assert!(Instant::now() >= deadline);
        assert!(t.elapsed() < Duration::from_secs(5));
        // Raised from another thread while waiting without a deadline.
        let c2 = c.try_clone().unwrap();
        let raiser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c2.raise();
        });
        assert_eq!(wait_any(&fds, None).unwrap(), Some(2));
        raiser.join().unwrap();
        assert!(c.is_raised() && !a.is_raised());
        // Raised twice is still raised; b joins it.
        c.raise();
        b.raise();
        assert!(wait_all(&[b.as_fd(), c.as_fd()], Some(Instant::now())).unwrap());
        assert!(!wait_all(&fds, Some(Instant::now() + Duration::from_millis(10))).unwrap());
    }

    #[test]
    fn wait_all_waits_for_every_child() {
        let mut children: Vec<_> = [0, 1, 2]
            .iter()
            .map(|i| {
                Command::new("/bin/sh")
                    .args(["-c", &format!("sleep 0.{i}")])
                    .spawn()
                    .unwrap()
            })
            .collect();
        let pidfds: Vec<PidFd> = children
            .iter()
            .map(|c| PidFd::open(c.id()).unwrap())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = pidfds.iter().map(|p| p.as_fd()).collect();
        assert!(wait_all(&fds, Some(Instant::now() + Duration::from_secs(30))).unwrap());
        for c in &mut children {
            // Exited, so reaping does not block.
            assert!(c.try_wait().unwrap().is_some());
        }
    }

    #[test]
    fn a_dropped_dir_watch_closes_its_instance() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("husk-dirwatch-drop-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // /proc/self/fdinfo lists each watch of an open inotify instance
        // with the watched inode (hex): the directory is watched as long as
        // any descriptor of the instance is open.
        let ino = format!(" ino:{:x} ", std::fs::metadata(&dir).unwrap().ino());
        let watched = || {
            std::fs::read_dir("/proc/self/fdinfo")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .any(|t| {
                    t.lines()
                        .any(|l| l.starts_with("inotify") && l.contains(&ino))
                })
        };
        let watch = DirWatch::new(&dir).unwrap();
        assert!(watched());
        drop(watch);
        let deadline = Instant::now() + Duration::from_secs(5);
        while watched() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!watched(), "an inotify descriptor outlived its DirWatch");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_dir_watch_wakes_when_an_entry_appears() {
        let dir = std::env::temp_dir().join(format!("husk-dirwatch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let watch = DirWatch::new(&dir).unwrap();
        let soon = || Some(Instant::now() + Duration::from_millis(30));
        assert_eq!(wait_any(&[watch.as_fd()], soon()).unwrap(), None);
        let path = dir.join("s.sock");
        let maker = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                std::os::unix::net::UnixListener::bind(path).unwrap()
            })
        };
        assert_eq!(
            wait_any(
                &[watch.as_fd()],
                Some(Instant::now() + Duration::from_secs(10))
            )
            .unwrap(),
            Some(0)
        );
        let _listener = maker.join().unwrap();
        assert!(path.exists());
        watch.drain();
        assert_eq!(wait_any(&[watch.as_fd()], soon()).unwrap(), None);
        // A missing directory is named in the error.
        let e = DirWatch::new(&dir.join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
