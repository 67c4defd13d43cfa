//! The guest side of a pod's network (`UpdateNetwork`): the host's
//! interfaces arrive as virtio-net devices in the guest's root network
//! namespace; each is found by its MAC, moved into the network namespace of
//! the container that asked (a pod's sandbox container, whose namespace the
//! pod's other containers join), renamed, sized, addressed and brought up;
//! then routes and permanent neighbours are added there.
//!
//! [`NetworkConfig::from_request`] checks the whole request before anything
//! is applied; [`apply`] does the rtnetlink work on a thread of its own (a
//! network namespace is a per-thread attribute: `setns` there never moves
//! the serving threads) and takes the namespaces as file descriptors, so
//! the same code runs in the guest and in host tests on namespaces they
//! make.
//!
//! Which namespace: a container whose spec asks for a new network
//! namespace gets an empty one with only `lo` up at its creation, and
//! `UpdateNetwork` (sent between create and start) fills it; a pod member's
//! spec names the sandbox container's namespace, so configuring the sandbox
//! configures the pod; a container without a network namespace of its own
//! runs in the guest's root one, where the device is configured in place.

use husk_protocol::agent::{
    IpAddress as WireAddress, Neighbour as WireNeighbour, Route as WireRoute, UpdateNetworkRequest,
};
use netlink_packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator,
    NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkHeader, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The longest interface name the kernel takes (IFNAMSIZ less its NUL).
const IFNAME_MAX: usize = 15;
/// The netlink message type of a link in a dump (RTM_NEWLINK).
const RTM_NEWLINK: u16 = 16;
/// The link attributes a dump is read for (IFLA_ADDRESS, IFLA_IFNAME).
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
/// The size of a link message's header (struct ifinfomsg).
const IFINFOMSG_LEN: usize = 16;
/// The main routing table (RT_TABLE_MAIN).
const MAIN_TABLE: u8 = 254;
/// Sizes the kernel accepts for a link's MTU: IPv4's minimum (RFC 791) to
/// the largest an IP packet can be.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The request itself is wrong: nothing was applied.
    #[error("UpdateNetwork: {item}: {reason}")]
    Invalid { item: String, reason: String },
    /// No link of the guest has an interface's MAC.
    #[error("UpdateNetwork: interface {name:?}: no guest network device has MAC {mac}")]
    NoDevice { name: String, mac: Mac },
    /// The kernel refused a step, named with the item it was for.
    #[error("UpdateNetwork: {item}: {step}: {source}")]
    Netlink {
        item: String,
        step: &'static str,
        source: std::io::Error,
    },
    #[error("UpdateNetwork: entering the {which} network namespace: {source}")]
    Namespace {
        which: &'static str,
        source: std::io::Error,
    },
    #[error("UpdateNetwork: starting the thread that configures the namespace: {0}")]
    Thread(std::io::Error),
}

impl NetworkError {
    /// What kind of failure this is, for the host to act on without
    /// reading the message.
    pub fn kind(&self) -> husk_protocol::ErrorKind {
        use husk_protocol::ErrorKind;
        match self {
            NetworkError::Invalid { .. } => ErrorKind::InvalidArgument,
            // The request is well formed, the guest lacks what it names
            // (the host has not attached that device).
            NetworkError::NoDevice { .. } => ErrorKind::FailedPrecondition,
            NetworkError::Netlink { .. }
            | NetworkError::Namespace { .. }
            | NetworkError::Thread(_) => ErrorKind::Internal,
        }
    }
}

/// A link-layer (Ethernet) address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An address with its prefix, the prefix checked against the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefixed {
    pub address: IpAddr,
    pub prefix_len: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Mac,
    /// The device to use when it is not found by `mac` (a boot-time slot):
    /// it is given `mac`.
    pub device_mac: Option<Mac>,
    /// None leaves the device's MTU as it is (0 on the wire).
    pub mtu: Option<u32>,
    pub addresses: Vec<Prefixed>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The destination network; prefix 0 for a default route.
    pub destination: Prefixed,
    pub gateway: Option<IpAddr>,
    /// An interface of the request, or `lo`; None only with a gateway.
    pub device: Option<String>,
    pub metric: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub address: IpAddr,
    pub mac: Mac,
    pub device: String,
}

