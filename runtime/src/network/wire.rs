//! Joining a client interface to a tap for the VM, and undoing it.
//!
//! [`wire`] makes, in the client's namespace, a tap named after the
//! interface ([`super::tap::tap_name`]), gives it the interface's MTU, brings
//! it up, and joins the two with tc ([`super::tc`]). The tap's descriptor
//! goes to the VMM, which reads and writes the guest's frames on it: from
//! the VMM's own, empty, network namespace, since a tap works wherever its
//! descriptor is. [`unwire`] removes what [`wire`] made, from its
//! [`Wiring`] record; [`unwire_namespace`] does the same with no record
//! (after a crash), by name and by the filters' cookie. The client's
//! interfaces themselves stay the client's (CNI DEL, Docker remove them).

use super::config::Interface;
use super::netlink::{NetlinkError, RouteSocket};
use super::netns::{NetNs, NetnsError};
use super::tap::{open_tap, parse_tap_name, tap_name, TapError};
use super::tc;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use std::os::fd::OwnedFd;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("tap {0}: made, but not found in the namespace afterwards")]
    TapVanished(String),
}

/// What [`wire`] made for one interface: enough for [`unwire`] to remove it
/// from another process (it is kept in the sandbox's state).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Wiring {
    pub interface: String,
    pub interface_index: u32,
    pub tap: String,
    pub tap_index: u32,
    /// Whether husk added the interface's ingress qdisc (false: the client
    /// had one, which stays).
    pub made_ingress_qdisc: bool,
}

/// A wired tap: its descriptor (for the VMM), the MAC the guest's device
/// gets (the interface's), and the record of what was made.
#[derive(Debug)]
pub struct WiredTap {
    pub tap: OwnedFd,
    pub mac: [u8; 6],
    pub wiring: Wiring,
}

impl WiredTap {
    /// The tap for the sandbox's VM, and the record to keep for [`unwire`].
    pub fn into_vm_tap(self) -> Result<(super::VmTap, Wiring), std::io::Error> {
        Ok((super::VmTap::new(self.tap, self.mac)?, self.wiring))
    }
}

/// Makes the tap of `interface` in `netns` and joins the two with tc.
/// On failure nothing husk made stays behind.
pub fn wire(netns: &NetNs, interface: &Interface) -> Result<WiredTap, WireError> {
    let name = tap_name(interface.index)?;
    let (mut socket, tap) =
        netns.run(|| -> Result<_, WireError> { Ok((RouteSocket::new()?, open_tap(&name)?)) })??;
    // From here on the tap exists while `tap` is open: an error drops it,
    // and the tap with its qdisc and filter goes away by itself.
    let tap_index = link_index(&mut socket, &name)?.ok_or(WireError::TapVanished(name.clone()))?;
    let wiring = join(&mut socket, name, tap_index, interface)?;
    Ok(WiredTap {
        tap,
        mac: interface.mac,
        wiring,
    })
}

/// A tap made before the interface it will stand for exists: the VM gets
/// it at boot (QEMU's microvm has no hotplug), and [`wire_slot`] joins it
/// to the interface a prestart hook adds later (Docker's). Its guest
/// device has a MAC of its own until then (locally administered).
#[derive(Debug)]
pub struct TapSlot {
    pub tap: OwnedFd,
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
}

/// Makes the slot's tap in `netns` (named as the tap of interface index 0,
/// which no interface has, so crash cleanup finds it like the others).
pub fn open_slot(netns: &NetNs, mac: [u8; 6]) -> Result<TapSlot, WireError> {
    let name = tap_name(0)?;
    let (mut socket, tap) =
        netns.run(|| -> Result<_, WireError> { Ok((RouteSocket::new()?, open_tap(&name)?)) })??;
    let index = link_index(&mut socket, &name)?.ok_or(WireError::TapVanished(name.clone()))?;
    Ok(TapSlot {
        tap,
        name,
        index,
        mac,
    })
}

/// Joins a slot's tap (which the VM holds) to `interface`, which appeared
/// in `netns` since.
pub fn wire_slot(
    netns: &NetNs,
    slot_name: &str,
    slot_index: u32,
    interface: &Interface,
) -> Result<Wiring, WireError> {
    let mut socket = netns.run(RouteSocket::new)??;
    join(&mut socket, slot_name.to_string(), slot_index, interface)
}

/// Gives the tap the interface's MTU, brings it up and adds the qdiscs
/// and redirects each way; on failure undoes what it added.
fn join(
    socket: &mut RouteSocket,
    name: String,
    tap_index: u32,
    interface: &Interface,
) -> Result<Wiring, WireError> {
    socket.request(
        &format!("setting the MTU of {name} and bringing it up"),
        RouteNetlinkMessage::SetLink(up_with_mtu(tap_index, interface.mtu)),
        0,
    )?;
    tc::add_ingress_qdisc(socket, tap_index)?;
    tc::add_redirect(socket, tap_index, interface.index)?;
    let made_ingress_qdisc = tc::add_ingress_qdisc(socket, interface.index)?;
    let wiring = Wiring {
        interface: interface.name.clone(),
        interface_index: interface.index,
        tap: name,
        tap_index,
        made_ingress_qdisc,
    };
    if let Err(e) = tc::add_redirect(socket, interface.index, tap_index) {
        let _ = unwire_with(socket, &wiring);
        return Err(e.into());
    }
    Ok(wiring)
}

