//! husk-vmm: a small KVM virtual machine monitor for husk sandboxes.
//!
//! One PVH-booted Linux guest, a COM1 serial console, a boot-marker port,
//! and vhost-user virtio-fs / virtio-vsock devices on virtio-mmio.

#![warn(missing_docs)]

pub mod api;
pub mod devices;
pub mod loader;
pub mod logger;
pub mod memory;
pub mod mptable;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static START: OnceLock<Instant> = OnceLock::new();

/// Record the process start instant (call first thing in `main`).
pub fn mark_process_start() {
    let _ = START.get_or_init(Instant::now);
}

/// Time since [`mark_process_start`] (or since first use).
pub fn process_uptime() -> Duration {
    START.get_or_init(Instant::now).elapsed()
}