/// A checked `UpdateNetworkRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkConfig {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
}

fn invalid(item: impl Into<String>, reason: impl Into<String>) -> NetworkError {
    NetworkError::Invalid {
        item: item.into(),
        reason: reason.into(),
    }
}

fn parse_mac(item: &str, bytes: &[u8]) -> Result<Mac, NetworkError> {
    let mac: [u8; 6] = bytes
        .try_into()
        .map_err(|_| invalid(item, format!("a MAC has 6 bytes, not {}", bytes.len())))?;
    Ok(Mac(mac))
}

fn parse_ip(item: &str, what: &str, bytes: &[u8]) -> Result<IpAddr, NetworkError> {
    match bytes.len() {
        4 => {
            let b: [u8; 4] = bytes.try_into().unwrap_or_default();
            Ok(IpAddr::V4(Ipv4Addr::from(b)))
        }
        16 => {
            let b: [u8; 16] = bytes.try_into().unwrap_or_default();
            Ok(IpAddr::V6(Ipv6Addr::from(b)))
        }
        n => Err(invalid(
            item,
            format!("{what} has 4 (IPv4) or 16 (IPv6) bytes, not {n}"),
        )),
    }
}

fn check_prefix(item: &str, address: IpAddr, prefix_len: u32) -> Result<u8, NetworkError> {
    let max = if address.is_ipv4() { 32 } else { 128 };
    if prefix_len > max {
        return Err(invalid(
            item,
            format!("prefix length {prefix_len} is out of range for {address} (0 to {max})"),
        ));
    }
    Ok(prefix_len as u8)
}

/// A name the kernel takes for a link and that cannot be mistaken for a
/// path or an option (dev_valid_name's rules).
fn check_ifname(item: &str, name: &str) -> Result<(), NetworkError> {
    let bad = name.is_empty()
        || name.len() > IFNAME_MAX
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || !b.is_ascii_graphic());
    if bad {
        return Err(invalid(
            item,
            format!(
                "{name:?} is not an interface name (1 to {IFNAME_MAX} printable ASCII \
                 characters, no '/', ':' or space)"
            ),
        ));
    }
    Ok(())
}

impl NetworkConfig {
    /// Checks the whole request: every size, family, prefix and name, and
    /// that routes and neighbours name an interface of the request (or lo).
    pub fn from_request(req: &UpdateNetworkRequest) -> Result<Self, NetworkError> {
        let mut interfaces = Vec::with_capacity(req.interfaces.len());
        let mut names = HashSet::new();
        let mut macs = HashSet::new();
        for (i, wire) in req.interfaces.iter().enumerate() {
            let item = format!("interfaces[{i}] ({:?})", wire.name);
            check_ifname(&item, &wire.name)?;
            if wire.name == "lo" {
                return Err(invalid(&item, "lo is the namespace's own loopback"));
            }
            let mac = parse_mac(&item, &wire.mac)?;
            if mac.0 == [0; 6] || mac.0[0] & 1 != 0 {
                return Err(invalid(
                    &item,
                    format!("{mac} is not a device's (unicast, non-zero) MAC"),
                ));
            }
            let mtu = match wire.mtu {
                0 => None,
                m if MTU_RANGE.contains(&m) => Some(m),
                m => {
                    return Err(invalid(
                        &item,
                        format!(
                            "MTU {m} is out of range ({} to {})",
                            MTU_RANGE.start(),
                            MTU_RANGE.end()
                        ),
                    ))
                }
            };
            if !names.insert(wire.name.clone()) {
                return Err(invalid(&item, "the name is given twice"));
            }
            if !macs.insert(mac) {
                return Err(invalid(&item, format!("MAC {mac} is given twice")));
            }
            let addresses = wire
                .addresses
                .iter()
                .enumerate()
                .map(|(j, a)| parse_address(&format!("{item}.addresses[{j}]"), a))
                .collect::<Result<_, _>>()?;
            let device_mac = match wire.device_mac.as_slice() {
                [] => None,
                bytes => {
                    let device = parse_mac(&format!("{item}.device_mac"), bytes)?;
                    if device != mac && !macs.insert(device) {
                        return Err(invalid(&item, format!("MAC {device} is given twice")));
                    }
                    Some(device).filter(|d| *d != mac)
                }
            };
            interfaces.push(Interface {
                name: wire.name.clone(),
                mac,
                device_mac,
                mtu,
                addresses,
            });
        }
        let known = |item: &str, device: &str| {
            if device == "lo" || names.contains(device) {
                Ok(())
            } else {
                Err(invalid(
                    item,
                    format!("device {device:?} is not an interface of the request"),
                ))
            }
        };
        let routes = req
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| parse_route(&format!("routes[{i}]"), r, &known))
            .collect::<Result<_, _>>()?;
        let neighbours = req
            .neighbours
            .iter()
            .enumerate()
            .map(|(i, n)| parse_neighbour(&format!("neighbours[{i}]"), n, &known))
            .collect::<Result<_, _>>()?;
        Ok(NetworkConfig {
            interfaces,
            routes,
            neighbours,
        })
    }
}