/// Removes what [`wire`] made; what is already gone is no error, so it can
/// run twice, or after the tap vanished with the VMM.
pub fn unwire(netns: &NetNs, wiring: &Wiring) -> Result<(), WireError> {
    let mut socket = netns.run(RouteSocket::new)??;
    unwire_with(&mut socket, wiring)
}

fn unwire_with(socket: &mut RouteSocket, wiring: &Wiring) -> Result<(), WireError> {
    remove_filter_of(socket, wiring.interface_index, wiring.made_ingress_qdisc)?;
    // Only the tap of this name at this index: the index of a tap that is
    // gone may have been given to another interface since.
    if link_index(socket, &wiring.tap)? == Some(wiring.tap_index) {
        delete_link(socket, wiring.tap_index)?;
    }
    Ok(())
}

/// Removes husk's redirect filter from interface `index`'s ingress (only if
/// it carries husk's cookie), and then the ingress qdisc when husk made it
/// (`made_qdisc`) or, with no record, when no filter is left on it.
fn remove_filter_of(
    socket: &mut RouteSocket,
    index: u32,
    made_qdisc: bool,
) -> Result<(), WireError> {
    let filters = tc::ingress_filters(socket, index)?;
    let ours = |f: &tc::IngressFilter| {
        f.priority == tc::FILTER_PRIORITY && f.redirects.iter().any(|r| r.husks)
    };
    if filters.iter().any(ours) {
        tc::delete_redirect(socket, index)?;
    }
    // husk's priority goes as a whole (a u32 filter's hash table too).
    let others_left = filters.iter().any(|f| f.priority != tc::FILTER_PRIORITY);
    if made_qdisc && !others_left {
        tc::delete_ingress_qdisc(socket, index)?;
    }
    Ok(())
}

/// Removes every tap of husk's in `netns` and husk's filters from the other
/// interfaces, with no record (after a crash of the monitor or the shim).
/// An ingress qdisc left with no filter once husk's is gone is removed too:
/// husk's wiring is what put it there unless the client made an empty one.
pub fn unwire_namespace(netns: &NetNs) -> Result<(), WireError> {
    let mut socket = netns.run(RouteSocket::new)??;
    let links = list_links(&mut socket)?;
    // Only taps that are husk's in every way: the name, and a tap that
    // lives only as long as its descriptors (husk's never persist). A
    // client's interface of that name, or its persistent tap, stays.
    let taps = husk_taps(&mut socket)?;
    for (index, name) in &links {
        if parse_tap_name(name).is_some() && taps.contains(index) {
            delete_link(&mut socket, *index)?;
        }
    }
    for (index, name) in &links {
        if parse_tap_name(name).is_none() {
            let ours = tc::ingress_filters(&mut socket, *index)?
                .iter()
                .any(|f| f.priority == tc::FILTER_PRIORITY && f.redirects.iter().any(|r| r.husks));
            if ours {
                remove_filter_of(&mut socket, *index, true)?;
            }
        }
    }
    Ok(())
}

fn up_with_mtu(index: u32, mtu: u32) -> LinkMessage {
    let mut message = LinkMessage::default();
    message.header.index = index;
    message.header.flags = LinkFlags::Up;
    message.header.change_mask = LinkFlags::Up;
    message.attributes.push(LinkAttribute::Mtu(mtu));
    message
}

fn delete_link(socket: &mut RouteSocket, index: u32) -> Result<(), WireError> {
    let mut message = LinkMessage::default();
    message.header.index = index;
    match socket.request(
        &format!("removing interface {index}"),
        RouteNetlinkMessage::DelLink(message),
        0,
    ) {
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(()),
        other => Ok(other?),
    }
}

/// Every interface of the socket's namespace, as the kernel describes it.
fn dump_links(socket: &mut RouteSocket) -> Result<Vec<LinkMessage>, WireError> {
    Ok(socket
        .dump(
            "listing interfaces",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
        )?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(link),
            _ => None,
        })
        .collect())
}

/// Every interface of the socket's namespace: (index, name).
fn list_links(socket: &mut RouteSocket) -> Result<Vec<(u32, String)>, WireError> {
    Ok(dump_links(socket)?
        .into_iter()
        .filter_map(|link| {
            link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some((link.header.index, n.clone())),
                _ => None,
            })
        })
        .collect())
}

/// The indexes of the namespace's non-persistent tun/tap devices.
fn husk_taps(socket: &mut RouteSocket) -> Result<Vec<u32>, WireError> {
    use netlink_packet_core::Nla;
    use netlink_packet_route::link::{InfoData, InfoKind, LinkInfo};
    // IFLA_TUN_PERSIST, a u8 (linux/if_link.h).
    const IFLA_TUN_PERSIST: u16 = 6;
    Ok(dump_links(socket)?
        .into_iter()
        .filter(|link| {
            let infos = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => Some(infos),
                _ => None,
            });
            let Some(infos) = infos else { return false };
            let tun = infos
                .iter()
                .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Tun)));
            let persistent = infos.iter().any(|i| match i {
                LinkInfo::Data(InfoData::Tun(nlas)) => nlas.iter().any(|nla| {
                    let mut value = vec![0u8; nla.value_len()];
                    nla.emit_value(&mut value);
                    nla.kind() == IFLA_TUN_PERSIST && value.first().is_some_and(|v| *v != 0)
                }),
                _ => false,
            });
            tun && !persistent
        })
        .map(|link| link.header.index)
        .collect())
}

fn link_index(socket: &mut RouteSocket, name: &str) -> Result<Option<u32>, WireError> {
    Ok(list_links(socket)?
        .into_iter()
        .find(|(_, n)| n == name)
        .map(|(index, _)| index))
}
