//! What the guest's network is made of: the interfaces, addresses, routes
//! and neighbours read from the client's namespace ([`super::discover`]),
//! mapped one to one onto the agent's `UpdateNetworkRequest`.

use husk_protocol::agent;
use std::net::IpAddr;

/// An address with its prefix length (`10.0.0.2/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IpNet {
    pub address: IpAddr,
    pub prefix_len: u8,
}

/// One interface of the namespace, as the guest gets it: same name, same
/// MAC (so nothing changes for the host side), same MTU and addresses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Interface {
    /// Its index in the client's namespace (not sent to the guest).
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<IpNet>,
}

/// A route of the main table. `destination` is `None` for a default route,
/// whose family `ipv6` gives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    pub destination: Option<IpNet>,
    pub gateway: Option<IpAddr>,
    /// The interface's name (the guest's interface of that name).
    pub device: String,
    pub metric: u32,
    pub ipv6: bool,
}

/// A permanent neighbour entry (a static ARP/NDP entry).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Neighbour {
    pub address: IpAddr,
    pub mac: [u8; 6],
    pub device: String,
}

/// Everything the guest's network gets.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkConfig {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
}

fn ip_bytes(address: IpAddr) -> Vec<u8> {
    match address {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

impl NetworkConfig {
    /// The agent's request that gives container `container_id`'s guest this
    /// network.
    pub fn to_request(&self, container_id: &str) -> agent::UpdateNetworkRequest {
        agent::UpdateNetworkRequest {
            container_id: container_id.to_string(),
            interfaces: self
                .interfaces
                .iter()
                .map(|i| agent::NetworkInterface {
                    name: i.name.clone(),
                    mac: i.mac.to_vec(),
                    mtu: i.mtu,
                    addresses: i
                        .addresses
                        .iter()
                        .map(|a| agent::IpAddress {
                            address: ip_bytes(a.address),
                            prefix_len: u32::from(a.prefix_len),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|r| agent::Route {
                    // The proto's default route: no destination bytes,
                    // prefix 0, the family in `ipv6`.
                    destination: r
                        .destination
                        .map(|d| ip_bytes(d.address))
                        .unwrap_or_default(),
                    prefix_len: r.destination.map_or(0, |d| u32::from(d.prefix_len)),
                    gateway: r.gateway.map(ip_bytes).unwrap_or_default(),
                    device: r.device.clone(),
                    metric: r.metric,
                    ipv6: r.ipv6,
                    ..Default::default()
                })
                .collect(),
            neighbours: self
                .neighbours
                .iter()
                .map(|n| agent::Neighbour {
                    address: ip_bytes(n.address),
                    mac: n.mac.to_vec(),
                    device: n.device.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn config() -> NetworkConfig {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 88, 0, 2));
        let v6: IpAddr = "fd00:88::2".parse().unwrap();
        NetworkConfig {
            interfaces: vec![Interface {
                index: 7,
                name: "eth0".into(),
                mac: [0x02, 0, 0, 0, 0, 0x42],
                mtu: 1400,
                addresses: vec![
                    IpNet {
                        address: v4,
                        prefix_len: 24,
                    },
                    IpNet {
                        address: v6,
                        prefix_len: 64,
                    },
                ],
            }],
            routes: vec![
                Route {
                    destination: None,
                    gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 88, 0, 1))),
                    device: "eth0".into(),
                    metric: 0,
                    ipv6: false,
                },
                Route {
                    destination: Some(IpNet {
                        address: IpAddr::V6(Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 0)),
                        prefix_len: 48,
                    }),
                    gateway: None,
                    device: "eth0".into(),
                    metric: 1024,
                    ipv6: true,
                },
            ],
            neighbours: vec![Neighbour {
                address: IpAddr::V4(Ipv4Addr::new(10, 88, 0, 9)),
                mac: [0x02, 0, 0, 0, 0, 0x09],
                device: "eth0".into(),
            }],
        }
    }

    #[test]
    fn the_request_carries_every_field_in_the_protos_encoding() {
        let request = config().to_request("c1");
        assert_eq!(request.container_id, "c1");
        let [eth0] = request.interfaces.as_slice() else {
            panic!("{:?}", request.interfaces)
        };
        assert_eq!(eth0.name, "eth0");
        assert_eq!(eth0.mac, vec![0x02, 0, 0, 0, 0, 0x42]);
        assert_eq!(eth0.mtu, 1400);
        assert_eq!(eth0.addresses[0].address, vec![10, 88, 0, 2]);
        assert_eq!(eth0.addresses[0].prefix_len, 24);
        assert_eq!(eth0.addresses[1].address.len(), 16);
        assert_eq!(eth0.addresses[1].prefix_len, 64);

        let default = &request.routes[0];
        assert!(default.destination.is_empty(), "{default:?}");
        assert_eq!(default.prefix_len, 0);
        assert!(!default.ipv6);
        assert_eq!(default.gateway, vec![10, 88, 0, 1]);
        assert_eq!(default.device, "eth0");

        let link = &request.routes[1];
        assert_eq!(link.destination.len(), 16);
        assert_eq!(link.destination[..2], [0xfd, 0x01]);
        assert_eq!(link.prefix_len, 48);
        assert!(link.gateway.is_empty(), "a link route has no gateway");
        assert_eq!(link.metric, 1024);
        assert!(link.ipv6);

        let [n] = request.neighbours.as_slice() else {
            panic!("{:?}", request.neighbours)
        };
        assert_eq!(n.address, vec![10, 88, 0, 9]);
        assert_eq!(n.mac, vec![0x02, 0, 0, 0, 0, 0x09]);
        assert_eq!(n.device, "eth0");
    }

    #[test]
    fn the_config_survives_the_state_file() {
        let c = config();
        let back: NetworkConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
