//! A process's stdio: the vsock streams it is wired to, the copiers
//! between them and its pipes or terminal, and the terminal master its
//! child sends back.

use super::lock;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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

/// Copies `from` into `to` until EOF or error, then lets `done` run.
pub(super) fn pump(mut from: impl Read, mut to: impl Write, done: impl FnOnce()) {
    let mut buf = vec![0u8; 128 * 1024];
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

/// Feeds a stream into the process's stdin until EOF, then closes stdin.
pub(super) fn pump_stdin(mut from: VsockStream, stdin: Arc<Mutex<Option<File>>>) {
    let mut buf = vec![0u8; 128 * 1024];
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