fn parse_address(item: &str, wire: &WireAddress) -> Result<Prefixed, NetworkError> {
    let address = parse_ip(item, "the address", &wire.address)?;
    if address.is_unspecified() || address.is_multicast() {
        return Err(invalid(
            item,
            format!("{address} cannot be an interface's address"),
        ));
    }
    let prefix_len = check_prefix(item, address, wire.prefix_len)?;
    Ok(Prefixed {
        address,
        prefix_len,
    })
}

fn parse_route(
    item: &str,
    wire: &WireRoute,
    known: &dyn Fn(&str, &str) -> Result<(), NetworkError>,
) -> Result<Route, NetworkError> {
    let destination = if wire.destination.is_empty() {
        if wire.prefix_len != 0 {
            return Err(invalid(
                item,
                format!(
                    "an empty destination is a default route: prefix length 0, not {}",
                    wire.prefix_len
                ),
            ));
        }
        let any = if wire.ipv6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        Prefixed {
            address: any,
            prefix_len: 0,
        }
    } else {
        let address = parse_ip(item, "the destination", &wire.destination)?;
        if address.is_ipv6() != wire.ipv6 {
            return Err(invalid(
                item,
                format!("destination {address} disagrees with ipv6 = {}", wire.ipv6),
            ));
        }
        Prefixed {
            address,
            prefix_len: check_prefix(item, address, wire.prefix_len)?,
        }
    };
    let gateway = if wire.gateway.is_empty() {
        None
    } else {
        let gateway = parse_ip(item, "the gateway", &wire.gateway)?;
        if gateway.is_ipv6() != wire.ipv6 {
            return Err(invalid(
                item,
                format!("gateway {gateway} disagrees with ipv6 = {}", wire.ipv6),
            ));
        }
        if gateway.is_unspecified() || gateway.is_multicast() {
            return Err(invalid(item, format!("{gateway} cannot be a gateway")));
        }
        Some(gateway)
    };
    let device = if wire.device.is_empty() {
        if gateway.is_none() {
            return Err(invalid(item, "a route needs a device, a gateway or both"));
        }
        None
    } else {
        known(item, &wire.device)?;
        Some(wire.device.clone())
    };
    Ok(Route {
        destination,
        gateway,
        device,
        metric: wire.metric,
    })
}

fn parse_neighbour(
    item: &str,
    wire: &WireNeighbour,
    known: &dyn Fn(&str, &str) -> Result<(), NetworkError>,
) -> Result<Neighbour, NetworkError> {
    let address = parse_ip(item, "the address", &wire.address)?;
    if address.is_unspecified() || address.is_multicast() {
        return Err(invalid(item, format!("{address} cannot be a neighbour")));
    }
    let mac = parse_mac(item, &wire.mac)?;
    known(item, &wire.device)?;
    Ok(Neighbour {
        address,
        mac,
        device: wire.device.clone(),
    })
}

