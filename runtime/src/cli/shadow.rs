//! The shadow process: the host pid that stands for the container's process
//! (state.pid, --pid-file). It lives exactly as long as that process and ends
//! the same way: the same exit code, or killed by the same signal. Signals
//! sent to it are forwarded to the container; SIGKILL, which it cannot
//! catch, closes its link and the monitor kills the container.

use nix::sys::signal::{SigSet, Signal};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;

/// The shadow's end of the link to the monitor (placed by husk create).
pub const FD_SHADOW_LINK: i32 = 3;

/// Signals that say nothing to the container.
const NOT_FORWARDED: [Signal; 4] = [
    Signal::SIGCHLD,
    Signal::SIGWINCH,
    Signal::SIGURG,
    Signal::SIGPIPE,
];

pub fn shadow() -> anyhow::Result<i32> {
    // SAFETY: FD_SHADOW_LINK is the shadow's end of the link, placed by husk create.
    let link = unsafe { UnixStream::from_raw_fd(FD_SHADOW_LINK) };
    let all = SigSet::all();
    all.thread_block()?;
    let mut forward = link.try_clone()?;
    std::thread::spawn(move || loop {
        if let Ok(sig) = all.wait() {
            if !NOT_FORWARDED.contains(&sig) && writeln!(forward, "signal {}", sig as i32).is_err()
            {
                return;
            }
        }
    });
    let mut line = String::new();
    // "exit CODE SIGNAL": nothing longer is read.
    let _ = BufReader::new(link).take(64).read_line(&mut line);
    let mut words = line
        .split_whitespace()
        .skip(1)
        .map(|w| w.parse::<i32>().unwrap_or(0));
    let (code, signal) = match line.starts_with("exit ") {
        true => (words.next().unwrap_or(0), words.next().unwrap_or(0)),
        // The monitor died: the VM, and the container in it, died with it.
        false => (128 + libc::SIGKILL, libc::SIGKILL),
    };
    if signal > 0 {
        super::die_by_signal(signal);
    }
    Ok(code)
}
