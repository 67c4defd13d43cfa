//! `husk_agent::network` on the host, in network namespaces the tests make:
//! a "guest root" namespace holding a veth end that stands in for the
//! virtio-net device, and a "container" namespace it is moved into. What
//! the kernel then holds is read back with `ip -j`. No traffic leaves
//! these namespaces (nothing is sent at all). Needs root and iproute2.

use husk_agent::network::{apply, NetworkConfig, NetworkError};
use husk_protocol::agent::{IpAddress, Neighbour, NetworkInterface, Route, UpdateNetworkRequest};
use husk_protocol::ErrorKind;
use serde_json::Value;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;

const GUEST_MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x53, 0x4b, 0x01];
const GATEWAY_MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x53, 0x4b, 0xfe];

fn require_root() {
    // SAFETY: geteuid(2) has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests make network namespaces and links: run them as root"
    );
}

/// Runs `ip` with `args` in the namespace `ns` (a thread enters it; the
/// child inherits the thread's namespace) and returns its stdout.
fn ip(ns: &OwnedFd, args: &[&str]) -> String {
    let ns = ns.try_clone().expect("dup of the namespace fd");
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let out = Command::new("ip")
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("running ip (iproute2 is needed): {e}"));
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .join()
    .expect("the ip thread")
}

fn ip_json(ns: &OwnedFd, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let out = ip(ns, &all);
    if out.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip {all:?} printed {out:?}: {e}"))
}

/// A new, empty network namespace (a thread unshares and hands it back).
fn new_netns() -> OwnedFd {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").expect("open ns"))
    })
    .join()
    .expect("the unshare thread")
}

/// The stand-in guest root: a veth pair, the end with GUEST_MAC playing
/// the virtio-net device, the peer up so the device has a carrier.
fn guest_root() -> OwnedFd {
    let ns = new_netns();
    ip(
        &ns,
        &[
            "link",
            "add",
            "hostdev0",
            "address",
            "02:48:55:53:4b:01",
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
        ],
    );
    ip(&ns, &["link", "set", "peer0", "up"]);
    ns
}

fn addr(bytes: &[u8], prefix_len: u32) -> IpAddress {
    IpAddress {
        address: bytes.to_vec(),
        prefix_len,
        ..Default::default()
    }
}

fn route(dest: &[u8], prefix_len: u32, gateway: &[u8], metric: u32, ipv6: bool) -> Route {
    Route {
        destination: dest.to_vec(),
        prefix_len,
        gateway: gateway.to_vec(),
        device: "eth0".into(),
        metric,
        ipv6,
        ..Default::default()
    }
}