/// Applies `config` in the network namespace `target`, taking the
/// interfaces it does not hold yet from `source` (the guest's root
/// namespace, where virtio-net devices appear). Interfaces first (moved,
/// renamed, sized, addressed, up), then `lo` up, then routes, then
/// neighbours: the first failure stops and names its item.
pub fn apply(
    config: &NetworkConfig,
    source: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
) -> Result<(), NetworkError> {
    let source = source
        .try_clone_to_owned()
        .map_err(|source| NetworkError::Namespace {
            which: "source",
            source,
        })?;
    let target = target
        .try_clone_to_owned()
        .map_err(|source| NetworkError::Namespace {
            which: "target",
            source,
        })?;
    // The guest's own namespace (the sandbox's network owner took it, see
    // `guest_network_namespace`) when the calling thread is in it too: the
    // devices are there already; no thread, no namespace switch, no move.
    let own = std::fs::File::open("/proc/thread-self/ns/net").map_err(|source| {
        NetworkError::Namespace {
            which: "caller's",
            source,
        }
    })?;
    if same_namespace(&source, &target)? && same_namespace(&target, &own.into())? {
        let here = Rtnl::open_here("target")?;
        return apply_with(config, &here, &here, &target);
    }
    let config = config.clone();
    // A thread of its own, ended after: setns(CLONE_NEWNET) changes only
    // the calling thread, which must not be a serving one.
    let worker = std::thread::Builder::new()
        .name("netns-config".into())
        .spawn(move || {
            let from = Rtnl::open_in(&source, "source")?;
            let to = Rtnl::open_in(&target, "target")?;
            apply_with(&config, &from, &to, &target)
        })
        .map_err(NetworkError::Thread)?;
    worker.join().unwrap_or_else(|_| {
        Err(NetworkError::Thread(std::io::Error::other(
            "the thread configuring the namespace panicked",
        )))
    })
}

fn apply_with(
    config: &NetworkConfig,
    from: &Rtnl,
    to: &Rtnl,
    target: &OwnedFd,
) -> Result<(), NetworkError> {
    // Each request interface's name and the index it has in the target,
    // for the routes and neighbours that name it.
    let mut names = std::collections::HashMap::new();
    for iface in &config.interfaces {
        let item = format!("interface {:?} ({})", iface.name, iface.mac);
        // A boot-time slot is found by its own MAC and given `mac` below;
        // a repeated request finds it by `mac` already.
        let device = iface.device_mac.unwrap_or(iface.mac);
        let in_target = to.links(&item)?;
        let found = in_target
            .iter()
            .find(|l| l.mac == Some(iface.mac))
            .or_else(|| in_target.iter().find(|l| l.mac == Some(device)));
        let link = match found {
            Some(link) => link.clone(),
            None => {
                let Some(link) = from
                    .links(&item)?
                    .into_iter()
                    .find(|l| l.mac == Some(device))
                else {
                    return Err(NetworkError::NoDevice {
                        name: iface.name.clone(),
                        mac: iface.mac,
                    });
                };
                let mut msg = LinkMessage::default();
                msg.header.index = link.index;
                msg.attributes
                    .push(LinkAttribute::NetNsFd(target.as_raw_fd()));
                from.request(
                    &item,
                    "moving it into the namespace",
                    RouteNetlinkMessage::SetLink(msg),
                    0,
                )?;
                // Found again: the move keeps the index only where the
                // target has it free.
                to.links(&item)?
                    .into_iter()
                    .find(|l| l.mac == Some(device))
                    .ok_or_else(|| NetworkError::NoDevice {
                        name: iface.name.clone(),
                        mac: iface.mac,
                    })?
            }
        };
        // Renaming needs the link down: it is (at boot, and a move brings
        // it down), or a repeated request takes it down first.
        if link.up {
            to.set_up(&item, link.index, false)?;
        }
        // Renamed, sized, given its MAC and brought up in one request: the
        // kernel applies the name, MTU and address before the flags.
        let mut msg = LinkMessage::default();
        msg.header.index = link.index;
        msg.header.change_mask = LinkFlags::Up;
        msg.header.flags = LinkFlags::Up;
        msg.attributes
            .push(LinkAttribute::IfName(iface.name.clone()));
        if let Some(mtu) = iface.mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if iface.device_mac.is_some() {
            msg.attributes
                .push(LinkAttribute::Address(iface.mac.0.to_vec()));
        }
        to.request(
            &item,
            "renaming it, setting its MTU and bringing it up",
            RouteNetlinkMessage::SetLink(msg),
            0,
        )?;
        for a in &iface.addresses {
            to.add_address(&item, link.index, a)?;
        }
        names.insert(iface.name.as_str(), link.index);
    }
    // lo is up already (the agent's boot, or the container child, made it
    // so); made sure of with the two interface ioctls rather than a
    // netlink lookup. The calling thread is in the target namespace here:
    // the one it was in (own namespace) or the one `to` was opened in,
    // last.
    loopback_up_here().map_err(|source| NetworkError::Namespace {
        which: "target's lo",
        source,
    })?;
    // A route or neighbour names a request interface or lo (checked by
    // `from_request`); lo's index is looked up once, when one names it.
    let mut lo = None;
    let mut index_of = |item: &str, name: &str| -> Result<Option<u32>, NetworkError> {
        if let Some(index) = names.get(name) {
            return Ok(Some(*index));
        }
        if lo.is_none() {
            lo = Some(
                to.links(item)?
                    .into_iter()
                    .find(|l| l.name.as_deref() == Some(name))
                    .map(|l| l.index),
            );
        }
        Ok(lo.flatten())
    };
    for (i, r) in config.routes.iter().enumerate() {
        let item = format!(
            "routes[{i}] ({}/{})",
            r.destination.address, r.destination.prefix_len
        );
        let oif =
            match &r.device {
                Some(d) => Some(index_of(&item, d)?.ok_or_else(|| {
                    invalid(&item, format!("device {d:?} is not in the namespace"))
                })?),
                None => None,
            };
        to.add_route(&item, r, oif)?;
    }
    for (i, n) in config.neighbours.iter().enumerate() {
        let item = format!("neighbours[{i}] ({} at {})", n.address, n.mac);
        let index = index_of(&item, &n.device)?.ok_or_else(|| {
            invalid(
                &item,
                format!("device {:?} is not in the namespace", n.device),
            )
        })?;
        to.add_neighbour(&item, index, n)?;
    }
    Ok(())
}

