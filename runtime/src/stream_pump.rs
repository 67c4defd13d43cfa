//! The host end of a process's stdio streams: the copy loops between the
//! caller's fds and the hybrid vsock connections the agent's streams arrive
//! on. One bounded buffer per stream, whatever the guest sends: a slow
//! reader stops the pump, and the vsock backend's credit then stops the
//! guest. Nothing read from the guest is taken as a size.

use husk_protocol::{STDIN_ACK_LEN, STDIN_WINDOW};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// Bytes one read or write moves at most. 1 MiB: as much as the agent's
/// stdio pipes hold, so a burst crosses in one wake-up, and far above the
/// 64 KiB the vsock backend writes into the Unix socket at a time.
pub const PUMP_BUFFER: usize = 1 << 20;

/// Copies the caller's stdin into the stream until EOF or an error on
/// either side, then closes the stream. At most `STDIN_WINDOW` bytes are
/// in flight, not yet acknowledged by the agent (see `husk_protocol`).
pub fn pump_in(input: Box<dyn Read + Send>, stream: UnixStream, stop: StdinStop) {
    copy_in(input, &stream);
    // A whole close, not a half-close: the vsock backend drops a
    // half-closed connection's pending data, and this stream only carries
    // one direction. The owner's handle goes first, so this is the close.
    stop.release();
    drop(stream);
}

/// A second handle on a stdin stream, for its owner to end a pump that
/// would wait for good (a guest that never acknowledges what it took, or
/// never reads): `stop` shuts the socket down while the pump still has
/// it, which ends the pump's wait; the pump lets go of the handle before
/// it closes the socket itself, so a pump that ends on its own still ends
/// with a whole close.
#[derive(Clone, Default)]
pub struct StdinStop(Arc<Mutex<Option<UnixStream>>>);

impl StdinStop {
    pub fn new(stream: &UnixStream) -> std::io::Result<Self> {
        Ok(StdinStop(Arc::new(Mutex::new(Some(stream.try_clone()?)))))
    }

    /// Ends the pump's stream now, if the pump is still running.
    pub fn stop(&self) {
        let held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = held.as_ref() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn release(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn copy_in(mut input: Box<dyn Read + Send>, mut stream: &UnixStream) {
    let mut buf = vec![0u8; PUMP_BUFFER];
    let mut window = StdinWindow::default();
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            let room = window.room();
            if room == 0 {
                if let Err(e) = window.wait(&mut stream) {
                    log::debug!("stdin stream: {e}");
                    return;
                }
                continue;
            }
            let (now, later) = chunk.split_at(chunk.len().min(room));
            if stream.write_all(now).is_err() {
                return;
            }
            window.sent += now.len() as u64;
            chunk = later;
        }
    }
}

/// What went wrong with the agent's acknowledgements on a stdin stream.
#[derive(Debug, thiserror::Error)]
pub enum StdinWindowError {
    #[error("the guest closed the stream before taking {0} bytes sent to it")]
    Closed(u64),
    #[error("reading the guest's acknowledgement: {0}")]
    Io(#[from] std::io::Error),
    #[error("the guest acknowledged {acked} bytes after {previous}, of {sent} sent")]
    Bogus {
        acked: u64,
        previous: u64,
        sent: u64,
    },
}

/// The host's side of stdin flow control: bytes sent, bytes the agent says
/// it took, and a partial acknowledgement carried between reads.
#[derive(Default)]
struct StdinWindow {
    sent: u64,
    acked: u64,
    partial: [u8; STDIN_ACK_LEN],
    partial_len: usize,
}

impl StdinWindow {
    /// How many more bytes may be sent now.
    fn room(&self) -> usize {
        let in_flight = self.sent - self.acked;
        usize::try_from(STDIN_WINDOW.saturating_sub(in_flight)).unwrap_or(usize::MAX)
    }

    /// Blocks until the agent acknowledges more, checking what it says.
    fn wait(&mut self, stream: &mut impl Read) -> Result<(), StdinWindowError> {
        let mut buf = [0u8; 16 * STDIN_ACK_LEN];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => return Err(StdinWindowError::Closed(self.sent - self.acked)),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            let before = self.acked;
            self.take(&buf[..n])?;
            if self.acked > before {
                return Ok(());
            }
        }
    }

