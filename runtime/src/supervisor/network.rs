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
    #[error("network namespace {}: {count} interfaces appeared after the VM booted; it has one slot for them", .path.display())]
    TooLate { path: PathBuf, count: usize },
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

/// Whether interfaces may appear in the container's own new network
/// namespace (one without a path) before it starts: only a host hook can
/// put them there, and Docker's `libnetwork-setkey` prestart hook does.
/// Such a container's namespace is made by husk (its state.pid lives in
/// it) and its VM boots with a tap slot for the interface to come.
pub fn interfaces_may_come_late(spec: &Spec) -> bool {
    let own_namespace = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|nss| {
            nss.iter().any(|ns| {
                ns.typ() == LinuxNamespaceType::Network
                    && ns.path().as_ref().is_none_or(|p| p.as_os_str().is_empty())
            })
        });
    #[allow(deprecated)]
    let hooked = spec.hooks().as_ref().is_some_and(|h| {
        h.prestart().as_ref().is_some_and(|v| !v.is_empty())
            || h.create_runtime().as_ref().is_some_and(|v| !v.is_empty())
    });
    own_namespace && hooked
}

/// A tap the VM boots with before its interface exists.
struct Slot {
    name: String,
    index: u32,
    mac: [u8; 6],
}

/// The client's interfaces joined to the VM's taps, until [`Self::unwire`].
pub struct SandboxNetwork {
    netns: NetNs,
    config: NetworkConfig,
    wirings: Vec<Wiring>,
    slot: Option<Slot>,
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
            slot: None,
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

    /// A tap slot in the (still empty) namespace at `path`, for the
    /// interface a host hook will add before start ([`Self::fill_slot`]).
    pub fn reserve_slot(path: &Path) -> Result<(SandboxNetwork, VmTap), SandboxNetworkError> {
        let netns = NetNs::open(path).map_err(|source| SandboxNetworkError::Namespace {
            path: path.to_path_buf(),
            source,
        })?;
        let slot = network::open_slot(&netns, local_mac()).map_err(|source| {
            SandboxNetworkError::Wire {
                path: path.to_path_buf(),
                interface: "a slot".into(),
                source,
            }
        })?;
        let tap = VmTap::new(slot.tap, slot.mac).map_err(|source| SandboxNetworkError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let made = SandboxNetwork {
            netns,
            config: NetworkConfig::default(),
            wirings: Vec::new(),
            slot: Some(Slot {
                name: slot.name,
                index: slot.index,
                mac: slot.mac,
            }),
        };
        Ok((made, tap))
    }

    /// After the hooks: joins the interface that appeared in the namespace
    /// to the slot. A namespace still empty stays so (loopback only); more
    /// than one interface is refused (the VM has one slot).
    pub fn fill_slot(&mut self) -> Result<(), SandboxNetworkError> {
        let Some(slot) = &self.slot else {
            return Ok(());
        };
        let path = self.netns.path().to_path_buf();
        let config =
            network::discover(&self.netns).map_err(|source| SandboxNetworkError::Discover {
                path: path.clone(),
                source,
            })?;
        let interface = match config.interfaces.as_slice() {
            [] => return Ok(()),
            [one] => one.clone(),
            more => {
                return Err(SandboxNetworkError::TooLate {
                    path,
                    count: more.len(),
                })
            }
        };
        let wiring = network::wire_slot(&self.netns, &slot.name, slot.index, &interface).map_err(
            |source| SandboxNetworkError::Wire {
                path,
                interface: interface.name.clone(),
                source,
            },
        )?;
        self.wirings.push(wiring);
        self.config = config;
        Ok(())
    }

    /// What the guest is told for container `container_id` (the VM's own
    /// container: a pod's sandbox, or a plain container).
    pub fn request(&self, container_id: &str) -> UpdateNetworkRequest {
        let mut request = self.config.to_request(container_id);
        if let (Some(slot), Some(first)) = (&self.slot, request.interfaces.first_mut()) {
            first.device_mac = slot.mac.to_vec();
        }
        request
    }

    pub fn has_slot(&self) -> bool {
        self.slot.is_some()
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

/// A locally administered unicast MAC for a slot's guest device, until it
/// gets its interface's.
fn local_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom(2) writes at most `mac.len()` bytes into `mac`.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != 6 {
        // Not secret, only distinct: the time and pid will do.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id();
        mac[2..].copy_from_slice(&t.to_be_bytes());
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
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