const V4: [u8; 4] = [10, 200, 0, 2];
const V4_GW: [u8; 4] = [10, 200, 0, 1];
const V6: [u8; 16] = [0xfd, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const V6_GW: [u8; 16] = [0xfd, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

fn pod_request() -> UpdateNetworkRequest {
    UpdateNetworkRequest {
        container_id: "sandbox".into(),
        interfaces: vec![NetworkInterface {
            name: "eth0".into(),
            mac: GUEST_MAC.to_vec(),
            mtu: 1400,
            addresses: vec![addr(&V4, 24), addr(&V6, 64)],
            ..Default::default()
        }],
        routes: vec![
            route(&[], 0, &V4_GW, 100, false),
            route(&[], 0, &V6_GW, 0, true),
            route(&[10, 201, 0, 0], 16, &[], 0, false),
            // Through lo, the one device a request may name that it does
            // not configure: looked up in the namespace.
            Route {
                device: "lo".into(),
                ..route(&[10, 250, 0, 0], 16, &[], 0, false)
            },
        ],
        neighbours: vec![
            Neighbour {
                address: V4_GW.to_vec(),
                mac: GATEWAY_MAC.to_vec(),
                device: "eth0".into(),
                ..Default::default()
            },
            Neighbour {
                address: V6_GW.to_vec(),
                mac: GATEWAY_MAC.to_vec(),
                device: "eth0".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

fn find(items: &[Value], pred: impl Fn(&Value) -> bool) -> Option<&Value> {
    items.iter().find(|v| pred(v))
}

fn check_pod_network(root: &OwnedFd, pod: &OwnedFd) {
    // The device left the guest root for the pod's namespace.
    let root_links = ip_json(root, &["link", "show"]);
    assert!(
        find(&root_links, |l| l["address"] == "02:48:55:53:4b:01").is_none(),
        "the device is still in the source namespace: {root_links:?}"
    );

    let links = ip_json(pod, &["addr", "show"]);
    let eth0 = find(&links, |l| l["ifname"] == "eth0")
        .unwrap_or_else(|| panic!("no eth0 in the pod namespace: {links:?}"));
    assert_eq!(eth0["address"], "02:48:55:53:4b:01");
    assert_eq!(eth0["mtu"], 1400);
    let flags: Vec<&str> = eth0["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(flags.contains(&"UP"), "eth0 is not up: {flags:?}");
    let addrs: Vec<(String, u64, Value)> = eth0["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .map(|a| {
            (
                a["local"].as_str().unwrap_or_default().to_string(),
                a["prefixlen"].as_u64().unwrap_or_default(),
                a.clone(),
            )
        })
        .collect();
    assert!(
        addrs.iter().any(|(a, p, _)| a == "10.200.0.2" && *p == 24),
        "{addrs:?}"
    );
    let v6 = addrs
        .iter()
        .find(|(a, p, _)| a == "fd00:200::2" && *p == 64)
        .unwrap_or_else(|| panic!("no fd00:200::2/64: {addrs:?}"));
    // No duplicate address detection: not tentative, usable at once.
    assert!(v6.2.get("tentative").is_none(), "{:?}", v6.2);
    assert_eq!(v6.2["nodad"], true, "{:?}", v6.2);

    let lo = find(&links, |l| l["ifname"] == "lo").expect("lo");
    assert!(
        lo["flags"]
            .as_array()
            .expect("flags")
            .iter()
            .any(|f| f == "UP"),
        "lo is not up: {lo:?}"
    );

    let routes = ip_json(pod, &["route", "show"]);
    let default = find(&routes, |r| r["dst"] == "default")
        .unwrap_or_else(|| panic!("no IPv4 default route: {routes:?}"));
    assert_eq!(default["gateway"], "10.200.0.1");
    assert_eq!(default["dev"], "eth0");
    assert_eq!(default["metric"], 100);
    let link_route = find(&routes, |r| r["dst"] == "10.201.0.0/16")
        .unwrap_or_else(|| panic!("no 10.201.0.0/16 route: {routes:?}"));
    assert_eq!(link_route["dev"], "eth0");
    assert_eq!(link_route["scope"], "link");
    let lo_route = find(&routes, |r| r["dst"] == "10.250.0.0/16")
        .unwrap_or_else(|| panic!("no 10.250.0.0/16 route: {routes:?}"));
    assert_eq!(lo_route["dev"], "lo");

    let routes6 = ip_json(pod, &["-6", "route", "show"]);
    let default6 = find(&routes6, |r| r["dst"] == "default")
        .unwrap_or_else(|| panic!("no IPv6 default route: {routes6:?}"));
    assert_eq!(default6["gateway"], "fd00:200::1");
    assert_eq!(default6["dev"], "eth0");

    let neighbours = ip_json(pod, &["neigh", "show", "nud", "permanent"]);
    for gw in ["10.200.0.1", "fd00:200::1"] {
        let n = find(&neighbours, |n| n["dst"] == gw)
            .unwrap_or_else(|| panic!("no permanent neighbour {gw}: {neighbours:?}"));
        assert_eq!(n["lladdr"], "02:48:55:53:4b:fe");
        assert_eq!(n["dev"], "eth0");
    }
}

#[test]
fn moves_renames_addresses_and_routes_the_device() {
    require_root();
    let root = guest_root();
    let pod = new_netns();
    let config = NetworkConfig::from_request(&pod_request()).expect("a valid request");
    apply(&config, root.as_fd(), pod.as_fd()).expect("apply");
    check_pod_network(&root, &pod);
    // A second request (the host retrying) finds the device already in
    // place and leaves the same configuration.
    apply(&config, root.as_fd(), pod.as_fd()).expect("apply again");
    check_pod_network(&root, &pod);
}

#[test]
fn configures_the_device_where_it_already_is() {
    // A container without a network namespace of its own: source and
    // target are the guest's root namespace.
    require_root();
    let root = guest_root();
    let config = NetworkConfig::from_request(&pod_request()).expect("a valid request");
    apply(&config, root.as_fd(), root.as_fd()).expect("apply");
    let links = ip_json(&root, &["link", "show", "eth0"]);
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0]["address"], "02:48:55:53:4b:01");
    assert_eq!(links[0]["mtu"], 1400);
}

#[test]
fn configures_the_device_in_the_callers_own_namespace() {
    // The agent's case when the sandbox's network owner took the guest's
    // namespace: the calling thread is in it (here a thread of the test's
    // own, moved into the stand-in root), so nothing is moved or switched.
    require_root();
    let root = guest_root();
    let config = NetworkConfig::from_request(&pod_request()).expect("a valid request");
    let inside = root.try_clone().expect("dup");
    std::thread::spawn(move || {
        nix::sched::setns(&inside, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        apply(&config, inside.as_fd(), inside.as_fd())
    })
    .join()
    .expect("the thread")
    .expect("apply");
    let links = ip_json(&root, &["link", "show", "eth0"]);
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0]["address"], "02:48:55:53:4b:01");
    assert_eq!(links[0]["mtu"], 1400);
    let routes = ip_json(&root, &["route", "show", "default"]);
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["gateway"], "10.200.0.1");
}

#[test]
fn a_mac_no_device_has_fails_and_changes_nothing() {
    require_root();
    let root = guest_root();
    let pod = new_netns();
    let mut req = pod_request();
    req.interfaces[0].mac = vec![0x02, 0, 0, 0, 0, 0x99];
    let config = NetworkConfig::from_request(&req).expect("a valid request");
    let err = apply(&config, root.as_fd(), pod.as_fd()).expect_err("no such device");
    assert!(matches!(err, NetworkError::NoDevice { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("02:00:00:00:00:99"), "{err}");
    // Nothing moved, nothing added in the pod's namespace.
    let pod_links = ip_json(&pod, &["link", "show"]);
    assert_eq!(pod_links.len(), 1, "only lo: {pod_links:?}");
    assert!(ip_json(&pod, &["route", "show"]).is_empty());
    let root_links = ip_json(&root, &["link", "show", "hostdev0"]);
    assert_eq!(root_links.len(), 1, "{root_links:?}");
}

#[test]
fn a_name_taken_in_the_target_is_reported_with_its_item() {
    require_root();
    let root = guest_root();
    let pod = new_netns();
    let mut req = pod_request();
    // The kernel refuses the rename: the item and the step say which.
    ip(
        &pod,
        &["link", "add", "eth0", "type", "veth", "peer", "name", "x0"],
    );
    req.routes.clear();
    req.neighbours.clear();
    let config = NetworkConfig::from_request(&req).expect("a valid request");
    let err = apply(&config, root.as_fd(), pod.as_fd()).expect_err("eth0 is taken");
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("interface \"eth0\""), "{msg}");
    assert!(msg.contains("renaming"), "{msg}");
}
