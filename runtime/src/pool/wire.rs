//! The keeper's socket protocol: one JSON message per frame (a 4-byte
//! little-endian length, then the text), with descriptors attached to the
//! frame by SCM_RIGHTS. Both ends are root processes of husk's own; the
//! bounds only keep a confused peer from costing memory.

use std::io::{IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{de::DeserializeOwned, Serialize};

/// The longest frame either end sends.
const MAX_FRAME: usize = 64 << 10;
/// The most descriptors one frame carries.
const MAX_FDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("keeper socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("keeper socket: {0}")]
    Sys(#[from] nix::Error),
    #[error("keeper socket: message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("keeper socket: a frame of {0} bytes (at most {MAX_FRAME})")]
    TooLong(usize),
    #[error("keeper socket: closed by the other end")]
    Closed,
}

/// Sends `msg` with `fds` attached.
pub fn send<T: Serialize>(sock: &UnixStream, msg: &T, fds: &[RawFd]) -> Result<(), WireError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLong(body.len()));
    }
    let len = (body.len() as u32).to_le_bytes();
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len);
    frame.extend_from_slice(&body);
    let mut sent = 0;
    while sent < frame.len() {
        let iov = [IoSlice::new(&frame[sent..])];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !fds.is_empty() {
            &cmsg
        } else {
            &[]
        };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => sent += n,
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives one message and the descriptors attached to it, waiting at
/// most `timeout`.
pub fn recv<T: DeserializeOwned>(
    sock: &UnixStream,
    timeout: Duration,
) -> Result<(T, Vec<OwnedFd>), WireError> {
    sock.set_read_timeout(Some(timeout))?;
    let mut len = [0u8; 4];
    let mut fds = Vec::new();
    // The first bytes carry the descriptors: read them with recvmsg.
    let mut got = 0;
    while got < len.len() {
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut len[got..])];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::EAGAIN) => {
                return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into())
            }
            Err(e) => return Err(e.into()),
        };
        let n = msg.bytes;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these descriptors in
                // this process for us; nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if n == 0 {
            return Err(WireError::Closed);
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLong(len));
    }
    let mut body = vec![0u8; len];
    (&*sock).read_exact(&mut body).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            WireError::Closed
        } else {
            WireError::Io(e)
        }
    })?;
    Ok((serde_json::from_slice(&body)?, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_and_its_descriptors_arrive_together() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        send(&a, &("hello", 7u32), &[file.as_raw_fd()]).unwrap();
        let ((text, n), fds): ((String, u32), _) = recv(&b, Duration::from_secs(5)).unwrap();
        assert_eq!((text.as_str(), n), ("hello", 7));
        assert_eq!(fds.len(), 1);
        drop(a);
        let e = recv::<u32>(&b, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, WireError::Closed), "{e}");
    }

    #[test]
    fn a_silent_peer_times_out_and_a_huge_frame_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let e = recv::<u32>(&b, Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        use std::io::Write;
        (&a).write_all(&(1u32 << 30).to_le_bytes()).unwrap();
        let e = recv::<u32>(&b, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, WireError::TooLong(_)), "{e}");
    }
}
