//! The guest's serial console on the host, capped. The VMM writes the
//! console into a FIFO; a thread of the sandbox's owner copies it into
//! `console.log`, and when that file reaches its cap it becomes
//! `console.log.1` (replacing the one before) and a new `console.log`
//! starts. So a guest that writes to its console without end costs the host
//! at most twice the cap on disk and one fixed buffer in memory, whatever
//! it writes and for however long.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crate::event::Flag;

/// The cap of `console.log` (and of `console.log.1`).
pub const CONSOLE_CAP: u64 = 1 << 20;

/// The copying thread and what stops it.
pub struct ConsoleLog {
    fifo: PathBuf,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    /// Raised by the thread once the marker it was given passes through.
    marker_seen: Flag,
    /// Set by `detach`: the FIFO is another copy's now.
    detached: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("console {path}: {source}")]
pub struct ConsoleError {
    path: PathBuf,
    source: std::io::Error,
}

/// The error of an operation on `path`.
fn err(path: &Path) -> impl FnOnce(std::io::Error) -> ConsoleError {
    let path = path.to_path_buf();
    move |source| ConsoleError { path, source }
}

impl ConsoleLog {
    /// Makes the FIFO `fifo` (the path to give the VMM as its console) and
    /// starts copying what arrives there into `log`, capped at `cap` bytes.
    /// The copy raises `marker_seen` when `marker` (non-empty) passes
    /// through: the event the boot waits for, with no rereading of the log.
    pub fn start(
        fifo: &Path,
        log: &Path,
        cap: u64,
        marker: &'static str,
    ) -> Result<ConsoleLog, ConsoleError> {
        nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|e| err(fifo)(e.into()))?;
        Self::attach(fifo, log, cap, marker)
    }

    /// Starts copying from the existing FIFO `fifo` (another process's copy
    /// may still be reading it: a claimed pooled sandbox's keeper, which
    /// stops its own once this one runs; the guest's bytes go to one or the
    /// other, never lost, since both append to the same `log`).
    pub fn attach(
        fifo: &Path,
        log: &Path,
        cap: u64,
        marker: &'static str,
    ) -> Result<ConsoleLog, ConsoleError> {
        // Read-write: opening never waits for the VMM, and the copy never
        // sees an end of file while the VMM reopens or restarts.
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
            .map_err(err(fifo))?;
        let out = open_log(log).map_err(err(log))?;
        let (stop_r, stop_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| err(fifo)(e.into()))?;
        let flag_err = |e: crate::event::EventError| err(fifo)(std::io::Error::other(e));
        let marker_seen = Flag::new().map_err(flag_err)?;
        let scan = MarkerScan {
            marker: marker.as_bytes(),
            tail: Vec::new(),
            seen: marker_seen.try_clone().map_err(flag_err)?,
        };
        let log = log.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || copy(reader, stop_r, out, &log, cap, scan))
            .map_err(err(fifo))?;
        Ok(ConsoleLog {
            fifo: fifo.to_path_buf(),
            stop: Some(stop_w),
            thread: Some(thread),
            marker_seen,
            detached: false,
        })
    }

    /// Raised (readable) once the marker has passed through the console.
    pub fn marker_seen(&self) -> &Flag {
        &self.marker_seen
    }

    /// The path the VMM writes the console to.
    pub fn fifo(&self) -> &Path {
        &self.fifo
    }

    /// Copies what is left, then stops the thread and removes the FIFO.
    pub fn stop(&mut self) {
        let handed_on = self.detached;
        self.detach();
        if !handed_on {
            let _ = std::fs::remove_file(&self.fifo);
        }
    }

    /// Copies what is left and stops the thread, leaving the FIFO to the
    /// copy that took over (`attach`).
    pub fn detach(&mut self) {
        self.detached = true;
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ConsoleLog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Looks for a marker in the copied stream, across chunk boundaries, in a
/// buffer bounded by the marker's length (whatever the guest writes).
struct MarkerScan {
    marker: &'static [u8],
    /// The end of what came before, short enough to hold a split marker.
    tail: Vec<u8>,
    seen: Flag,
}

impl MarkerScan {
    fn feed(&mut self, chunk: &[u8]) {
        let m = self.marker;
        if m.is_empty() {
            return;
        }
        let head = &chunk[..chunk.len().min(m.len().saturating_sub(1))];
        self.tail.extend_from_slice(head);
        let found =
            self.tail.windows(m.len()).any(|w| w == m) || chunk.windows(m.len()).any(|w| w == m);
        if found {
            self.seen.raise();
            // Seen once is enough: scan no more.
            self.marker = b"";
            self.tail = Vec::new();
            return;
        }
        let keep = m.len() - 1;
        if chunk.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - keep..]);
        } else {
            let drop = self.tail.len().saturating_sub(keep);
            self.tail.drain(..drop);
        }
    }
}

