//! TCP throughput and request/response latency, for bench/run.py's
//! `network` section: the same code on every side (a runc container, a husk
//! guest, a bare QEMU guest, the peer namespace). Built statically
//! (`make net-bench`) so it runs from a busybox rootfs and from an initramfs
//! with no libc. std only.
//!
//! ```text
//! husk-net-bench server <port>
//! husk-net-bench stream-send <addr:port> <bytes>   prints MiB/s, client -> server
//! husk-net-bench stream-recv <addr:port> <bytes>   prints MiB/s, server -> client
//! husk-net-bench rr <addr:port> <count>            prints the median round trip in µs
//! ```
//!
//! Each connection starts with a request header: one mode byte and the
//! count as 8 bytes big-endian. `stream-send`'s time ends when the server
//! answers that it read exactly the count; `stream-recv` reads exactly the
//! count and then sees the server close (one byte more is an error);
//! `rr` sends one byte and waits for one byte back, `count` times, with
//! TCP_NODELAY on both sides.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const CHUNK: usize = 256 << 10;
const MODE_SEND: u8 = b'S';
const MODE_RECV: u8 = b'R';
const MODE_RR: u8 = b'P';
/// The server's answer once a stream-send's bytes are all in.
const RECEIVED_ALL: u8 = b'K';
/// The most one request may ask for (1 TiB): a typo, not a benchmark, above.
const MAX_COUNT: u64 = 1 << 40;
/// How long a client waits on a silent server before it gives up.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

const USAGE: &str = "usage: husk-net-bench server <port> | stream-send <addr:port> <bytes> \
                     | stream-recv <addr:port> <bytes> | rr <addr:port> <count>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["server", port] => parse_port(port).and_then(serve),
        [mode @ ("stream-send" | "stream-recv" | "rr"), addr, count] => {
            match (parse_addr(addr), parse_count(count)) {
                (Ok(addr), Ok(count)) => client(mode, addr, count).map(|figure| {
                    println!("{figure:.1}");
                }),
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("husk-net-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not a TCP port"))
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an address:port"))
}

fn parse_count(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if (1..=MAX_COUNT).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a count from 1 to {MAX_COUNT}")),
    }
}

/// Accepts connections for ever, one thread each, and serves the request
/// each starts with. A failed connection is reported and the server goes on.
fn serve(port: u16) -> Result<(), String> {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| format!("listening on port {port}: {e}"))?;
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("husk-net-bench: accepting: {e}");
                continue;
            }
        };
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string());
            if let Err(e) = serve_one(stream) {
                eprintln!("husk-net-bench: {peer}: {e}");
            }
        });
    }
    Ok(())
}

fn serve_one(mut stream: TcpStream) -> Result<(), String> {
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let mut header = [0u8; 9];
    stream
        .read_exact(&mut header)
        .map_err(|e| format!("reading the request: {e}"))?;
    let mut count_bytes = [0u8; 8];
    count_bytes.copy_from_slice(&header[1..]);
    let count = u64::from_be_bytes(count_bytes);
    if !(1..=MAX_COUNT).contains(&count) {
        return Err(format!("a request for {count} bytes or round trips"));
    }
    match header[0] {
        MODE_SEND => {
            let got = drain(&mut stream, count)?;
            if got != count {
                return Err(format!("stream-send: {got} bytes of {count}"));
            }
            stream
                .write_all(&[RECEIVED_ALL])
                .map_err(|e| format!("answering: {e}"))
        }
        MODE_RECV => {
            fill(&mut stream, count)?;
            stream
                .shutdown(Shutdown::Write)
                .map_err(|e| format!("closing: {e}"))
        }
        MODE_RR => {
            let mut byte = [0u8; 1];
            for _ in 0..count {
                stream
                    .read_exact(&mut byte)
                    .map_err(|e| format!("rr request: {e}"))?;
                stream
                    .write_all(&byte)
                    .map_err(|e| format!("rr response: {e}"))?;
            }
            Ok(())
        }
        other => Err(format!("unknown mode byte {other:#04x}")),
    }
}

