//! The shadow process: the host pid that stands for the container's process
//! (state.pid, --pid-file). It lives exactly as long as that process and ends
//! the same way: the same exit code, or killed by the same signal. Signals
//! sent to it are forwarded to the container; SIGKILL, which it cannot
//! catch, closes its link and the monitor kills the container.

use super::monitor_protocol::{self as proto, ToMonitor, ToShadow};
use nix::sys::signal::{SigSet, Signal};
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
    let mut link = unsafe { UnixStream::from_raw_fd(FD_SHADOW_LINK) };
    let all = SigSet::all();
    all.thread_block()?;
    let mut forward = link.try_clone()?;
    std::thread::spawn(move || loop {
        if let Ok(sig) = all.wait() {
            if NOT_FORWARDED.contains(&sig) {
                continue;
            }
            let msg = ToMonitor::Signal { signal: sig as i32 };
            if proto::write_message(&mut forward, &msg).is_err() {
                return;
            }
        }
    });
    let (code, signal) = match proto::read_message::<ToShadow>(&mut link, None) {
        Ok(ToShadow::Exit { code, signal }) => (code, signal),
        // The monitor died: the VM, and the container in it, died with it.
        Err(_) => (128 + libc::SIGKILL, libc::SIGKILL),
    };
    if signal > 0 {
        super::die_by_signal(signal);
    }
    Ok(code)
}
