//! The host end of a process's stdio streams: the copy loops between the
//! caller's fds and the hybrid vsock connections the agent's streams arrive
//! on. One bounded buffer per stream, whatever the guest sends: a slow
//! reader stops the pump, and the vsock backend's credit then stops the
//! guest. Nothing read from the guest is taken as a size.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

/// Bytes one read or write moves at most. 1 MiB: as much as the agent's
/// stdio pipes hold, so a burst crosses in one wake-up, and far above the
/// 64 KiB the vsock backend writes into the Unix socket at a time.
pub const PUMP_BUFFER: usize = 1 << 20;

/// Copies the caller's stdin into the stream until EOF or an error on
/// either side, then closes the stream.
pub fn pump_in(mut input: Box<dyn Read + Send>, mut stream: UnixStream) {
    let mut buf = vec![0u8; PUMP_BUFFER];
    loop {
        match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    // A whole close, not a half-close: the vsock backend drops a half-closed
    // connection's pending data, and this stream only carries one direction.
    drop(stream);
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

    #[test]
    fn pump_in_delivers_every_byte_then_closes_the_stream() {
        let (guest, host) = UnixStream::pair().unwrap();
        let data = pattern(2 * PUMP_BUFFER + 999);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut guest = guest;
            guest.read_to_end(&mut got).unwrap();
            got
        });
        pump_in(Box::new(std::io::Cursor::new(data.clone())), host);
        assert_eq!(reader.join().unwrap(), data);
    }
}
