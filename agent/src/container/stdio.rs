//! A process's stdio: the vsock streams it is wired to, the copiers
//! between them and its pipes or terminal, and the terminal master its
//! child sends back.

use super::lock;
use nix::errno::Errno;
use nix::fcntl::{splice, SpliceFFlags};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vsock::VsockStream;

/// The streams a process's stdio is wired to.
#[derive(Default)]
pub struct ProcessStreams {
    pub stdin: Option<VsockStream>,
    pub stdout: Option<VsockStream>,
    pub stderr: Option<VsockStream>,
}

/// How much one copy moves at most: as much as a stdio pipe holds (see
/// `launch::PIPE_CAPACITY`), so a full pipe drains in one call.
pub(super) const COPY_CHUNK: usize = 1 << 20;

/// Copies a pipe into a stream with splice(2) until EOF or error, then lets
/// `done` run. The bytes go from the pipe's pages into the socket without a
/// pass through our memory: one copy fewer per byte than read + write, which
/// is what a guest CPU (emulated under TCG) pays for most.
pub(super) fn splice_pump(from: File, to: VsockStream, done: impl FnOnce()) {
    let mut moved = false;
    loop {
        match splice(
            from.as_fd(),
            None,
            to.as_fd(),
            None,
            COPY_CHUNK,
            SpliceFFlags::SPLICE_F_MOVE,
        ) {
            Ok(0) => break,
            Ok(_) => moved = true,
            Err(Errno::EINTR) => continue,
            // A kernel that cannot splice into this socket: copy instead.
            Err(Errno::EINVAL) if !moved => return pump(from, to, done),
            Err(_) => break,
        }
    }
    done();
}

/// Copies `from` into `to` until EOF or error, then lets `done` run.
pub(super) fn pump(mut from: impl Read, mut to: impl Write, done: impl FnOnce()) {
    let mut buf = vec![0u8; COPY_CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // EIO: the pty's last slave closed.
            Err(_) => break,
        }
    }
    let _ = to.flush();
    done();
}

/// Feeds a stream into the process's stdin pipe with splice(2) until EOF,
/// then closes stdin: the socket's bytes land in pages the pipe takes as
/// they are, one copy fewer than read + write. The lock (CloseStdin takes
/// the pipe away) is held only once bytes wait, never while waiting for them.
pub(super) fn splice_stdin(from: VsockStream, stdin: Arc<Mutex<Option<File>>>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let mut ready = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
        match poll(&mut ready, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
        let guard = lock(&stdin);
        let Some(pipe) = guard.as_ref() else { return };
        match splice(
            from.as_fd(),
            None,
            pipe.as_fd(),
            None,
            COPY_CHUNK,
            SpliceFFlags::SPLICE_F_MOVE,
        ) {
            Ok(0) => break,
            Ok(_) | Err(Errno::EINTR) => {}
            // A kernel that cannot splice from this socket: copy instead.
            Err(Errno::EINVAL) => {
                drop(guard);
                return pump_stdin(from, stdin);
            }
            Err(_) => break,
        }
    }
    lock(&stdin).take();
}

/// Feeds a stream into the process's stdin (a pipe or the terminal) until
/// EOF, then closes stdin.
pub(super) fn pump_stdin(mut from: VsockStream, stdin: Arc<Mutex<Option<File>>>) {
    let mut buf = vec![0u8; COPY_CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut guard = lock(&stdin);
                let Some(pipe) = guard.as_mut() else { return };
                if pipe.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    lock(&stdin).take();
}

/// Receives the pty master a container child sent with SCM_RIGHTS.
pub(super) fn receive_fd(sock: &UnixStream) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: the fd was just received and is ours alone.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    Err(std::io::Error::other("no terminal fd in the message"))
}
