//! Helper processes of a sandbox (VMM, device backends): spawned so that they
//! die with the process that owns the sandbox, and ended with a deadline.
//!
//! A helper may also be adopted (a pooled sandbox claimed by a container's
//! owner, see `pool`): then this process is not its parent, holds only a
//! pidfd of it, signals it through that pidfd and learns of its end by it;
//! the exit status is the parent's (the pool's keeper), which records it in
//! a file for the owner (`record_exit`, `ended`).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::event::PidFd;
use std::os::fd::AsFd;

/// A named child process that is killed when dropped.
#[derive(Debug)]
pub struct HelperProcess {
    pub name: &'static str,
    /// None for an adopted helper (not our child).
    child: Option<Child>,
    pid: u32,
    /// Where an adopted helper's parent records how it ended (see
    /// `exit_record`).
    exit_record: Option<std::path::PathBuf>,
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
        let spawner = std::process::id() as libc::pid_t;
        // SAFETY: prctl, getppid, setpgid and sigprocmask are
        // async-signal-safe. No signal blocked: a spawner that reads its
        // signals from a signalfd (the pool's keeper) blocks them, and a
        // helper must still stop on SIGTERM.
        unsafe {
            cmd.pre_exec(move || {
                let empty: libc::sigset_t = std::mem::zeroed();
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0
                    || libc::setpgid(0, 0) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // A spawner that died before the line above left nothing to
                // send the signal: the helper would outlive it for good.
                if libc::getppid() != spawner {
                    // ESRCH: no allocation between fork and exec.
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
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
            pid: child.id(),
            child: Some(child),
            pidfd,
            exited: None,
            exit_record: None,
        })
    }

    /// A helper another process spawned and still parents, known by a
    /// pidfd (received from that parent, so it names the right process).
    /// That parent writes how the helper ended to `exit_record` once it
    /// reaps it (see `record_exit`).
    pub fn adopt(name: &'static str, pidfd: PidFd, exit_record: std::path::PathBuf) -> Self {
        HelperProcess {
            name,
            pid: pidfd.pid(),
            child: None,
            pidfd,
            exited: None,
            exit_record: Some(exit_record),
        }
    }

    /// The file in `dir` where the parent of helper `pid` records its end
    /// for the owner that adopted it.
    pub fn exit_record(dir: &std::path::Path, pid: u32) -> std::path::PathBuf {
        dir.join(format!("exit-{pid}"))
    }

    /// Reaps the helper if it has ended, and records how in `dir` for the
    /// owner that adopted it (the pool's keeper does this).
    pub fn record_exit(&mut self, dir: &std::path::Path) -> Option<ExitStatus> {
        let status = self.try_wait()?;
        if self.is_child() {
            // Whole or not at all: written aside, then renamed in.
            let record = Self::exit_record(dir, self.pid);
            let partial = record.with_extension("partial");
            if std::fs::write(&partial, describe(status)).is_ok() {
                let _ = std::fs::rename(&partial, &record);
            }
        }
        Some(status)
    }

    /// Whether this process spawned the helper (false: adopted).
    pub fn is_child(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process's pidfd (readable once it has exited), to wait on
    /// together with other events; `PidFd::try_clone` gives another thread
    /// its own.
    pub fn pidfd(&self) -> &PidFd {
        &self.pidfd
    }

    /// The exit status if the process has ended. An adopted helper's
    /// status is its parent's: its end reads as a plain exit 0 here (see
    /// `ended` for the words a user reads).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = match self.child.as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => self
                    .pidfd
                    .has_exited()
                    .unwrap_or(false)
                    .then(|| std::os::unix::process::ExitStatusExt::from_raw(0)),
            };
        }
        self.exited
    }

    /// How the process ended, in a user's words, if it has.
    pub fn ended(&mut self) -> Option<String> {
        let status = self.try_wait()?;
        if self.is_child() {
            return Some(describe(status));
        }
        // The parent records it once it reaps the helper, a moment after
        // the pidfd said so: wait for that a little, else say "exited".
        let record = self.exit_record.as_ref()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let watch = record
            .parent()
            .and_then(|d| crate::event::DirWatch::new(d).ok());
        loop {
            if let Ok(text) = std::fs::read(record) {
                let text = String::from_utf8_lossy(&text[..text.len().min(64)]).into_owned();
                if !text.is_empty() && text.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
                    return Some(text);
                }
            }
            let Some(watch) = watch.as_ref() else {
                return Some("exited".into());
            };
            match crate::event::wait_any(&[watch.as_fd()], Some(deadline)) {
                Ok(Some(_)) => watch.drain(),
                _ => return Some("exited".into()),
            }
        }
    }

    /// Sends `signal` through the pidfd (never to a reused pid).
    fn signal(&self, signal: i32) {
        self.pidfd.send_signal(signal);
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

    /// The process's children, each held by a pidfd (virtiofsd's worker:
    /// see `Sandbox::cleanup`). A child's pidfd is opened before its parent
    /// is checked: a pid read from /proc that was reaped and reused in
    /// between names a process of another parent, and is left out. Empty
    /// when /proc cannot tell.
    pub fn children(&self) -> Vec<PidFd> {
        let pid = self.pid();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        let listed: Vec<u32> = tasks
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
            .flat_map(|list| {
                list.split_whitespace()
                    .filter_map(|c| c.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        listed
            .into_iter()
            .filter_map(|child| PidFd::open(child).ok())
            .filter(|fd| parent_of(fd.pid()) == Some(pid))
            .collect()
    }

    /// Sends SIGKILL without waiting (through the pidfd: never to a reused
    /// pid), so that several processes end at once; `stop` then reaps.
    pub fn kill_without_waiting(&self) {
        self.signal(libc::SIGKILL);
    }

    /// Asks the process to stop (SIGTERM), then kills it after `grace`.
    pub fn stop(&mut self, grace: Duration) -> ExitStatus {
        if let Some(s) = self.try_wait() {
            return s;
        }
        self.signal(libc::SIGTERM);
        if let Some(s) = self.wait_timeout(grace) {
            return s;
        }
        self.kill_now()
    }

    /// SIGKILL, then the end: reaped when ours, awaited on the pidfd (its
    /// parent reaps it) when adopted.
    fn kill_now(&mut self) -> ExitStatus {
        let killed = std::os::unix::process::ExitStatusExt::from_raw(9);
        let status = match self.child.as_mut() {
            Some(child) => {
                let _ = child.kill();
                child.wait().unwrap_or(killed)
            }
            None => {
                self.signal(libc::SIGKILL);
                let _ = self.pidfd.wait_timeout(Duration::from_secs(5));
                killed
            }
        };
        self.exited = Some(status);
        status
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.kill_now();
        }
    }
}

/// The parent of `pid`, from /proc/PID/stat (the field after the state,
/// which follows the command name's closing parenthesis).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helpers_children_are_found_and_held_by_pidfd() {
        let dir = std::env::temp_dir().join(format!("husk-children-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "sleep 30 & echo $! > child; wait"])
            .current_dir(&dir);
        let mut helper = HelperProcess::spawn("parent", cmd, &dir.join("log")).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let expected: u32 = loop {
            if let Some(pid) = std::fs::read_to_string(dir.join("child"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break pid;
            }
            assert!(std::time::Instant::now() < deadline, "no child started");
            std::thread::sleep(Duration::from_millis(10));
        };
        let children = helper.children();
        assert_eq!(
            children.iter().map(PidFd::pid).collect::<Vec<_>>(),
            vec![expected]
        );
        // Killed through its pidfd, the child ends, and so does the shell
        // waiting for it.
        children[0].send_signal(libc::SIGKILL);
        assert!(children[0].wait_timeout(Duration::from_secs(10)).unwrap());
        assert!(helper.wait_timeout(Duration::from_secs(10)).is_some());
        assert_eq!(
            parent_of(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_adopted_helper_is_signalled_and_watched_through_its_pidfd() {
        // A process that is not our child: the shell's background job,
        // reparented when the shell exits.
        let out = Command::new("/bin/sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .output()
            .unwrap();
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let dir = std::env::temp_dir().join(format!("husk-adopt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let record = HelperProcess::exit_record(&dir, pid);
        let mut helper = HelperProcess::adopt("sleeper", PidFd::open(pid).unwrap(), record.clone());
        assert!(!helper.is_child());
        assert_eq!(helper.pid(), pid);
        assert!(helper.try_wait().is_none() && helper.ended().is_none());
        // Its parent records the end for us, as a pool keeper does.
        std::fs::write(&record, "killed by signal 15").unwrap();
        helper.stop(Duration::from_secs(5));
        assert!(helper.pidfd().has_exited().unwrap());
        assert_eq!(helper.ended().as_deref(), Some("killed by signal 15"));
        // Without a record, its end is known but not its status.
        let out = Command::new("/bin/sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .output()
            .unwrap();
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let mut unrecorded = HelperProcess::adopt(
            "sleeper",
            PidFd::open(pid).unwrap(),
            HelperProcess::exit_record(&dir, pid),
        );
        unrecorded.stop(Duration::from_millis(0));
        assert_eq!(unrecorded.ended().as_deref(), Some("exited"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
