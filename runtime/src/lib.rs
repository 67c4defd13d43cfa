//! husk's sandbox library, shared by the `husk` CLI and the containerd shim.
//!
//! A [`sandbox::Sandbox`] is one microVM: its hypervisor process (QEMU or
//! husk-vmm, behind [`hypervisor::Hypervisor`]), its vhost-user device
//! backends ([`backends`]: virtiofsd and the vsock backend), the client of
//! the agent inside it ([`agent::AgentClient`]) and its directory on disk.

pub mod agent;
pub mod artifacts;
pub mod backends;
pub mod child;
pub mod config;
pub mod console;
pub mod event;
pub mod host_cgroup;
pub mod hypervisor;
pub mod jail;
pub mod lockfile;
pub mod network;
pub mod phases;
pub mod pool;
pub mod rpc;
pub mod sandbox;
pub mod share;
pub mod sizing;
pub mod stream_pump;
pub mod supervisor;