fn open_log(log: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
}

/// The thread: poll the FIFO and the stop pipe; copy in fixed chunks;
/// rotate at the cap. Errors writing the log drop the bytes (the guest must
/// never block on the host's disk), they never stop the copy.
fn copy(
    reader: std::fs::File,
    stop: OwnedFd,
    mut out: std::fs::File,
    log: &Path,
    cap: u64,
    mut scan: MarkerScan,
) {
    use std::io::Read;
    let mut buf = vec![0u8; 64 << 10];
    let mut written = out.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = reader;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: reader.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let stopping = fds[1].revents != 0;
        // Drain what is there (all of it when stopping).
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    scan.feed(&buf[..n]);
                    if written >= cap {
                        let _ = std::fs::rename(log, log.with_extension("log.1"));
                        // If the new file cannot be made, go on appending to
                        // the old one: the copy must never stop while the VMM
                        // runs, or its console writes would stall the guest.
                        if let Ok(f) = open_log(log) {
                            out = f;
                        }
                        written = 0;
                    }
                    if out.write_all(&buf[..n]).is_ok() {
                        written += n as u64;
                    }
                    if !stopping {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_kept_under_twice_the_cap_and_the_tail_is_the_newest() {
        let dir = std::env::temp_dir().join(format!("husk-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (fifo, log) = (dir.join("console.fifo"), dir.join("console.log"));
        let mut console = ConsoleLog::start(&fifo, &log, 64 << 10, "the last").unwrap();
        assert!(!console.marker_seen().is_raised());
        {
            let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            let line = [b'x'; 1023];
            for _ in 0..4096 {
                w.write_all(&line).unwrap();
                w.write_all(b"\n").unwrap();
            }
            w.write_all(b"the last line\n").unwrap();
        }
        console.stop();
        assert!(console.marker_seen().is_raised());
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        // 4 MiB written; at most the cap (plus one chunk) in each file.
        assert!(size(&log) <= (64 << 10) + (64 << 10), "{}", size(&log));
        let rotated = dir.join("console.log.1");
        assert!(
            size(&rotated) > 0 && size(&rotated) <= (128 << 10),
            "{}",
            size(&rotated)
        );
        assert_eq!(crate::backends::log_tail(&log), "the last line");
        assert!(!fifo.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_marker_is_found_across_chunks_and_only_whole() {
        let scan = |chunks: &[&[u8]]| {
            let mut s = MarkerScan {
                marker: b"husk-agent: ready",
                tail: Vec::new(),
                seen: Flag::new().unwrap(),
            };
            for c in chunks {
                s.feed(c);
                assert!(s.tail.len() < 17);
            }
            s.seen.is_raised()
        };
        assert!(scan(&[b"boot\nhusk-agent: ready boottime_ns=1\n"]));
        assert!(scan(&[b"xx husk-ag", b"ent: re", b"ady"]));
        assert!(scan(&[b"h", b"u", b"s", b"k", b"-agent:", b" ", b"ready"]));
        assert!(scan(&[&[b'x'; 70000], b"husk-agent: rea", b"dy"]));
        assert!(!scan(&[b"husk-agent: rea", b"", b"Dy"]));
        assert!(!scan(&[b"husk-agent: rea", &[b'x'; 100], b"dy"]));
        assert!(!scan(&[b"husk-agent:", b" not ready"]));
    }

    #[test]
    fn no_marker_no_flag() {
        let dir = std::env::temp_dir().join(format!("husk-console-nm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (fifo, log) = (dir.join("console.fifo"), dir.join("console.log"));
        let mut console = ConsoleLog::start(&fifo, &log, 64 << 10, "").unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .unwrap()
            .write_all(b"anything\n")
            .unwrap();
        console.stop();
        assert!(!console.marker_seen().is_raised());
        assert!(!fifo.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
