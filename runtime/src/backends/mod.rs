//! vhost-user device backends of a sandbox. Both hypervisor backends connect
//! to the same daemons, so QEMU and husk-vmm share one device implementation.

pub mod virtiofs;
pub mod vsock;

use crate::child::{describe, HelperProcess};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("starting {name} ({program}): {source}")]
    Spawn {
        name: &'static str,
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{name} {status} before creating its socket {socket}: {log_tail}")]
    Died {
        name: &'static str,
        status: String,
        socket: PathBuf,
        log_tail: String,
    },
    #[error("{name} did not create its socket {socket} within {timeout:?}")]
    Timeout {
        name: &'static str,
        socket: PathBuf,
        timeout: Duration,
    },
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error(transparent)]
    Event(#[from] crate::event::EventError),
}

/// How long a backend may take to create its vhost-user socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The last non-empty line of a log file, for error messages.
pub fn log_tail(log: &Path) -> String {
    // The logs hold what the guest printed: read only their end, never the
    // whole file into memory, and never pass control characters on.
    const TAIL: u64 = 16 * 1024;
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).is_ok() {
            let _ = f.take(TAIL).read_to_end(&mut bytes);
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
        .trim();
    crate::agent::printable(line, 1024)
}

/// Whether a Unix socket bound at `socket` listens, from /proc/net/unix
/// (`__SO_ACCEPTCON` in its flags). A backend binds (creating the file)
/// before it listens; a VMM connecting in between is refused. Probing with a
/// connection is no option: a vhost-user backend serves its first connection
/// as its one frontend. None when /proc/net/unix cannot be read.
///
/// Unix sockets are listed per network namespace, in the one the socket was
/// made in: a jailed backend has a namespace of its own from its start,
/// virtiofsd makes its socket in ours and then unshares. Both are read.
fn listening(socket: &Path, pid: u32) -> Option<bool> {
    const SO_ACCEPTCON: u32 = 0x10000;
    let ours = std::fs::read_to_string("/proc/self/net/unix").ok()?;
    let theirs = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    let table = ours + &theirs;
    let path = socket.to_str()?;
    Some(table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|f| f & SO_ACCEPTCON != 0)
    }))
}

/// Waits for a freshly spawned backend to listen on `socket`: woken by the
/// socket's creation in its directory (inotify) or by the backend's exit
/// (its pidfd), whichever comes first, then confirmed from /proc/net/unix.
pub(crate) fn wait_for_socket(
    process: &mut HelperProcess,
    socket: &Path,
    log: &Path,
) -> Result<(), BackendError> {
    use crate::event::{wait_any, DirWatch};
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    let dir = socket.parent().unwrap_or(Path::new("/"));
    // Watching before the first look: a socket made in between is seen
    // by the look or wakes the wait.
    let watch = DirWatch::new(dir)?;
    loop {
        let bound = std::fs::metadata(socket)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if bound && listening(socket, process.pid()) != Some(false) {
            return Ok(());
        }
        if let Some(status) = process.try_wait() {
            return Err(BackendError::Died {
                name: process.name,
                status: describe(status),
                socket: socket.to_path_buf(),
                log_tail: log_tail(log),
            });
        }
        if Instant::now() >= deadline {
            return Err(BackendError::Timeout {
                name: process.name,
                socket: socket.to_path_buf(),
                timeout: SOCKET_TIMEOUT,
            });
        }
        // Bound but not yet listening: listen(2) makes no event, and the
        // backend calls it right after bind(2); look again in a moment
        // (still woken at once by the backend's death). Otherwise the next
        // entry made in the directory, or the death, wakes the wait.
        let until = if bound {
            deadline.min(Instant::now() + Duration::from_millis(1))
        } else {
            deadline
        };
        wait_any(&[watch.as_fd(), process.pidfd().as_fd()], Some(until))?;
        watch.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_tail_reads_only_the_end_and_strips_control_characters() {
        let path = std::env::temp_dir().join(format!("husk-tail-{}.log", std::process::id()));
        // 64 MiB a guest wrote, then its last line with an escape sequence.
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&path).unwrap();
            let junk = vec![b'x'; 1 << 20];
            for _ in 0..64 {
                f.write_all(&junk).unwrap();
            }
            f.write_all(b"\nlast \x1b[2Jline\n\n").unwrap();
        }
        assert_eq!(log_tail(&path), "last ?[2Jline");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(log_tail(&path), "(no output)");
    }

    fn spawn(name: &'static str, script: &str, log: &std::path::Path) -> HelperProcess {
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", script]);
        HelperProcess::spawn(name, cmd, log).unwrap()
    }

    #[test]
    fn a_socket_wait_ends_at_the_backends_death_or_its_listen() {
        let dir = std::env::temp_dir().join(format!("husk-sockwait-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (socket, log) = (dir.join("b.sock"), dir.join("b.log"));
        // Dies after a while without a socket: the wait ends with it, long
        // before the socket timeout.
        let mut dying = spawn("dying", "sleep 0.2; echo gone; exit 4", &log);
        let t = std::time::Instant::now();
        let e = wait_for_socket(&mut dying, &socket, &log).unwrap_err();
        assert!(t.elapsed() < SOCKET_TIMEOUT / 2, "{:?}", t.elapsed());
        assert!(matches!(e, BackendError::Died { .. }), "{e}");
        assert!(
            e.to_string().contains("status 4") && e.to_string().contains("gone"),
            "{e}"
        );
        // Binds, waits, then listens: ready only once it listens.
        let script = format!(
            "exec python3 -c 'import socket,time; s=socket.socket(socket.AF_UNIX); \
             s.bind(\"{}\"); time.sleep(0.2); s.listen(1); time.sleep(30)'",
            socket.display()
        );
        let mut backend = spawn("listener", &format!("sleep 0.1; {script}"), &log);
        wait_for_socket(&mut backend, &socket, &log).unwrap();
        assert_eq!(listening(&socket, backend.pid()), Some(true));
        backend.stop(Duration::from_millis(100));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bound_socket_listens_only_after_listen() {
        let dir = std::env::temp_dir().join(format!("husk-listen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        // A datagram socket is bound but never listens.
        let bound = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        assert_eq!(listening(&path, std::process::id()), Some(false));
        drop(bound);
        std::fs::remove_file(&path).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(listening(&path, std::process::id()), Some(true));
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
