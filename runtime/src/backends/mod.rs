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
}

/// How long a backend may take to create its vhost-user socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The last non-empty line of a log file, for error messages.
pub fn log_tail(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
        .trim()
        .to_string()
}

/// Waits for a freshly spawned backend to create `socket`.
fn wait_for_socket(
    process: &mut HelperProcess,
    socket: &Path,
    log: &Path,
) -> Result<(), BackendError> {
    use std::os::unix::fs::FileTypeExt;
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    loop {
        if std::fs::metadata(socket)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false)
        {
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
        std::thread::sleep(Duration::from_millis(1));
    }
}
