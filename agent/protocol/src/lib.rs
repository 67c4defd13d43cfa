//! The wire protocol between the husk runtime (host) and husk-agent (guest).
//!
//! Two kinds of vsock connection cross the VM boundary:
//! - one ttrpc connection to [`AGENT_PORT`] carrying the [`agent`] service;
//! - any number of raw byte streams to [`STREAM_PORT`], each opened with a
//!   [`StreamHeader`] that names what it carries (a process stream, by token,
//!   or the echo diagnostic). Process stdio therefore never goes through RPCs.

#![deny(missing_docs)]

/// Messages of the agent API (generated from `proto/agent.proto`).
#[allow(missing_docs, unused, nonstandard_style, clippy::all, clippy::pedantic)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// ttrpc client and server glue of the agent API (generated).
#[allow(missing_docs, unused, nonstandard_style, clippy::all, clippy::pedantic)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub mod error;
pub mod resources;
pub mod stream;

pub use error::ErrorKind;
pub use stream::{StreamHeader, StreamKind, STDIN_ACK_EVERY, STDIN_ACK_LEN, STDIN_WINDOW};

/// vsock port on which the agent serves ttrpc.
pub const AGENT_PORT: u32 = 1024;
/// vsock port on which the agent accepts stream connections.
pub const STREAM_PORT: u32 = 1025;
/// The guest's vsock context id (the host is 2).
pub const GUEST_CID: u32 = 3;
/// The version string shared by the runtime and the agent built with it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
