//! `--console-socket`: like runc, a pty master is sent over the socket with
//! SCM_RIGHTS. The real terminal lives in the guest; this host pty only
//! carries bytes (its slave is raw) and window sizes.

use anyhow::Context;
use husk_runtime::agent::AgentClient;
use husk_runtime::sandbox::HostStdio;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct HostPty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Opens a pty pair with a raw slave.
pub fn open_raw_pty() -> anyhow::Result<HostPty> {
    let pty = nix::pty::openpty(None, None).context("opening a pty for the console")?;
    let mut attrs = nix::sys::termios::tcgetattr(&pty.slave).context("reading pty attributes")?;
    nix::sys::termios::cfmakeraw(&mut attrs);
    nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &attrs)
        .context("making the pty raw")?;
    for fd in [&pty.master, &pty.slave] {
        // SAFETY: fcntl on fds we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(HostPty {
        master: pty.master,
        slave: pty.slave,
    })
}

/// Sends `master` to the console socket at `path`.
pub fn send_master(path: &Path, master: &OwnedFd) -> anyhow::Result<()> {
    let sock =
        UnixStream::connect(path).with_context(|| format!("console socket {}", path.display()))?;
    let fds = [master.as_raw_fd()];
    let name = b"/dev/ptmx";
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .with_context(|| format!("sending the pty over {}", path.display()))?;
    Ok(())
}

/// The window size of a terminal fd.
pub fn window_size(fd: &impl AsRawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into `ws`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0).then_some((ws.ws_row, ws.ws_col))
}

/// The host side of a terminal process: a raw pty whose master goes to the
/// console socket and whose slave carries the process's bytes. Returns the
/// stdio to connect and the master, to follow its window size.
pub fn console_stdio(socket: &Path) -> anyhow::Result<(HostStdio, OwnedFd)> {
    let pty = open_raw_pty()?;
    send_master(socket, &pty.master)?;
    let slave = std::fs::File::from(pty.slave);
    let stdio = HostStdio {
        stdin: Some(Box::new(slave.try_clone()?)),
        stdout: Some(Box::new(slave)),
        stderr: None,
        terminal: true,
    };
    Ok((stdio, pty.master))
}

/// Follows the window size that the console socket's owner sets on the host
/// master into the guest pty of process `exec_id` (empty: the init), until
/// `stop` is set (the process ended) or the agent stops answering.
pub fn follow_window_size(
    master: OwnedFd,
    agent: AgentClient,
    id: String,
    exec_id: String,
    stop: Arc<AtomicBool>,
) {
    let mut last = None;
    while !stop.load(Ordering::Relaxed) {
        let size = window_size(&master);
        if size.is_some() && size != last {
            if let Some((rows, cols)) = size {
                if agent
                    .resize_tty(&id, &exec_id, rows as u32, cols as u32)
                    .is_err()
                {
                    return;
                }
            }
            last = size;
        }
        // Polled: no event reports a window size change on a pty master
        // (SIGWINCH goes to the slave's foreground process group).
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