    /// Folds bytes read from the guest into the acknowledged count.
    fn take(&mut self, mut bytes: &[u8]) -> Result<(), StdinWindowError> {
        while !bytes.is_empty() {
            let want = STDIN_ACK_LEN - self.partial_len;
            let (now, rest) = bytes.split_at(bytes.len().min(want));
            self.partial[self.partial_len..self.partial_len + now.len()].copy_from_slice(now);
            self.partial_len += now.len();
            bytes = rest;
            if self.partial_len == STDIN_ACK_LEN {
                self.partial_len = 0;
                let acked = u64::from_le_bytes(self.partial);
                if acked < self.acked || acked > self.sent {
                    return Err(StdinWindowError::Bogus {
                        acked,
                        previous: self.acked,
                        sent: self.sent,
                    });
                }
                self.acked = acked;
            }
        }
        Ok(())
    }
}

/// Copies the stream into the caller's stdout or stderr until the guest
/// closes it or the caller's end goes away, then flushes.
pub fn pump_out(mut stream: UnixStream, mut output: Box<dyn Write + Send>) {
    let mut buf = vec![0u8; PUMP_BUFFER];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if output.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = output.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer the test can look into after the pump has taken it.
    #[derive(Clone, Default)]
    struct Collected(Arc<Mutex<Vec<u8>>>);

    impl Write for Collected {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4099) as u8).collect()
    }

    #[test]
    fn pump_out_delivers_every_byte_in_order_then_ends_at_eof() {
        let (mut guest, host) = UnixStream::pair().unwrap();
        let data = pattern(3 * PUMP_BUFFER + 12_345);
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            // Odd-sized writes: the pump must not depend on chunk borders.
            for chunk in sent.chunks(70_001) {
                guest.write_all(chunk).unwrap();
            }
        });
        let out = Collected::default();
        pump_out(host, Box::new(out.clone()));
        writer.join().unwrap();
        assert_eq!(*out.0.lock().unwrap(), data);
    }

    #[test]
    fn pump_out_stops_when_the_caller_goes_away() {
        struct Gone;
        impl Write for Gone {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (mut guest, host) = UnixStream::pair().unwrap();
        guest.write_all(b"unread").unwrap();
        // The guest keeps its end open: the pump ends because of the
        // caller, not because of an EOF.
        pump_out(host, Box::new(Gone));
        drop(guest);
    }

    /// The agent's side of the window, as `pump_stdin` does it.
    fn acking_guest(mut guest: UnixStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        let mut acknowledged = 0u64;
        loop {
            let n = match guest.read(&mut buf) {
                Ok(n) => n,
                // The pump closed its end with our last acknowledgement
                // unread: a Unix socket reports that as a reset, after
                // every byte sent before it (what is checked).
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) => panic!("reading the stream: {e}"),
            };
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
            let taken = got.len() as u64;
            if taken - acknowledged >= husk_protocol::STDIN_ACK_EVERY {
                let _ = guest.write_all(&taken.to_le_bytes());
                acknowledged = taken;
            }
        }
    }

    #[test]
    fn pump_in_delivers_every_byte_then_closes_the_stream() {
        let (guest, host) = UnixStream::pair().unwrap();
        let data = pattern(2 * PUMP_BUFFER + 999);
        let reader = std::thread::spawn(move || acking_guest(guest));
        pump_in(
            Box::new(std::io::Cursor::new(data.clone())),
            host,
            StdinStop::default(),
        );
        assert_eq!(reader.join().unwrap(), data);
    }

    #[test]
    fn pump_in_sends_no_more_than_the_window_unacknowledged() {
        let (mut guest, host) = UnixStream::pair().unwrap();
        let data = pattern(PUMP_BUFFER);
        let pump = std::thread::spawn(move || {
            pump_in(
                Box::new(std::io::Cursor::new(data)),
                host,
                StdinStop::default(),
            )
        });
        // A guest that takes bytes but never acknowledges them gets one
        // window, and then the pump waits (here until the guest closes).
        let mut got = vec![0u8; STDIN_WINDOW as usize];
        guest.read_exact(&mut got).unwrap();
        guest
            .set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let mut more = [0u8; 1];
        let err = guest.read(&mut more).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        drop(guest);
        pump.join().unwrap();
    }

    #[test]
    fn stop_ends_a_pump_whose_guest_never_acknowledges() {
        let (mut guest, host) = UnixStream::pair().unwrap();
        let stop = StdinStop::new(&host).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let data = pattern(PUMP_BUFFER);
        let pump_stop = stop.clone();
        std::thread::spawn(move || {
            pump_in(Box::new(std::io::Cursor::new(data)), host, pump_stop);
            let _ = done_tx.send(());
        });
        let mut got = vec![0u8; STDIN_WINDOW as usize];
        guest.read_exact(&mut got).unwrap();
        // The guest keeps its end open and says nothing: the pump waits.
        let wait = std::time::Duration::from_millis(300);
        assert!(done_rx.recv_timeout(wait).is_err(), "the pump ended early");
        stop.stop();
        done_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the pump ended once stopped");
        // And the guest sees the stream end.
        let mut rest = Vec::new();
        guest.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn acknowledgements_beyond_what_was_sent_or_backwards_are_refused() {
        let mut w = StdinWindow {
            sent: 1000,
            ..Default::default()
        };
        w.take(&500u64.to_le_bytes()).unwrap();
        assert_eq!(w.acked, 500);
        // Split across reads.
        let b = 700u64.to_le_bytes();
        w.take(&b[..3]).unwrap();
        assert_eq!(w.acked, 500);
        w.take(&b[3..]).unwrap();
        assert_eq!(w.acked, 700);
        assert!(matches!(
            w.take(&600u64.to_le_bytes()),
            Err(StdinWindowError::Bogus { acked: 600, .. })
        ));
        let mut w = StdinWindow {
            sent: 1000,
            ..Default::default()
        };
        assert!(matches!(
            w.take(&u64::MAX.to_le_bytes()),
            Err(StdinWindowError::Bogus { .. })
        ));
        assert_eq!(w.acked, 0);
        assert_eq!(w.room(), STDIN_WINDOW as usize - 1000);
    }

    #[test]
    fn a_guest_that_closes_ends_the_wait() {
        let mut w = StdinWindow {
            sent: STDIN_WINDOW,
            ..Default::default()
        };
        assert_eq!(w.room(), 0);
        assert!(matches!(
            w.wait(&mut std::io::empty()),
            Err(StdinWindowError::Closed(n)) if n == STDIN_WINDOW
        ));
    }
}