/// What UpdateNetwork reads of a link in a dump.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LinkSummary {
    index: u32,
    up: bool,
    mac: Option<Mac>,
    name: Option<String>,
}

impl LinkSummary {
    /// A link message's payload (ifinfomsg and attributes); None when it
    /// is too short for its header. An attribute that is malformed ends
    /// the reading of the rest (what was read stays); a MAC that is not 6
    /// bytes (a link that is not Ethernet) is no MAC.
    fn parse(payload: &[u8]) -> Option<LinkSummary> {
        let header = LinkHeader::parse(payload).ok()?;
        let mut link = LinkSummary {
            index: header.index,
            up: header.flags.contains(LinkFlags::Up),
            mac: None,
            name: None,
        };
        let attributes = payload.get(IFINFOMSG_LEN..)?;
        for attribute in NlasIterator::new(attributes).map_while(Result::ok) {
            match attribute.kind() {
                IFLA_ADDRESS => link.mac = <[u8; 6]>::try_from(attribute.value()).ok().map(Mac),
                IFLA_IFNAME => {
                    // NUL-terminated.
                    let name = attribute.value().split(|b| *b == 0).next().unwrap_or(&[]);
                    link.name = std::str::from_utf8(name).ok().map(str::to_string);
                }
                _ => {}
            }
        }
        Some(link)
    }
}

/// An rtnetlink socket of one network namespace (a socket stays in the
/// namespace it was made in).
struct Rtnl {
    socket: Socket,
}

fn family(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// Whether two namespace descriptors name the same namespace (the same
/// nsfs inode).
fn same_namespace(a: &OwnedFd, b: &OwnedFd) -> Result<bool, NetworkError> {
    let stat = |fd: &OwnedFd, which| {
        nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| NetworkError::Namespace {
            which,
            source: e.into(),
        })
    };
    let (a, b) = (stat(a, "source")?, stat(b, "target")?);
    Ok(a.st_dev == b.st_dev && a.st_ino == b.st_ino)
}

