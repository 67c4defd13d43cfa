//! Stream connections on STREAM_PORT: each starts with a StreamHeader.
//! Process streams are parked here under their token until the request that
//! names them (CreateContainer, ExecProcess) takes them; echo, sink and
//! source streams (diagnostics and measurement) are served at once.

use husk_protocol::{StreamHeader, StreamKind, STREAM_PORT};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vsock::{VsockListener, VsockStream, VMADDR_CID_ANY};

/// How long a request waits for a stream the host said it opened.
const STREAM_ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new connection may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams parked but never claimed are dropped after this long.
const UNCLAIMED_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("listening on vsock port {port}: {source}")]
    Listen { port: u32, source: std::io::Error },
    #[error("stream {0} did not arrive within {STREAM_ARRIVAL_TIMEOUT:?}")]
    NotArrived(u64),
}

/// Process streams that arrived and wait to be claimed by token.
pub struct StreamRegistry {
    parked: Mutex<HashMap<u64, (VsockStream, Instant)>>,
    arrived: Condvar,
}

impl StreamRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(StreamRegistry {
            parked: Mutex::new(HashMap::new()),
            arrived: Condvar::new(),
        })
    }

    fn park(&self, token: u64, stream: VsockStream) {
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        parked.retain(|_, (_, at)| at.elapsed() < UNCLAIMED_LIFETIME);
        parked.insert(token, (stream, Instant::now()));
        self.arrived.notify_all();
    }

    /// Takes the stream with `token`, waiting for it to arrive. Token 0 is
    /// "no stream".
    pub fn take(&self, token: u64) -> Result<Option<VsockStream>, StreamError> {
        if token == 0 {
            return Ok(None);
        }
        let deadline = Instant::now() + STREAM_ARRIVAL_TIMEOUT;
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((stream, _)) = parked.remove(&token) {
                return Ok(Some(stream));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StreamError::NotArrived(token));
            }
            parked = self
                .arrived
                .wait_timeout(parked, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Starts accepting stream connections in a background thread.
pub fn listen(registry: Arc<StreamRegistry>) -> Result<(), StreamError> {
    let listener =
        VsockListener::bind_with_cid_port(VMADDR_CID_ANY, STREAM_PORT).map_err(|source| {
            StreamError::Listen {
                port: STREAM_PORT,
                source,
            }
        })?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    let registry = Arc::clone(&registry);
                    std::thread::spawn(move || accept(registry, stream));
                }
                Err(e) => eprintln!("husk-agent: stream accept: {e}"),
            }
        }
    });
    Ok(())
}

fn accept(registry: Arc<StreamRegistry>, mut stream: VsockStream) {
    let _ = stream.set_read_timeout(Some(HEADER_TIMEOUT));
    let header = match StreamHeader::read_from(&mut stream) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("husk-agent: dropping stream connection: {e}");
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    match header.kind {
        StreamKind::Process => registry.park(header.token, stream),
        StreamKind::Echo => echo(stream),
        StreamKind::Sink => sink(stream, header.token),
        StreamKind::Source => source(stream, header.token),
    }
}

/// The buffer of the diagnostic streams: the size of a stdio copy, so that
/// they measure what the vsock path can carry with the same chunking.
const DIAG_CHUNK: usize = 1 << 20;

/// Reads and discards `len` bytes, then answers with one byte and closes.
fn sink(mut stream: VsockStream, len: u64) {
    let mut buf = vec![0u8; DIAG_CHUNK];
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        match stream.read(&mut buf[..want]) {
            Ok(0) => return,
            Ok(n) => left -= n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
    let _ = stream.write_all(&[1]);
    let _ = stream.shutdown(Shutdown::Write);
}

/// Writes `len` zero bytes, then half-closes.
fn source(mut stream: VsockStream, len: u64) {
    let buf = vec![0u8; DIAG_CHUNK];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        if stream.write_all(&buf[..n]).is_err() {
            return;
        }
        left -= n as u64;
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// Writes back every byte read until EOF, then half-closes.
fn echo(mut stream: VsockStream) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}