/// Reads until the peer closes or `count` bytes are in; never asks for more
/// than what is left, so a peer sending more is seen only as not closing.
fn drain(stream: &mut TcpStream, count: u64) -> Result<u64, String> {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < count {
        let want = usize::try_from(count - got).map_or(CHUNK, |left| left.min(CHUNK));
        match stream.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading after {got} bytes: {e}")),
        }
    }
    Ok(got)
}

/// Writes `count` zero bytes.
fn fill(stream: &mut TcpStream, count: u64) -> Result<(), String> {
    let buf = vec![0u8; CHUNK];
    let mut left = count;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        stream
            .write_all(&buf[..n])
            .map_err(|e| format!("writing with {left} bytes left: {e}"))?;
        left -= n as u64;
    }
    Ok(())
}

/// Runs one client measurement: MiB/s for the streams, the median round
/// trip in µs for rr.
fn client(mode: &str, addr: SocketAddr, count: u64) -> Result<f64, String> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("socket options: {e}"))?;
    let mode_byte = match mode {
        "stream-send" => MODE_SEND,
        "stream-recv" => MODE_RECV,
        _ => MODE_RR,
    };
    let mut header = [0u8; 9];
    header[0] = mode_byte;
    header[1..].copy_from_slice(&count.to_be_bytes());
    // The header goes before the clock starts: the connection and the
    // request are not the stream.
    stream
        .write_all(&header)
        .map_err(|e| format!("sending the request: {e}"))?;
    match mode_byte {
        MODE_SEND => {
            let started = Instant::now();
            fill(&mut stream, count)?;
            let mut answer = [0u8; 1];
            stream
                .read_exact(&mut answer)
                .map_err(|e| format!("waiting for the server's count: {e}"))?;
            if answer[0] != RECEIVED_ALL {
                return Err(format!("the server answered {:#04x}", answer[0]));
            }
            Ok(mib_per_s(count, started.elapsed()))
        }
        MODE_RECV => {
            let started = Instant::now();
            let got = drain(&mut stream, count)?;
            let elapsed = started.elapsed();
            if got != count {
                return Err(format!("received {got} bytes of {count}"));
            }
            let mut extra = [0u8; 1];
            match stream.read(&mut extra) {
                Ok(0) => Ok(mib_per_s(count, elapsed)),
                Ok(_) => Err(format!("the server sent more than {count} bytes")),
                Err(e) => Err(format!("waiting for the server to close: {e}")),
            }
        }
        _ => {
            let mut times = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            let mut byte = [0u8; 1];
            for i in 0..count {
                let started = Instant::now();
                stream
                    .write_all(&[i as u8])
                    .and_then(|()| stream.read_exact(&mut byte))
                    .map_err(|e| format!("round trip {i}: {e}"))?;
                times.push(started.elapsed());
                if byte[0] != i as u8 {
                    return Err(format!("round trip {i}: the wrong byte came back"));
                }
            }
            times.sort_unstable();
            Ok(times[times.len() / 2].as_secs_f64() * 1e6)
        }
    }
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-9) / f64::from(1u32 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_out_of_range_are_refused() {
        assert!(parse_count("0").is_err());
        assert!(parse_count("-1").is_err());
        assert!(parse_count(&(MAX_COUNT + 1).to_string()).is_err());
        assert_eq!(parse_count("2000"), Ok(2000));
    }

    #[test]
    fn every_mode_round_trips_over_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(3) {
                serve_one(stream.unwrap()).unwrap();
            }
        });
        assert!(client("stream-send", addr, 3 << 20).unwrap() > 0.0);
        assert!(client("stream-recv", addr, 3 << 20).unwrap() > 0.0);
        assert!(client("rr", addr, 100).unwrap() > 0.0);
    }

    #[test]
    fn a_short_stream_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // A "server" that reads the header, sends 10 bytes of 1000 and closes.
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut header = [0u8; 9];
            s.read_exact(&mut header).unwrap();
            s.write_all(&[0u8; 10]).unwrap();
        });
        let err = client("stream-recv", addr, 1000).unwrap_err();
        assert!(err.contains("received 10 bytes of 1000"), "{err}");
    }
}