/// Brings up the loopback of the calling thread's network namespace: at
/// boot the guest's own (which the sandbox's network owner may take as
/// its own), in a container child its fresh one. Two interface ioctls, not
/// netlink: at boot, under TCG, the first netlink dump and its parsing
/// cost the guest about 20 ms more. No allocation and no lock, so the
/// container child may call it between fork and exec.
pub fn loopback_up_here() -> std::io::Result<()> {
    // SAFETY: a datagram socket only to issue interface ioctls; its fd is
    // owned at once.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `sock` was just opened and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the named interface's flags into `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union field SIOCGIFFLAGS wrote.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`, which names lo and its flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Rtnl {
    /// Enters `ns` (this thread only) and opens a socket there.
    fn open_in(ns: &OwnedFd, which: &'static str) -> Result<Self, NetworkError> {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            NetworkError::Namespace {
                which,
                source: e.into(),
            }
        })?;
        Self::open_here(which)
    }

    /// Opens a socket in the calling thread's namespace.
    fn open_here(which: &'static str) -> Result<Self, NetworkError> {
        let fail = |source| NetworkError::Namespace { which, source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(fail)?;
        socket.bind_auto().map_err(fail)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(fail)?;
        Ok(Rtnl { socket })
    }

    /// Sends one request and reads its replies: the kernel's
    /// acknowledgement, or the messages of a dump, each handed to `each`
    /// raw (its type and payload) and read no further than it needs.
    fn exchange(
        &self,
        item: &str,
        step: &'static str,
        message: RouteNetlinkMessage,
        flags: u16,
        mut each: impl FnMut(u16, &[u8]),
    ) -> Result<(), NetworkError> {
        let fail = |source| NetworkError::Netlink {
            item: item.to_string(),
            step,
            source,
        };
        let malformed = |e: netlink_packet_core::DecodeError| {
            fail(std::io::Error::other(format!("a malformed reply: {e}")))
        };
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = 1;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf[..]);
        self.socket.send(&buf, 0).map_err(fail)?;
        let mut received = vec![0u8; 64 * 1024];
        loop {
            let size = self.socket.recv(&mut &mut received[..], 0).map_err(fail)?;
            let mut offset = 0;
            while offset < size {
                // Checked: the header fits and its length is within what
                // was received, and at least a header's.
                let reply =
                    NetlinkBuffer::new_checked(&received[offset..size]).map_err(malformed)?;
                match reply.message_type() {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let error = ErrorBuffer::new_checked(reply.payload()).map_err(malformed)?;
                        return match error.code() {
                            None => Ok(()),
                            Some(code) => Err(fail(std::io::Error::from_raw_os_error(
                                code.get().saturating_neg(),
                            ))),
                        };
                    }
                    kind => each(kind, reply.payload()),
                }
                // Messages start 4-byte aligned (NLMSG_ALIGN).
                offset += (reply.length() as usize).div_ceil(4) * 4;
            }
        }
    }

    /// Sends one request that is answered by an acknowledgement.
    fn request(
        &self,
        item: &str,
        step: &'static str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), NetworkError> {
        self.exchange(item, step, message, flags, |_, _| {})
    }

    /// Every link of the namespace: its index, whether it is up, its MAC
    /// and name. Read from the dump's raw attributes, not decoded whole:
    /// a link message carries statistics and per-protocol settings that
    /// would all be parsed (under TCG, milliseconds of the create).
    fn links(&self, item: &str) -> Result<Vec<LinkSummary>, NetworkError> {
        let mut links = Vec::new();
        self.exchange(
            item,
            "listing links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
            |kind, payload| {
                if kind == RTM_NEWLINK {
                    links.extend(LinkSummary::parse(payload));
                }
            },
        )?;
        Ok(links)
    }

    fn set_up(&self, item: &str, index: u32, up: bool) -> Result<(), NetworkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.change_mask = LinkFlags::Up;
        if up {
            msg.header.flags = LinkFlags::Up;
        }
        let step = if up {
            "bringing it up"
        } else {
            "taking it down"
        };
        self.request(item, step, RouteNetlinkMessage::SetLink(msg), 0)?;
        Ok(())
    }

    fn add_address(&self, item: &str, index: u32, a: &Prefixed) -> Result<(), NetworkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = family(&a.address);
        msg.header.prefix_len = a.prefix_len;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Address(a.address));
        if a.address.is_ipv4() {
            msg.attributes.push(AddressAttribute::Local(a.address));
        } else {
            // No duplicate address detection: the host assigned it, and
            // the address must be usable as soon as the container starts.
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.request(
            item,
            "adding an address",
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    fn add_route(&self, item: &str, r: &Route, oif: Option<u32>) -> Result<(), NetworkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(&r.destination.address);
        msg.header.destination_prefix_length = r.destination.prefix_len;
        msg.header.table = MAIN_TABLE;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = if r.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if r.destination.prefix_len > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(
                    r.destination.address,
                )));
        }
        if let Some(gw) = r.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if let Some(oif) = oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        if r.metric != 0 {
            msg.attributes.push(RouteAttribute::Priority(r.metric));
        }
        self.request(
            item,
            "adding the route",
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    fn add_neighbour(&self, item: &str, index: u32, n: &Neighbour) -> Result<(), NetworkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(&n.address);
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.kind = RouteType::Unicast;
        let destination = match n.address {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        };
        msg.attributes
            .push(NeighbourAttribute::Destination(destination));
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(n.mac.0.to_vec()));
        self.request(
            item,
            "adding the neighbour",
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocol::agent::NetworkInterface;
    use husk_protocol::ErrorKind;

    fn request() -> UpdateNetworkRequest {
        UpdateNetworkRequest {
            container_id: "c".into(),
            interfaces: vec![NetworkInterface {
                name: "eth0".into(),
                mac: vec![2, 0, 0, 0, 0, 1],
                mtu: 1500,
                addresses: vec![
                    WireAddress {
                        address: vec![10, 0, 0, 2],
                        prefix_len: 24,
                        ..Default::default()
                    },
                    WireAddress {
                        address: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).octets().to_vec(),
                        prefix_len: 64,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            routes: vec![WireRoute {
                gateway: vec![10, 0, 0, 1],
                device: "eth0".into(),
                metric: 10,
                ..Default::default()
            }],
            neighbours: vec![WireNeighbour {
                address: vec![10, 0, 0, 1],
                mac: vec![2, 0, 0, 0, 0, 0xfe],
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        a.extend(kind.to_ne_bytes());
        a.extend(value);
        a.resize(a.len().div_ceil(4) * 4, 0);
        a
    }

    fn link_payload(index: u32, flags: u32, attributes: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![0, 0];
        p.extend(1u16.to_ne_bytes()); // ARPHRD_ETHER
        p.extend(index.to_ne_bytes());
        p.extend(flags.to_ne_bytes());
        p.extend(0u32.to_ne_bytes());
        for a in attributes {
            p.extend(a);
        }
        p
    }

    #[test]
    fn a_link_is_read_for_its_index_state_mac_and_name_only() {
        let payload = link_payload(
            7,
            libc::IFF_UP as u32,
            &[
                attribute(IFLA_IFNAME, b"eth0\0"),
                attribute(4 /* IFLA_MTU */, &1500u32.to_ne_bytes()),
                attribute(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 1]),
            ],
        );
        let link = LinkSummary::parse(&payload).expect("a link");
        assert_eq!(
            link,
            LinkSummary {
                index: 7,
                up: true,
                mac: Some(Mac([2, 0, 0, 0, 0, 1])),
                name: Some("eth0".into()),
            }
        );
    }

    #[test]
    fn a_malformed_link_message_yields_what_is_well_formed() {
        // Too short for its header: no link.
        assert_eq!(LinkSummary::parse(&[0; 15]), None);
        // An address that is not Ethernet's is no MAC; an attribute whose
        // length runs past the message ends the reading.
        let mut broken = attribute(IFLA_ADDRESS, &[1, 2, 3, 4, 5, 6]);
        broken[0] = 200;
        let payload = link_payload(
            3,
            0,
            &[
                attribute(IFLA_ADDRESS, &[0; 20]),
                attribute(IFLA_IFNAME, b"ib0\0"),
                broken,
            ],
        );
        let link = LinkSummary::parse(&payload).expect("a link");
        assert_eq!(
            link,
            LinkSummary {
                index: 3,
                up: false,
                mac: None,
                name: Some("ib0".into()),
            }
        );
    }

    #[test]
    fn a_valid_request_is_read_as_given() {
        let c = NetworkConfig::from_request(&request()).expect("valid");
        assert_eq!(c.interfaces.len(), 1);
        let i = &c.interfaces[0];
        assert_eq!(i.name, "eth0");
        assert_eq!(i.mac, Mac([2, 0, 0, 0, 0, 1]));
        assert_eq!(i.mtu, Some(1500));
        assert_eq!(
            i.addresses[1].address,
            "fd00::2".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(i.addresses[1].prefix_len, 64);
        assert_eq!(
            c.routes,
            vec![Route {
                destination: Prefixed {
                    address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    prefix_len: 0
                },
                gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
                device: Some("eth0".into()),
                metric: 10,
            }]
        );
        assert_eq!(c.neighbours[0].mac.to_string(), "02:00:00:00:00:fe");
    }

    /// Each malformed field is refused before anything is applied, as an
    /// InvalidArgument naming the item and the fault.
    #[test]
    fn malformed_requests_are_refused_naming_the_item() {
        type Edit = fn(&mut UpdateNetworkRequest);
        let cases: [(Edit, &str); 16] = [
            (
                |r| r.interfaces[0].mac = vec![2, 0, 0, 0, 1],
                "6 bytes, not 5",
            ),
            (|r| r.interfaces[0].mac = vec![0; 6], "not a device's"),
            (
                |r| r.interfaces[0].mac = vec![1, 0, 0, 0, 0, 1],
                "not a device's",
            ),
            (
                |r| r.interfaces[0].name = "a/b".into(),
                "not an interface name",
            ),
            (
                |r| r.interfaces[0].name = "x".repeat(16),
                "not an interface name",
            ),
            (
                |r| r.interfaces[0].name = String::new(),
                "not an interface name",
            ),
            (|r| r.interfaces[0].name = "lo".into(), "loopback"),
            (|r| r.interfaces[0].mtu = 67, "MTU 67 is out of range"),
            (
                |r| r.interfaces[0].addresses[0].address = vec![10, 0, 0],
                "4 (IPv4) or 16 (IPv6) bytes, not 3",
            ),
            (
                |r| r.interfaces[0].addresses[0].prefix_len = 33,
                "prefix length 33 is out of range",
            ),
            (
                |r| r.interfaces[0].addresses[1].prefix_len = 129,
                "prefix length 129 is out of range",
            ),
            (
                |r| r.routes[0].device = "eth1".into(),
                "\"eth1\" is not an interface",
            ),
            (|r| r.routes[0].prefix_len = 8, "prefix length 0, not 8"),
            (|r| r.routes[0].ipv6 = true, "disagrees with ipv6"),
            (|r| r.neighbours[0].mac = vec![2; 7], "6 bytes, not 7"),
            (
                |r| r.neighbours[0].device = "wlan0".into(),
                "\"wlan0\" is not an interface",
            ),
        ];
        for (edit, expected) in cases {
            let mut r = request();
            edit(&mut r);
            let err = NetworkConfig::from_request(&r).expect_err(expected);
            assert!(matches!(err, NetworkError::Invalid { .. }), "{err}");
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
            assert!(
                err.to_string().contains(expected),
                "{err} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn a_slot_device_is_named_by_its_own_mac() {
        let mut r = request();
        assert_eq!(
            NetworkConfig::from_request(&r).expect("valid").interfaces[0].device_mac,
            None
        );
        r.interfaces[0].device_mac = vec![0x02, 0, 0, 0, 0, 0x99];
        let c = NetworkConfig::from_request(&r).expect("valid");
        assert_eq!(
            c.interfaces[0].device_mac,
            Some(Mac([0x02, 0, 0, 0, 0, 0x99]))
        );
        // The interface's own MAC as the device's: no slot.
        r.interfaces[0].device_mac = r.interfaces[0].mac.clone();
        let c = NetworkConfig::from_request(&r).expect("valid");
        assert_eq!(c.interfaces[0].device_mac, None);
        r.interfaces[0].device_mac = vec![1, 2, 3];
        let e = NetworkConfig::from_request(&r).expect_err("5-byte MAC taken");
        assert!(e.to_string().contains("device_mac"), "{e}");
    }

    #[test]
    fn duplicates_and_deviceless_link_routes_are_refused() {
        let mut r = request();
        let mut second = r.interfaces[0].clone();
        second.name = "eth1".into();
        r.interfaces.push(second);
        let err = NetworkConfig::from_request(&r).expect_err("same MAC twice");
        assert!(err.to_string().contains("given twice"), "{err}");

        let mut r = request();
        r.routes[0].gateway.clear();
        r.routes[0].device.clear();
        let err = NetworkConfig::from_request(&r).expect_err("no device, no gateway");
        assert!(err.to_string().contains("needs a device"), "{err}");
    }
}
