//! Host networking of a sandbox (issue 14): the guest gets the interfaces
//! the client put in the container's network namespace, through taps
//! joined to them by tc and handed to the VMM as virtio-net devices.
//!
//! - [`netns`]: a network namespace held open, and work run inside it.
//! - [`netlink`]: a synchronous rtnetlink client.
//! - [`discover`]: what the namespace has ([`config::NetworkConfig`]).
//! - [`config`]: those types and their mapping onto the agent's
//!   `UpdateNetworkRequest`.
//! - [`tap`]: husk's taps, their names.
//! - [`tc`]: the ingress qdiscs and mirred redirect filters.
//! - [`wire`]: joining an interface to a tap, and undoing it.
//!
//! Interfaces that appear after the VM booted (Docker's prestart hook moves
//! the veth in after `create`): the VMM takes its taps at boot (QEMU's
//! microvm has no hotplug), so the tap must exist then, and [`wire`] runs
//! on the namespace of a running VM whenever the interface shows up. What
//! this does not settle yet is the MAC: the guest device's MAC is fixed at
//! boot, while the late interface's is known only when it appears, and the
//! agent finds interfaces by MAC; that part belongs with the integration.

pub mod config;
pub mod discover;
pub mod netlink;
pub mod netns;
pub mod tap;
pub mod tc;
pub mod wire;

pub use config::{Interface, IpNet, Neighbour, NetworkConfig, Route};
pub use discover::{discover, DiscoverError};
pub use netns::{NetNs, NetnsError};
pub use tap::{tap_name, VmTap};
pub use wire::{
    open_slot, unwire, unwire_namespace, wire, wire_slot, TapSlot, WireError, WiredTap, Wiring,
};
