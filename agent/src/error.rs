//! The agent's error: one enum over the errors of its layers, each
//! message naming the object and the cause.

use crate::cgroup::devices::DeviceFilterError;
use crate::cgroup::CgroupError;
use crate::init::SHARED_DIR;
use crate::userns::UsernsError;
use husk_agent::plan::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("{0}")]
    Hook(#[from] crate::hooks::HookError),
    #[error("config.json: {0}")]
    Parse(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("process {exec_id:?} of container {id} does not exist")]
    NoProcess { id: String, exec_id: String },
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("container {0} is running: stop it first or remove it with force")]
    Running(String),
    #[error("container {0} was already started")]
    AlreadyStarted(String),
    #[error("the sandbox's shared directory ({SHARED_DIR}) is not mounted: no virtio-fs device")]
    NoShare,
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("starting {program:?}: {step}{reason}")]
    Spawn {
        program: String,
        step: String,
        reason: String,
    },
    #[error("{0}")]
    Stream(#[from] crate::streams::StreamError),
    #[error("{0}")]
    Userns(#[from] UsernsError),
    #[error("{0}")]
    Devices(#[from] DeviceFilterError),
    #[error("linux.devices: making {path} for the user namespace: {source}")]
    StageDevice {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
