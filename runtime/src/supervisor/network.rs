//! A sandbox's network, for the CLI's monitor and the shim alike: the
//! client's network namespace (`linux.namespaces[network].path`: CNI's,
//! podman's, a test's), each of its interfaces wired to a tap the VM gets
//! as virtio-net, and the guest told the same addresses, routes and
//! neighbours (`UpdateNetwork`, between create and start).
//!
//! A spec with no network namespace asks for the host's network, which a
//! VM cannot share; a new namespace without a path is the container's own,
//! empty one. Both give the container loopback only (logged): the OCI
//! validation suite and `husk run` of a plain `runc spec` bundle keep
//! working, as with runc's default bundle, which has no interfaces either.

use crate::network::{self, NetNs, NetworkConfig, VmTap, Wiring};
use husk_protocol::agent::UpdateNetworkRequest;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SandboxNetworkError {
    #[error("config.json: linux.namespaces: network namespace {}: {source}", .path.display())]
    Namespace {
        path: PathBuf,
        source: network::NetnsError,
    },
    #[error("network namespace {}: reading its interfaces: {source}", .path.display())]
    Discover {
        path: PathBuf,
        source: network::DiscoverError,
    },
    #[error("network namespace {}: joining {interface} to a tap: {source}", .path.display())]
    Wire {
        path: PathBuf,
        interface: String,
        source: network::WireError,
    },
    #[error("network namespace {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The network namespace the spec names by path, if any.
pub fn namespace_path(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
        .filter(|p| !p.as_os_str().is_empty())
}

/// The spec as the guest gets it: the network namespace path names the
/// host's (client's) namespace, which the guest cannot enter; the
/// container gets a new one in the guest instead, which `UpdateNetwork`
/// fills with the interfaces wired here.
pub fn guest_spec_without_network_path(spec: &mut serde_json::Value) {
    let Some(namespaces) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(serde_json::Value::as_array_mut)
    else {
        return;
    };
    for ns in namespaces.iter_mut() {
        if ns.get("type").and_then(serde_json::Value::as_str) == Some("network") {
            if let Some(obj) = ns.as_object_mut() {
                obj.remove("path");
            }
        }
    }
}

/// The client's interfaces joined to the VM's taps, until [`Self::unwire`].
pub struct SandboxNetwork {
    netns: NetNs,
    config: NetworkConfig,
    wirings: Vec<Wiring>,
}

impl SandboxNetwork {
    /// Reads the interfaces of the namespace at `path` and joins each to a
    /// new tap; the taps are for the VMM (`SandboxConfig::network`). On
    /// failure, what was made is undone.
    pub fn wire(path: &Path) -> Result<(SandboxNetwork, Vec<VmTap>), SandboxNetworkError> {
        let netns = NetNs::open(path).map_err(|source| SandboxNetworkError::Namespace {
            path: path.to_path_buf(),
            source,
        })?;
        let config = network::discover(&netns).map_err(|source| SandboxNetworkError::Discover {
            path: path.to_path_buf(),
            source,
        })?;
        let mut made = SandboxNetwork {
            netns,
            config,
            wirings: Vec::new(),
        };
        let mut taps = Vec::new();
        for interface in made.config.interfaces.clone() {
            let wired = match network::wire(&made.netns, &interface) {
                Ok(w) => w,
                Err(source) => {
                    made.unwire();
                    return Err(SandboxNetworkError::Wire {
                        path: path.to_path_buf(),
                        interface: interface.name,
                        source,
                    });
                }
            };
            match wired.into_vm_tap() {
                Ok((tap, wiring)) => {
                    made.wirings.push(wiring);
                    taps.push(tap);
                }
                Err(source) => {
                    made.unwire();
                    return Err(SandboxNetworkError::Io {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
        Ok((made, taps))
    }

    /// What the guest is told for container `container_id` (the VM's own
    /// container: a pod's sandbox, or a plain container).
    pub fn request(&self, container_id: &str) -> UpdateNetworkRequest {
        self.config.to_request(container_id)
    }

    pub fn is_empty(&self) -> bool {
        self.config.interfaces.is_empty()
    }

    pub fn path(&self) -> &Path {
        self.netns.path()
    }

    /// Removes the taps, qdiscs and filters husk made; the client's
    /// interfaces are the client's (CNI DEL, Docker). Best effort: each
    /// failure is logged.
    pub fn unwire(&mut self) {
        for wiring in self.wirings.drain(..) {
            if let Err(e) = network::unwire(&self.netns, &wiring) {
                log::warn!(
                    "network namespace {}: unwiring {}: {e}",
                    self.netns.path().display(),
                    wiring.interface
                );
            }
        }
    }
}

impl Drop for SandboxNetwork {
    fn drop(&mut self) {
        self.unwire();
    }
}

/// After a crash of whoever wired it: removes every tap, qdisc and filter
/// of husk's in the namespace at `path` (by husk's names and cookie), if
/// the namespace still exists.
pub fn unwire_after_crash(path: &Path) {
    let Ok(netns) = NetNs::open(path) else {
        return;
    };
    if let Err(e) = network::unwire_namespace(&netns) {
        log::warn!("network namespace {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_gets_a_new_network_namespace_for_the_clients() {
        let mut spec = serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "ipc", "path": "/proc/1/ns/ipc"}
        ]}});
        let typed: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": spec["linux"].clone()
        }))
        .expect("spec");
        assert_eq!(
            namespace_path(&typed),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        guest_spec_without_network_path(&mut spec);
        assert_eq!(
            spec["linux"]["namespaces"][1],
            serde_json::json!({"type": "network"})
        );
        // Only the network namespace's path: the others are the agent's to refuse.
        assert_eq!(spec["linux"]["namespaces"][2]["path"], "/proc/1/ns/ipc");
    }
}
