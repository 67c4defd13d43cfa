//! The host ends of a task's stdio: the FIFOs (or files) containerd names.

use husk_runtime::sandbox::HostStdio;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// containerd names stdio as a path, or as `scheme://…` for a logging
/// binary (`binary://`) or a file (`file://`).
fn local_path(name: &str) -> anyhow::Result<Option<PathBuf>> {
    if name.is_empty() {
        return Ok(None);
    }
    if let Some(p) = name.strip_prefix("file://") {
        return Ok(Some(PathBuf::from(p)));
    }
    if name.contains("://") {
        anyhow::bail!("stdio {name:?}: husk supports FIFOs and file:// only");
    }
    Ok(Some(PathBuf::from(name)))
}

/// Opens an output for writing without blocking on a FIFO that has no
/// reader yet (containerd opens its read ends first; if it did not, keep a
/// read end ourselves so the open cannot hang).
fn open_output(path: &Path) -> anyhow::Result<File> {
    let is_fifo = std::fs::metadata(path).map(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_fifo()
    });
    let file = match is_fifo {
        Ok(true) => match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                OpenOptions::new().read(true).write(true).open(path)?
            }
            Err(e) => return Err(anyhow::anyhow!("opening {}: {e}", path.display())),
        },
        _ => OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?,
    };
    set_blocking(&file);
    Ok(file)
}

fn set_blocking(file: &File) {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

/// stdin, opened on first read: the open of a FIFO's read end waits for
/// its writer, which containerd may open after the task starts.
struct LazyInput {
    path: PathBuf,
    file: Option<File>,
}

impl Read for LazyInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.file.is_none() {
            self.file = Some(File::open(&self.path)?);
        }
        match self.file.as_mut() {
            Some(f) => f.read(buf),
            None => Ok(0),
        }
    }
}

/// Output that ignores a reader that went away, so the guest's side keeps
/// draining (a stopped `ctr` must not block the container).
struct Output(File);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(buf.len()),
            other => other,
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Builds the host side of a process's stdio from containerd's names.
pub fn host_stdio(
    stdin: &str,
    stdout: &str,
    stderr: &str,
    terminal: bool,
) -> anyhow::Result<HostStdio> {
    let mut io = HostStdio {
        terminal,
        ..Default::default()
    };
    if let Some(p) = local_path(stdin)? {
        io.stdin = Some(Box::new(LazyInput {
            path: p,
            file: None,
        }));
    }
    if let Some(p) = local_path(stdout)? {
        io.stdout = Some(Box::new(Output(open_output(&p)?)));
    }
    if !terminal {
        if let Some(p) = local_path(stderr)? {
            io.stderr = Some(Box::new(Output(open_output(&p)?)));
        }
    }
    Ok(io)
}
