//! Child processes and the reaper.
//!
//! As PID 1 the agent must reap every zombie, its own children and orphans
//! re-parented to it. One thread does all reaping on SIGCHLD. It takes the
//! spawn lock first, which the launcher holds only across a fork and the
//! registration of the new pid (never while a child sets up, parks or
//! execs), so a child is always registered as tracked before it can be
//! reaped: one that exits at once is still waited for.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal.
    pub exit_code: i32,
    /// Terminating signal, 0 for a normal exit.
    pub signal: u32,
    pub exited_at_unix_ns: u64,
    /// CLOCK_MONOTONIC when the reaper collected it (for the wait's steps).
    pub reaped_ns: u64,
}

impl ExitInfo {
    fn from_status(status: WaitStatus) -> Option<(i32, Self)> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        match status {
            WaitStatus::Exited(pid, code) => Some((
                pid.as_raw(),
                ExitInfo {
                    exit_code: code,
                    signal: 0,
                    exited_at_unix_ns: now,
                    reaped_ns: crate::child::now_ns(),
                },
            )),
            WaitStatus::Signaled(pid, sig, _) => Some((
                pid.as_raw(),
                ExitInfo {
                    exit_code: 128 + sig as i32,
                    signal: sig as u32,
                    exited_at_unix_ns: now,
                    reaped_ns: crate::child::now_ns(),
                },
            )),
            _ => None,
        }
    }
}

#[derive(Default)]
struct ReaperState {
    tracked: HashSet<i32>,
    exited: HashMap<i32, ExitInfo>,
}

/// Reaps all children and hands exit statuses of tracked ones to waiters.
pub struct Reaper {
    spawn_lock: Mutex<()>,
    state: Mutex<ReaperState>,
    exited: Condvar,
}

/// Blocks SIGCHLD in the calling thread (call before any thread starts).
pub fn block_sigchld() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.thread_block()
}

impl Reaper {
    pub fn start() -> nix::Result<Arc<Self>> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        // Close-on-exec: container processes must not inherit it.
        let sigfd = SignalFd::with_flags(&set, nix::sys::signalfd::SfdFlags::SFD_CLOEXEC)?;
        let reaper = Arc::new(Reaper {
            spawn_lock: Mutex::new(()),
            state: Mutex::new(ReaperState::default()),
            exited: Condvar::new(),
        });
        let r = Arc::clone(&reaper);
        std::thread::spawn(move || loop {
            // Reap first: a child may have exited before the signalfd existed.
            r.reap_all();
            if let Err(e) = sigfd.read_signal() {
                eprintln!("husk-agent: reaper: reading signalfd: {e}");
            }
        });
        Ok(reaper)
    }

    /// Holds off reaping while a child is forked and registered; held for
    /// no longer than that.
    pub fn spawn_guard(&self) -> MutexGuard<'_, ()> {
        self.spawn_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `pid` as one whose exit status somebody will wait for. Call
    /// with the spawn guard held.
    pub fn track(&self, pid: i32) {
        self.lock_state().tracked.insert(pid);
    }

    fn lock_state(&self) -> MutexGuard<'_, ReaperState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reap_all(&self) {
        let _spawning = self.spawn_guard();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    if let Some((pid, info)) = ExitInfo::from_status(status) {
                        let mut state = self.lock_state();
                        if state.tracked.remove(&pid) {
                            state.exited.insert(pid, info);
                            self.exited.notify_all();
                        }
                    }
                }
            }
        }
    }

    /// Blocks until tracked `pid` has exited.
    pub fn wait(&self, pid: i32) -> ExitInfo {
        let mut state = self.lock_state();
        loop {
            if let Some(info) = state.exited.get(&pid) {
                return *info;
            }
            state = self.exited.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The exit status of `pid` if it has exited.
    pub fn try_wait(&self, pid: i32) -> Option<ExitInfo> {
        self.lock_state().exited.get(&pid).copied()
    }

    /// Forgets a process whose status is no longer needed.
    pub fn forget(&self, pid: i32) {
        let mut state = self.lock_state();
        state.exited.remove(&pid);
        state.tracked.remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the process of its own that `exits_before_tracking_are_not_lost`
    /// runs its scenario in.
    const OWN_PROCESS: &str = "HUSK_REAPER_TEST_OWN_PROCESS";

    /// A reaper without its SIGCHLD thread: the test drives `reap_all`.
    fn unstarted() -> Arc<Reaper> {
        Arc::new(Reaper {
            spawn_lock: Mutex::new(()),
            state: Mutex::new(ReaperState::default()),
            exited: Condvar::new(),
        })
    }

    /// The state letter of `pid` in /proc/<pid>/stat ('Z': a zombie).
    fn proc_state(pid: i32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.chars().next()
    }

    /// The launcher's race: a child that exits before its pid is tracked
    /// (the fork and the `track` are under the spawn guard, which the
    /// reaper takes too) still has its status kept for `wait`.
    #[test]
    #[ignore = "run by exits_before_tracking_are_not_lost, in a process of its own"]
    fn exit_before_tracking_scenario() {
        assert!(
            std::env::var_os(OWN_PROCESS).is_some(),
            "reaps every child of its process: run exits_before_tracking_are_not_lost instead"
        );
        let reaper = unstarted();
        let guard = reaper.spawn_guard();
        // SAFETY: fork; the child only calls _exit(2).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the forked child: exit at once.
            unsafe { libc::_exit(7) };
        }
        assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
        let r = Arc::clone(&reaper);
        let reaping = std::thread::spawn(move || r.reap_all());
        // The child is a zombie before it is tracked: the race. Its pidfd
        // is readable once it has exited.
        // SAFETY: pidfd_open of our child, not reaped (the reaper waits for
        // the guard).
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) } as i32;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let mut pfd = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll of one valid pollfd, then closing the pidfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        // SAFETY: closing the pidfd opened above.
        unsafe { libc::close(pidfd) };
        assert_eq!(
            ready,
            1,
            "child {pid} did not exit: state {:?}",
            proc_state(pid)
        );
        assert_eq!(proc_state(pid), Some('Z'));
        // The reaper waits for the guard: the zombie is still unreaped. (A
        // real wait: giving a wrong reaper the time to do wrong.)
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(proc_state(pid), Some('Z'), "reaped under the spawn guard");
        reaper.track(pid);
        drop(guard);
        reaping.join().expect("reaping thread");
        let info = reaper
            .try_wait(pid)
            .expect("the exit of a child tracked late was lost");
        assert_eq!((info.exit_code, info.signal), (7, 0));
        assert_eq!(reaper.wait(pid), info);
        reaper.forget(pid);
        assert_eq!(reaper.try_wait(pid), None);
    }

    #[test]
    fn exits_before_tracking_are_not_lost() {
        let exe = std::env::current_exe().expect("the test binary");
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "process::tests::exit_before_tracking_scenario",
                "--ignored",
                "--test-threads=1",
            ])
            .env(OWN_PROCESS, "1")
            .output()
            .expect("running the scenario in a process of its own");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "scenario failed:\n{text}");
        assert!(text.contains("1 passed"), "scenario did not run:\n{text}");
    }
}
