//! virtio-vsock through a vhost-user backend in the hybrid convention
//! (rust-vmm's vhost-device-vsock): the host side of the guest's vsock is a
//! Unix socket; the host connects and sends `CONNECT <port>\n`, answered by
//! `OK <n>\n`. It does not exit when the VM goes away: the sandbox ends it.

use super::BackendError;
use crate::child::HelperProcess;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct VsockBackend {
    pub process: HelperProcess,
    /// The vhost-user socket the VMM connects to.
    pub vhost_socket: PathBuf,
    /// The hybrid Unix socket the host connects to.
    pub uds: PathBuf,
}

impl VsockBackend {
    /// Starts the backend; [`Self::wait_ready`] waits for its socket, so
    /// that several backends can start at once.
    pub fn start(
        program: &Path,
        guest_cid: u32,
        vhost_socket: &Path,
        uds: &Path,
        log: &Path,
        jail: Option<crate::jail::Jail>,
    ) -> Result<Self, BackendError> {
        let mut cmd = Command::new(program);
        cmd.arg("--vm").arg(format!(
            "guest-cid={guest_cid},socket={},uds-path={}",
            vhost_socket.display(),
            uds.display()
        ));
        if let Some(jail) = jail {
            jail.apply(&mut cmd);
        }
        let process = HelperProcess::spawn("vhost-device-vsock", cmd, log).map_err(|source| {
            BackendError::Spawn {
                name: "vhost-device-vsock",
                program: program.to_path_buf(),
                source,
            }
        })?;
        Ok(VsockBackend {
            process,
            vhost_socket: vhost_socket.to_path_buf(),
            uds: uds.to_path_buf(),
        })
    }

    /// Waits until the backend listens on its vhost-user socket (or died).
    pub fn wait_ready(&mut self, log: &Path) -> Result<(), BackendError> {
        super::wait_for_socket(&mut self.process, &self.vhost_socket, log)
    }
}
