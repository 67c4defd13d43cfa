//! husk-agent's library: the planner (an OCI spec and the host's request to
//! a launch plan, the seccomp program compiled in it), pure and callable on
//! the host by tests and fuzz targets. The binary (`main.rs`) is PID 1 of
//! the guest on top of it; see [`plan`] for the layers. [`network`] applies
//! `UpdateNetwork` in a network namespace given as a file descriptor.

pub mod network;
pub mod plan;
