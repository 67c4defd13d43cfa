//! Raw vsock throughput of a running sandbox, for bench/run.py: the same VM
//! and the same stream connections that carry a process's stdio, without a
//! process. `husk-vsock-bench <vsock.sock> to-guest|from-guest <bytes>` prints
//! `<MiB/s>` on stdout.
//!
//! to-guest sends zeros into a sink stream (the agent discards them and
//! answers once it has them all); from-guest
//! asks a source stream for `bytes` zeros and counts and checks what arrives,
//! reading no more than it asked for whatever the guest sends.

use husk_protocol::StreamKind;
use husk_runtime::agent::AgentClient;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const CHUNK: usize = 1 << 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [uds, direction, bytes] = args.as_slice() else {
        eprintln!("usage: husk-vsock-bench <vsock.sock> to-guest|from-guest <bytes>");
        return ExitCode::from(2);
    };
    let Ok(bytes) = bytes.parse::<u64>() else {
        eprintln!("husk-vsock-bench: {bytes:?} is not a byte count");
        return ExitCode::from(2);
    };
    match run(PathBuf::from(uds), direction, bytes) {
        Ok(mib_s) => {
            println!("{mib_s:.1}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("husk-vsock-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(uds: PathBuf, direction: &str, bytes: u64) -> Result<f64, String> {
    let agent = AgentClient::connect(&uds, Duration::from_secs(5), || Ok(()))
        .map_err(|e| format!("{}: {e}", uds.display()))?;
    let kind = match direction {
        "to-guest" => StreamKind::Sink,
        "from-guest" => StreamKind::Source,
        other => {
            return Err(format!(
                "unknown direction {other:?} (to-guest or from-guest)"
            ))
        }
    };
    let mut stream = agent
        .open_stream(kind, bytes)
        .map_err(|e| format!("opening a {direction} stream: {e}"))?;
    let mut buf = vec![0u8; CHUNK];
    let started = Instant::now();
    if kind == StreamKind::Sink {
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
            stream
                .write_all(&buf[..n])
                .map_err(|e| format!("writing to the guest: {e}"))?;
            left -= n as u64;
        }
        // The sink answers once it has read everything: the bytes arrived.
        let mut answer = [0u8; 1];
        stream
            .read_exact(&mut answer)
            .map_err(|e| format!("waiting for the sink's answer: {e}"))?;
    } else {
        let mut got = 0u64;
        while got < bytes {
            let want = usize::try_from(bytes - got).map_or(CHUNK, |l| l.min(CHUNK));
            let n = stream
                .read(&mut buf[..want])
                .map_err(|e| format!("reading from the guest: {e}"))?;
            if n == 0 {
                return Err(format!("the guest sent {got} of {bytes} bytes"));
            }
            if buf[..n].iter().any(|b| *b != 0) {
                return Err(format!("the guest sent a non-zero byte after {got} bytes"));
            }
            got += n as u64;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(bytes as f64 / secs / f64::from(1u32 << 20))
}
