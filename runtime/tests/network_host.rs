//! Host networking against real namespaces: discovery, wiring a tap to an
//! interface with tc, frames through it both ways, and the teardown.
//!
//! Every test makes its own network namespaces (`ip netns add husk-t-...`)
//! and a veth pair between them, and sends traffic only between those: one
//! end (the "client" namespace) stands for the container's namespace that
//! CNI or Docker set up, the other (the "peer") for the rest of the network.
//! Needs root and iproute2 (`ip`, `tc`); without them the tests fail and
//! say so.

use husk_runtime::network::{self, NetNs, NetworkConfig};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A network namespace the test made; removed when dropped.
struct TestNs {
    name: String,
}

impl TestNs {
    fn new(role: &str) -> TestNs {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "these tests make network namespaces: run them as root"
        );
        let name = format!(
            "husk-t-{}-{}-{role}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        TestNs { name }
    }

    fn ip(&self, args: &str) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend(args.split_whitespace());
        run("ip", &all)
    }

    fn tc_json(&self, args: &str) -> serde_json::Value {
        let mut all = vec!["-n", &self.name, "-j"];
        all.extend(args.split_whitespace());
        let out = run("tc", &all);
        serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })
            .unwrap_or_else(|e| panic!("tc {args}: {e}: {out}"))
    }

    fn open(&self) -> NetNs {
        NetNs::open(&std::path::PathBuf::from("/run/netns").join(&self.name)).unwrap()
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (iproute2) is needed for these tests: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const ETH0_MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x53, 0x4b, 0x01];
const NEIGHBOUR_MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x53, 0x4b, 0x09];

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A client namespace as CNI leaves it: `eth0` (MTU 1400, v4 and v6
/// addresses, default routes both ways, a static neighbour) and `eth1`,
/// each a veth whose other end (`peer0`, `peer1`) is in the peer namespace.
fn client_and_peer() -> (TestNs, TestNs) {
    let client = TestNs::new("c");
    let peer = TestNs::new("p");
    for (n, subnet) in [(0, 213), (1, 214)] {
        client.ip(&format!(
            "link add eth{n} type veth peer name peer{n} netns {}",
            peer.name
        ));
        client.ip(&format!("addr add 10.{subnet}.0.2/24 dev eth{n}"));
        peer.ip(&format!("link set peer{n} up"));
    }
    client.ip(&format!("link set eth0 address {}", mac_text(ETH0_MAC)));
    client.ip("link set eth0 mtu 1400");
    client.ip("addr add fd00:213::2/64 dev eth0 nodad");
    client.ip("link set eth0 up");
    client.ip("link set eth1 up");
    client.ip("route add default via 10.213.0.1 dev eth0");
    client.ip("-6 route add default via fd00:213::1 dev eth0");
    client.ip(&format!(
        "neigh add 10.213.0.9 lladdr {} dev eth0 nud permanent",
        mac_text(NEIGHBOUR_MAC)
    ));
    (client, peer)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn discovery_reads_what_the_client_set_up() {
    let (client, _peer) = client_and_peer();
    let config = network::discover(&client.open()).unwrap();

    let names: Vec<&str> = config.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["eth0", "eth1"], "lo and nothing else: {config:?}");
    let eth0 = &config.interfaces[0];
    assert_eq!(eth0.mac, ETH0_MAC);
    assert_eq!(eth0.mtu, 1400);
    let addresses: Vec<(IpAddr, u8)> = eth0
        .addresses
        .iter()
        .map(|a| (a.address, a.prefix_len))
        .collect();
    assert!(addresses.contains(&(ip("10.213.0.2"), 24)), "{addresses:?}");
    assert!(
        addresses.contains(&(ip("fd00:213::2"), 64)),
        "{addresses:?}"
    );
    assert_eq!(addresses.len(), 2, "no link-local: {addresses:?}");
    assert_eq!(config.interfaces[1].mtu, 1500);
    assert_eq!(
        config.interfaces[1]
            .addresses
            .iter()
            .map(|a| a.address)
            .collect::<Vec<_>>(),
        [ip("10.214.0.2")]
    );

    // The default routes, and none of the kernel's prefix routes.
    let v4 = config.routes.iter().find(|r| !r.ipv6).expect("a v4 route");
    assert_eq!(v4.destination, None);
    assert_eq!(v4.gateway, Some(ip("10.213.0.1")));
    assert_eq!(v4.device, "eth0");
    let v6 = config.routes.iter().find(|r| r.ipv6).expect("a v6 route");
    assert_eq!(v6.destination, None);
    assert_eq!(v6.gateway, Some(ip("fd00:213::1")));
    assert_eq!(v6.device, "eth0");
    assert_eq!(v6.metric, 1024);
    assert_eq!(config.routes.len(), 2, "{:?}", config.routes);

    assert_eq!(config.neighbours.len(), 1, "{:?}", config.neighbours);
    assert_eq!(config.neighbours[0].address, ip("10.213.0.9"));
    assert_eq!(config.neighbours[0].mac, NEIGHBOUR_MAC);
    assert_eq!(config.neighbours[0].device, "eth0");

    // And the agent's request carries it.
    let request = config.to_request("c1");
    assert_eq!(request.interfaces.len(), 2);
    assert_eq!(request.interfaces[0].mac, ETH0_MAC.to_vec());
    assert_eq!(request.routes.len(), 2);
    assert_eq!(request.neighbours.len(), 1);
}

/// The redirect filters on `dev`'s ingress, as tc shows them:
/// (priority, target device) of each mirred action.
fn redirects(ns: &TestNs, dev: &str) -> Vec<(u64, String)> {
    let filters = ns.tc_json(&format!("filter show dev {dev} ingress"));
    let mut found = Vec::new();
    for filter in filters.as_array().unwrap() {
        let Some(actions) = filter
            .pointer("/options/actions")
            .and_then(|a| a.as_array())
        else {
            continue;
        };
        for action in actions {
            if action["kind"] == "mirred" {
                assert_eq!(action["mirred_action"], "redirect", "{action}");
                assert_eq!(action["direction"], "egress", "{action}");
                found.push((
                    filter["pref"].as_u64().unwrap(),
                    action["to_dev"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    found
}

fn has_ingress_qdisc(ns: &TestNs, dev: &str) -> bool {
    ns.tc_json(&format!("qdisc show dev {dev}"))
        .as_array()
        .unwrap()
        .iter()
        .any(|q| q["kind"] == "ingress")
}

fn links(ns: &TestNs) -> Vec<String> {
    let out = ns.ip("-j link show");
    let links: serde_json::Value = serde_json::from_str(&out).unwrap();
    links
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .collect()
}

/// An AF_PACKET socket on `dev` in `ns`, for raw Ethernet frames.
fn packet_socket(ns: &NetNs, dev: &str) -> (OwnedFd, i32) {
    let dev = std::ffi::CString::new(dev).unwrap();
    ns.run(move || {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket/if_nametoindex/bind calls on memory that
        // lives across them; the fd is owned at once.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto.into(),
            );
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            let index = libc::if_nametoindex(dev.as_ptr()) as i32;
            assert!(index > 0, "{dev:?}: no such interface");
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = index;
            assert_eq!(
                libc::bind(
                    fd.as_raw_fd(),
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ),
                0,
                "bind: {}",
                std::io::Error::last_os_error()
            );
            (fd, index)
        }
    })
    .unwrap()
}

/// Frames of this EtherType (IEEE's local experimental one) are the
/// test's; the kernels' own (IPv6 ND, MLD) are passed over.
const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&TEST_ETHERTYPE);
    f.extend_from_slice(payload);
    // The minimum Ethernet payload.
    f.resize(f.len().max(60), 0);
    f
}

/// Reads from `fd` until a frame of the test's EtherType comes (after
/// `skip` leading bytes), or fails after 10 s.
fn read_test_frame(fd: &OwnedFd, skip: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no test frame within 10 s");
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd that lives across the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
        assert!(ready >= 0, "poll: {}", std::io::Error::last_os_error());
        if ready == 0 {
            continue;
        }
        // SAFETY: read into a buffer we own, of its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n >= 0, "read: {}", std::io::Error::last_os_error());
        let got = &buf[..n as usize];
        if got.len() >= skip + 14 && got[skip + 12..skip + 14] == TEST_ETHERTYPE {
            return got[skip..].to_vec();
        }
    }
}

fn write_all(fd: &OwnedFd, bytes: &[u8]) {
    // SAFETY: write from a buffer we own, of its length.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "write: {}",
        std::io::Error::last_os_error()
    );
}

/// struct virtio_net_hdr without offloads: what precedes each frame on a
/// tap opened with IFF_VNET_HDR (10 bytes until TUNSETVNETHDRSZ).
const VNET_HDR_LEN: usize = 10;

#[test]
fn a_wired_tap_carries_frames_both_ways_and_unwiring_leaves_the_namespace_as_it_was() {
    let (client, peer) = client_and_peer();
    let netns = client.open();
    let before: NetworkConfig = network::discover(&netns).unwrap();
    let links_before = links(&client);
    let eth0 = before.interfaces[0].clone();

    let wired = network::wire(&netns, &eth0).unwrap();
    let tap = wired.wiring.tap.clone();
    assert_eq!(wired.mac, ETH0_MAC);
    assert!(wired.wiring.made_ingress_qdisc);

    // The tap: husk's name, the interface's MTU, up.
    let shown: serde_json::Value =
        serde_json::from_str(&client.ip(&format!("-j -d link show {tap}"))).unwrap();
    assert_eq!(shown[0]["mtu"], 1400, "{shown}");
    assert!(
        shown[0]["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "UP"),
        "{shown}"
    );
    assert_eq!(shown[0]["linkinfo"]["info_kind"], "tun", "{shown}");
    // The filters, each way.
    assert_eq!(redirects(&client, "eth0"), [(0xc0de, tap.clone())]);
    assert_eq!(redirects(&client, &tap), [(0xc0de, "eth0".to_string())]);
    // Discovery skips husk's tap.
    assert_eq!(network::discover(&netns).unwrap(), before);

    // Peer -> client interface -> tap.
    let peer_ns = peer.open();
    let (peer_socket, _) = packet_socket(&peer_ns, "peer0");
    let peer_mac = [0x02, 0x48, 0x55, 0x53, 0x4b, 0x77];
    peer.ip(&format!("link set peer0 address {}", mac_text(peer_mac)));
    let inbound = frame(ETH0_MAC, peer_mac, b"from the peer to the guest");
    write_all(&peer_socket, &inbound);
    assert_eq!(read_test_frame(&wired.tap, VNET_HDR_LEN), inbound);

    // Tap (the guest) -> client interface -> peer.
    let outbound = frame(peer_mac, ETH0_MAC, b"from the guest to the peer");
    let mut with_header = vec![0u8; VNET_HDR_LEN];
    with_header.extend_from_slice(&outbound);
    write_all(&wired.tap, &with_header);
    assert_eq!(read_test_frame(&peer_socket, 0), outbound);

    // Unwiring removes the tap, its filters and the qdisc husk added, and
    // can run again.
    network::unwire(&netns, &wired.wiring).unwrap();
    network::unwire(&netns, &wired.wiring).unwrap();
    drop(wired);
    assert_eq!(links(&client), links_before);
    assert!(!has_ingress_qdisc(&client, "eth0"));
    assert!(redirects(&client, "eth0").is_empty());
    assert_eq!(network::discover(&netns).unwrap(), before);
}

#[test]
fn a_clients_own_ingress_qdisc_and_filters_stay() {
    let (client, _peer) = client_and_peer();
    let netns = client.open();
    let eth1 = network::discover(&netns).unwrap().interfaces[1].clone();
    client.run_tc("qdisc add dev eth1 ingress");
    client.run_tc("filter add dev eth1 ingress pref 10 protocol all u32 match u32 0 0 flowid 1:1");

    let wired = network::wire(&netns, &eth1).unwrap();
    assert!(!wired.wiring.made_ingress_qdisc);
    assert_eq!(
        redirects(&client, "eth1"),
        [(0xc0de, wired.wiring.tap.clone())]
    );
    network::unwire(&netns, &wired.wiring).unwrap();

    assert!(has_ingress_qdisc(&client, "eth1"));
    let left = client.tc_json("filter show dev eth1 ingress");
    let prefs: Vec<u64> = left
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["pref"].as_u64())
        .collect();
    assert!(prefs.iter().all(|p| *p == 10), "{left}");
    assert!(!prefs.is_empty(), "the client's filter is gone: {left}");
}

impl TestNs {
    fn run_tc(&self, args: &str) {
        let mut all = vec!["-n", &self.name];
        all.extend(args.split_whitespace());
        run("tc", &all);
    }
}

#[test]
fn after_a_crash_the_namespace_is_cleaned_by_name_and_cookie() {
    let (client, _peer) = client_and_peer();
    let netns = client.open();
    let links_before = links(&client);
    let config = network::discover(&netns).unwrap();
    // eth0's tap stays open (a VMM that outlived the monitor); eth1's is
    // closed (the VMM died too), which takes the tap but leaves the filter
    // on eth1 redirecting to nothing. The records are lost.
    let kept = network::wire(&netns, &config.interfaces[0]).unwrap();
    let closed = network::wire(&netns, &config.interfaces[1]).unwrap();
    drop(closed);
    assert!(!redirects(&client, "eth1").is_empty());

    network::unwire_namespace(&netns).unwrap();
    network::unwire_namespace(&netns).unwrap();
    assert_eq!(links(&client), links_before);
    for dev in ["eth0", "eth1"] {
        assert!(!has_ingress_qdisc(&client, dev), "{dev}");
    }
    drop(kept);
    assert_eq!(network::discover(&netns).unwrap(), config);
}

#[test]
fn a_path_that_is_no_network_namespace_is_refused() {
    let err = NetNs::open(std::path::Path::new("/proc/self/ns/mnt")).unwrap_err();
    assert!(matches!(err, network::NetnsError::NotNetns { .. }), "{err}");
    let err = NetNs::open(std::path::Path::new("/run/netns/husk-no-such-ns")).unwrap_err();
    assert!(err.to_string().contains("husk-no-such-ns"), "{err}");
}

/// husk's tap names are its own, and what a client named so is not taken:
/// a tap that exists under the name husk would give its tap (a client's
/// persistent one) makes the wiring fail naming it, is not attached to,
/// and survives the cleanup after a crash, which removes only husk's
/// (non-persistent) taps.
#[test]
fn a_clients_interface_under_a_husk_tap_name_is_neither_taken_nor_removed() {
    let (client, _peer) = client_and_peer();
    let netns = client.open();
    let config = network::discover(&netns).unwrap();
    let eth0 = &config.interfaces[0];
    let name = network::tap_name(eth0.index).unwrap();
    client.ip(&format!("tuntap add dev {name} mode tap"));
    let links_before = links(&client);
    let err = network::wire(&netns, eth0).unwrap_err();
    assert!(
        err.to_string().contains(&name) && err.to_string().contains("already exists"),
        "{err}"
    );
    assert_eq!(
        links(&client),
        links_before,
        "the failed wiring left something"
    );
    assert!(!has_ingress_qdisc(&client, "eth0"));
    network::unwire_namespace(&netns).unwrap();
    assert_eq!(links(&client), links_before, "the client's tap was removed");
    client.ip(&format!("tuntap del dev {name} mode tap"));
}
