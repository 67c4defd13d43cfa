//! The tc plumbing that joins a tap to a client interface (Kata's
//! "tcfilter", Firecracker's tc-redirect-tap): an ingress qdisc on each,
//! and on each a filter that matches every frame and whose
//! `mirred egress redirect` action sends it to the other one.
//!
//! The filter is a u32 one with a single all-zero key (`u32 match u32 0 0`,
//! as Kata does), not `matchall`: u32 is in every kernel that has tc, while
//! `matchall` (CONFIG_NET_CLS_MATCHALL) is missing from minimal ones.
//!
//! husk's filters are marked: they sit at priority [`FILTER_PRIORITY`] and
//! their action carries the cookie [`ACTION_COOKIE`], so that a cleanup
//! after a crash removes them, and only them, from a client interface.

use super::netlink::{NetlinkError, RouteSocket};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;

/// The priority of husk's redirect filters.
pub const FILTER_PRIORITY: u16 = 0xc0de;
/// The cookie of husk's mirred actions (the kernel keeps it, and shows it
/// in dumps, without interpreting it).
pub const ACTION_COOKIE: &[u8] = b"husk-tap-mirred";
// The kernel refuses cookies over TC_COOKIE_MAX_SIZE (16) bytes.
const _: () = assert!(ACTION_COOKIE.len() <= 16);

/// ETH_P_ALL in network byte order, as `tcm_info` wants the protocol.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();

/// The ingress qdisc's handle (`ffff:`), which its filters name as parent.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

fn qdisc_message(index: u32) -> TcMessage {
    let mut message = TcMessage::with_index(index as i32);
    message.header.parent = TcHandle::INGRESS;
    message.header.handle = INGRESS_HANDLE;
    message
        .attributes
        .push(TcAttribute::Kind("ingress".to_string()));
    message
}

fn filter_message(index: u32) -> TcMessage {
    let mut message = TcMessage::with_index(index as i32);
    message.header.parent = INGRESS_HANDLE;
    message.header.info = (u32::from(FILTER_PRIORITY) << 16) | u32::from(ETH_P_ALL_BE);
    message
}

/// Adds an ingress qdisc to interface `index`. Returns whether husk made
/// it (false: the interface had one already, which stays the client's).
pub fn add_ingress_qdisc(socket: &mut RouteSocket, index: u32) -> Result<bool, NetlinkError> {
    match socket.request(
        &format!("adding an ingress qdisc to interface {index}"),
        RouteNetlinkMessage::NewQueueDiscipline(qdisc_message(index)),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes the ingress qdisc of interface `index` (and every filter on it);
/// one that is not there (or an interface that is gone) is no error.
pub fn delete_ingress_qdisc(socket: &mut RouteSocket, index: u32) -> Result<(), NetlinkError> {
    absent_is_fine(socket.request(
        &format!("removing the ingress qdisc of interface {index}"),
        RouteNetlinkMessage::DelQueueDiscipline(qdisc_message(index)),
        0,
    ))
}

/// Adds husk's filter to the ingress of interface `from`: every frame is
/// redirected to the egress of interface `to`.
pub fn add_redirect(socket: &mut RouteSocket, from: u32, to: u32) -> Result<(), NetlinkError> {
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".to_string()),
        TcActionAttribute::Cookie(ACTION_COOKIE.to_vec()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    // One key that masks nothing: every frame matches; terminal, so the
    // classification ends here.
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];
    let mut message = filter_message(from);
    message.attributes = vec![
        TcAttribute::Kind(TcFilterU32::KIND.to_string()),
        TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]),
    ];
    socket.request(
        &format!("adding a redirect filter from interface {from} to {to}"),
        RouteNetlinkMessage::NewTrafficFilter(message),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// Removes husk's filter from the ingress of interface `index`; one that is
/// not there is no error.
pub fn delete_redirect(socket: &mut RouteSocket, index: u32) -> Result<(), NetlinkError> {
    absent_is_fine(socket.request(
        &format!("removing the redirect filter of interface {index}"),
        RouteNetlinkMessage::DelTrafficFilter(filter_message(index)),
        0,
    ))
}

/// One filter on an ingress: its priority, and for each mirred action its
/// target and whether it is husk's (by cookie).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressFilter {
    pub priority: u16,
    pub kind: String,
    pub redirects: Vec<Redirect>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub to: u32,
    pub egress_redirect: bool,
    pub husks: bool,
}

/// The filters on the ingress of interface `index` (none when it has no
/// ingress qdisc).
pub fn ingress_filters(
    socket: &mut RouteSocket,
    index: u32,
) -> Result<Vec<IngressFilter>, NetlinkError> {
    let mut query = TcMessage::with_index(index as i32);
    query.header.parent = INGRESS_HANDLE;
    let answer = match socket.dump(
        &format!("listing the ingress filters of interface {index}"),
        RouteNetlinkMessage::GetTrafficFilter(query),
    ) {
        Ok(answer) => answer,
        Err(e) if matches!(e.errno(), Some(libc::EINVAL | libc::ENOENT)) => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut filters = Vec::new();
    for message in answer {
        let RouteNetlinkMessage::NewTrafficFilter(filter) = message else {
            continue;
        };
        if filter.header.index != index as i32 {
            continue;
        }
        let mut kind = String::new();
        let mut redirects = Vec::new();
        for attribute in &filter.attributes {
            match attribute {
                TcAttribute::Kind(k) => kind = k.clone(),
                TcAttribute::Options(options) => {
                    for option in options {
                        if let TcOption::U32(TcFilterU32Option::Action(actions)) = option {
                            redirects.extend(actions.iter().filter_map(redirect_of));
                        }
                    }
                }
                _ => {}
            }
        }
        // A u32 filter is dumped as several entries of one priority (its
        // hash table, then the filter with its actions).
        if kind.is_empty() {
            continue;
        }
        filters.push(IngressFilter {
            priority: (filter.header.info >> 16) as u16,
            kind,
            redirects,
        });
    }
    Ok(filters)
}

fn redirect_of(action: &TcAction) -> Option<Redirect> {
    let mut husks = false;
    let mut mirror = None;
    for attribute in &action.attributes {
        match attribute {
            TcActionAttribute::Cookie(c) => husks = c == ACTION_COOKIE,
            TcActionAttribute::Options(options) => {
                for option in options {
                    if let TcActionOption::Mirror(TcActionMirrorOption::Parms(m)) = option {
                        mirror = Some(m.clone());
                    }
                }
            }
            _ => {}
        }
    }
    let mirror = mirror?;
    Some(Redirect {
        to: mirror.ifindex,
        egress_redirect: mirror.eaction == TcMirrorActionType::EgressRedir,
        husks,
    })
}

/// Treats "it is not there" (the object or its interface) as done.
fn absent_is_fine(result: Result<(), NetlinkError>) -> Result<(), NetlinkError> {
    match result {
        Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_header_says_priority_and_all_protocols() {
        let message = filter_message(5);
        assert_eq!(message.header.index, 5);
        assert_eq!(u32::from(message.header.parent), 0xffff_0000);
        assert_eq!(message.header.info >> 16, u32::from(FILTER_PRIORITY));
        // htons(ETH_P_ALL) as the kernel reads it from memory.
        assert_eq!(
            (message.header.info as u16).to_ne_bytes(),
            (libc::ETH_P_ALL as u16).to_be_bytes()
        );
    }
}
