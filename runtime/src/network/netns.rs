//! A network namespace, held by an open descriptor, and running a piece of
//! work inside it.
//!
//! The work runs on a thread of its own that joins the namespace and then
//! ends: no thread that goes on serving ever changes namespace. What it
//! creates there (a netlink socket, a descriptor of /dev/net/tun) stays
//! bound to the namespace and can be used from any thread afterwards.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: opening: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("network namespace {path}: not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("network namespace {path}: joining (setns): {source}")]
    Join {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("network namespace {path}: the worker thread: {detail}")]
    Thread { path: PathBuf, detail: String },
}

/// An open network namespace (`/proc/<pid>/ns/net`, `/run/netns/<name>`,
/// or the path of `linux.namespaces[network]`).
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    path: PathBuf,
}

impl NetNs {
    /// Opens the namespace at `path` and checks that it is one.
    pub fn open(path: &Path) -> Result<NetNs, NetnsError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| NetnsError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let fd = OwnedFd::from(file);
        // NS_GET_NSTYPE says what kind of namespace the file is; a path the
        // caller got wrong (a mount namespace, a plain file) is refused here
        // rather than by a confusing setns failure later.
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: the ioctl takes no argument and reads only the descriptor.
        let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns {
                path: path.to_path_buf(),
            });
        }
        Ok(NetNs {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on a new thread that has joined this namespace, and
    /// returns its result. The thread ends with the work.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        let fd = self.fd.as_fd();
        std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("husk-netns".into())
                .spawn_scoped(scope, move || -> Result<T, std::io::Error> {
                    join(fd)?;
                    Ok(work())
                })
                .map_err(|e| NetnsError::Thread {
                    path: self.path.clone(),
                    detail: e.to_string(),
                })?;
            match worker.join() {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(source)) => Err(NetnsError::Join {
                    path: self.path.clone(),
                    source,
                }),
                Err(_) => Err(NetnsError::Thread {
                    path: self.path.clone(),
                    detail: "panicked".into(),
                }),
            }
        })
    }
}

/// Moves the calling thread into the network namespace `fd`.
fn join(fd: BorrowedFd<'_>) -> Result<(), std::io::Error> {
    // SAFETY: setns on a descriptor we hold open; it changes only the
    // calling thread, which is the scoped worker thread that ends after
    // the work.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
