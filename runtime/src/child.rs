//! Helper processes of a sandbox (VMM, device backends): spawned so that they
//! die with the process that owns the sandbox, and ended with a deadline.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::event::PidFd;

/// A named child process that is killed when dropped.
#[derive(Debug)]
pub struct HelperProcess {
    pub name: &'static str,
    child: Child,
    /// Readable once the process exits: what waits on it, here and in
    /// other threads (see `pidfd`), instead of polling.
    pidfd: PidFd,
    exited: Option<ExitStatus>,
}

/// Describes an exit status the way a user reads it.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended".into(),
    }
}

impl HelperProcess {
    /// Spawns `cmd` with stdout and stderr appended to `log`. The child gets
    /// SIGKILL if the spawning thread's process dies, and its own process
    /// group, so a terminal's Ctrl-C reaches the owner, which cleans up.
    pub fn spawn(
        name: &'static str,
        mut cmd: Command,
        log: &std::path::Path,
    ) -> std::io::Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: prctl and setpgid are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0
                    || libc::setpgid(0, 0) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        // Not yet reaped, so the pid is still this child's.
        let pidfd = match PidFd::open(child.id()) {
            Ok(p) => p,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::io::Error::other(e));
            }
        };
        Ok(HelperProcess {
            name,
            child,
            pidfd,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's pidfd (readable once it has exited), to wait on
    /// together with other events; `PidFd::try_clone` gives another thread
    /// its own.
    pub fn pidfd(&self) -> &PidFd {
        &self.pidfd
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `timeout` for the process to end on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_wait() {
            return Some(s);
        }
        // A failed poll counts as "not yet": the caller kills on None.
        if self.pidfd.wait_timeout(timeout).unwrap_or(false) {
            return self.try_wait();
        }
        None
    }

    /// Asks the process to stop (SIGTERM), then kills it after `grace`.
    pub fn stop(&mut self, grace: Duration) -> ExitStatus {
        if let Some(s) = self.try_wait() {
            return s;
        }
        // SAFETY: kill(2) on our own child's pid, which is not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if let Some(s) = self.wait_timeout(grace) {
            return s;
        }
        let _ = self.child.kill();
        let status = self.child.wait();
        let status = status.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(9));
        self.exited = Some(status);
        status
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
