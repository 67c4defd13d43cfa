//! Reading the client's network namespace: the interfaces the client put
//! there (a veth of CNI or Docker, a macvlan...), with their MAC, MTU and
//! addresses, the main table's routes and the permanent neighbours, which
//! the guest's interfaces get as they are.

use super::config::{Interface, IpNet, Neighbour, NetworkConfig, Route};
use super::netlink::{NetlinkError, RouteSocket};
use super::netns::{NetNs, NetnsError};
use super::tap::parse_tap_name;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::collections::BTreeMap;
use std::net::IpAddr;

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// The network of the namespace `netns`, less `lo` and husk's own taps.
/// Only Ethernet interfaces are taken (a tap can carry only Ethernet
/// frames): tunnels the kernel makes in every namespace (`sit0`, `tunl0`)
/// are skipped.
pub fn discover(netns: &NetNs) -> Result<NetworkConfig, DiscoverError> {
    let mut socket = netns.run(RouteSocket::new)??;
    discover_with(&mut socket)
}

/// [`discover`] on a socket already in the namespace.
pub fn discover_with(socket: &mut RouteSocket) -> Result<NetworkConfig, DiscoverError> {
    let links = socket.dump(
        "listing interfaces",
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
    )?;
    let mut interfaces: BTreeMap<u32, Interface> = links
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => interface_of(&link),
            _ => None,
        })
        .map(|i| (i.index, i))
        .collect();

    let addresses = socket.dump(
        "listing addresses",
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
    )?;
    for message in addresses {
        let RouteNetlinkMessage::NewAddress(address) = message else {
            continue;
        };
        if let Some(interface) = interfaces.get_mut(&address.header.index) {
            if let Some(net) = address_of(&address) {
                interface.addresses.push(net);
            }
        }
    }

    let names: BTreeMap<u32, String> = interfaces
        .values()
        .map(|i| (i.index, i.name.clone()))
        .collect();
    let routes = socket
        .dump(
            "listing routes",
            RouteNetlinkMessage::GetRoute(RouteMessage::default()),
        )?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(route) => route_of(&route, &names),
            _ => None,
        })
        .collect();

    let neighbours = socket
        .dump(
            "listing neighbours",
            RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
        )?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => neighbour_of(&n, &names),
            _ => None,
        })
        .collect();

    Ok(NetworkConfig {
        interfaces: interfaces.into_values().collect(),
        routes,
        neighbours,
    })
}

fn mac_of(bytes: &[u8]) -> Option<[u8; 6]> {
    bytes.try_into().ok()
}

fn interface_of(link: &LinkMessage) -> Option<Interface> {
    if link.header.link_layer_type != LinkLayerType::Ether {
        return None; // lo (Loopback), tunnels, tun devices
    }
    let mut name = None;
    let mut mac = None;
    let mut mtu = None;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(a) => mac = mac_of(a),
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            _ => {}
        }
    }
    let name = name?;
    if parse_tap_name(&name).is_some() {
        return None;
    }
    Some(Interface {
        index: link.header.index,
        name,
        mac: mac?,
        mtu: mtu?,
        addresses: Vec::new(),
    })
}

fn address_of(message: &AddressMessage) -> Option<IpNet> {
    let mut address = None;
    let mut local = None;
    let mut flags = AddressFlags::empty();
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Address(a) => address = Some(*a),
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Flags(f) => flags = *f,
            _ => {}
        }
    }
    if flags.contains(AddressFlags::Dadfailed) {
        return None;
    }
    // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's
    // on a point-to-point link); IPv6 has only IFA_ADDRESS.
    let address = local.or(address)?;
    if let IpAddr::V6(v6) = address {
        // Link-local: the guest's kernel makes its own from the MAC.
        if v6.segments()[0] & 0xffc0 == 0xfe80 {
            return None;
        }
    }
    Some(IpNet {
        address,
        prefix_len: message.header.prefix_len,
    })
}

fn route_address(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// A route of the main table through one of the interfaces. Routes the
/// kernel made itself (proto kernel: the prefix route of each address, the
/// IPv6 link-local one) are left out: the guest's kernel makes the same
/// when the agent adds the addresses.
fn route_of(route: &RouteMessage, names: &BTreeMap<u32, String>) -> Option<Route> {
    let ipv6 = match route.header.address_family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    if route.header.kind != RouteType::Unicast || route.header.protocol == RouteProtocol::Kernel {
        return None;
    }
    let mut table = u32::from(route.header.table);
    let mut destination = None;
    let mut gateway = None;
    let mut device = None;
    let mut metric = 0;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => destination = route_address(d),
            RouteAttribute::Gateway(g) => gateway = route_address(g),
            RouteAttribute::Oif(o) => device = Some(*o),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    // A multipath route has no single device: not mirrored.
    let device = names.get(&device?)?.clone();
    let destination = destination.map(|address| IpNet {
        address,
        prefix_len: route.header.destination_prefix_length,
    });
    Some(Route {
        destination,
        gateway,
        device,
        metric,
        ipv6,
    })
}

fn neighbour_of(message: &NeighbourMessage, names: &BTreeMap<u32, String>) -> Option<Neighbour> {
    if message.header.state != NeighbourState::Permanent {
        return None;
    }
    let device = names.get(&message.header.ifindex)?.clone();
    let mut address = None;
    let mut mac = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                address = Some(IpAddr::V4(*a))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                address = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = mac_of(l),
            _ => {}
        }
    }
    Some(Neighbour {
        address: address?,
        mac: mac?,
        device,
    })
}
