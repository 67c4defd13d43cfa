//! virtio-fs through virtiofsd: one daemon per sandbox, sharing the
//! sandbox's shared directory. It exits by itself when the VM disconnects.

use super::BackendError;
use crate::child::HelperProcess;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The virtio-fs tag the guest mounts (the agent knows it too).
pub const TAG: &str = "husk";

pub struct VirtioFsBackend {
    pub process: HelperProcess,
    pub socket: PathBuf,
}

impl VirtioFsBackend {
    /// Starts the backend; [`Self::wait_ready`] waits for its socket, so
    /// that several backends can start at once.
    pub fn start(
        program: &Path,
        shared_dir: &Path,
        socket: &Path,
        cache: &str,
        log: &Path,
    ) -> Result<Self, BackendError> {
        let mut cmd = Command::new(program);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", shared_dir.display()))
            .arg(format!("--cache={cache}"))
            // Each container rootfs is a bind mount inside the shared
            // directory: announce them so inode numbers do not collide.
            .arg("--announce-submounts")
            // Pinned, not left to the version's defaults: its own mount
            // namespace rooted at the share, its seccomp filter killing on
            // anything else, and no capability to make device nodes or
            // file capabilities on host storage for a hostile guest.
            .arg("--sandbox=namespace")
            .arg("--seccomp=kill")
            // Without CAP_FSETID a write clears the set-id bits of the file
            // written: a guest cannot replace the contents of a set-uid
            // program on host storage and keep it set-uid.
            .arg("--modcaps=-mknod:-setfcap:-fsetid")
            .arg("--log-level=error");
        // Nor make one: no mode with S_ISUID or S_ISGID is set through it.
        crate::jail::apply_filters(&mut cmd, crate::jail::no_set_id_bits_filters()?);
        let process =
            HelperProcess::spawn("virtiofsd", cmd, log).map_err(|source| BackendError::Spawn {
                name: "virtiofsd",
                program: program.to_path_buf(),
                source,
            })?;
        Ok(VirtioFsBackend {
            process,
            socket: socket.to_path_buf(),
        })
    }

    /// Waits until the backend listens on its socket (or died).
    pub fn wait_ready(&mut self, log: &Path) -> Result<(), BackendError> {
        super::wait_for_socket(&mut self.process, &self.socket, log)
    }
}
