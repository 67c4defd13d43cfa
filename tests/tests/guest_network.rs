//! The guest kernel has what container networking runs inside a pod
//! (issue 14): in a real microVM, a privileged container (every
//! capability, in its own network namespace) uses each feature the guest
//! kernel fragment names once: bridges (brctl and ip), veth, dummy, VLAN,
//! macvlan, ipvlan, IPv6 addresses and routes, policy routing for IPv4 and
//! IPv6, conntrack, iptables and ip6tables (legacy and nft) with the
//! matches and targets CNI plugins and kube-proxy use, and nftables.
//!
//! Everything happens inside the container's own network namespace, which
//! the test made; no packet is sent anywhere. busybox has no iptables or
//! nft: Debian's iptables, nftables and iproute2 binaries are copied into
//! the container's rootfs with the libraries `ldd` names.
//!
//! The agent's UpdateNetwork, in the same kind of VM: a dummy link in the
//! guest's root namespace stands in for the virtio-net device that the
//! host side of issue 14 attaches; a created container's new namespace is
//! configured through the agent API and checked from inside it.

use husk_protocol::agent::{
    IpAddress, Neighbour as WireNeighbour, NetworkInterface, Route as WireRoute,
    Stdio as StdioTokens, UpdateNetworkRequest,
};
use husk_protocol::agent_ttrpc::AgentClient as RpcClient;
use husk_protocol::{ErrorKind, AGENT_PORT};
use husk_runtime::agent::connect_port;
use husk_runtime::sandbox::{sandbox_dir, NewContainer, Sandbox};
use husk_tests::*;
use std::collections::{BTreeSet, HashMap};
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_SYS_ADMIN",
];

/// The host programs the container runs, by their path on the host and in
/// the rootfs (/usr/local/sbin comes first on the spec's PATH, ahead of
/// busybox's `ip`).
const PROGRAMS: &[(&str, &str)] = &[
    ("/usr/bin/ip", "/usr/local/sbin/ip"),
    (
        "/usr/sbin/xtables-legacy-multi",
        "/usr/local/sbin/xtables-legacy-multi",
    ),
    (
        "/usr/sbin/xtables-nft-multi",
        "/usr/local/sbin/xtables-nft-multi",
    ),
    ("/usr/sbin/nft", "/usr/local/sbin/nft"),
];
/// The multi-call binaries answer to the name they are run by.
const ALIASES: &[(&str, &str)] = &[
    ("iptables-legacy", "xtables-legacy-multi"),
    ("ip6tables-legacy", "xtables-legacy-multi"),
    ("iptables-nft", "xtables-nft-multi"),
    ("ip6tables-nft", "xtables-nft-multi"),
    ("iptables-legacy-save", "xtables-legacy-multi"),
    ("iptables-nft-save", "xtables-nft-multi"),
];
/// Where iptables dlopens its match and target extensions.
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

fn copy_into(rootfs: &Path, host: &Path, inside: &str) {
    let to = rootfs.join(inside.trim_start_matches('/'));
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    std::fs::copy(host, &to).unwrap_or_else(|e| {
        panic!(
            "copying {} into the rootfs: {e} (scripts/install-deps.sh installs iptables, \
             nftables and iproute2)",
            host.display()
        )
    });
}

/// The shared libraries (and loader) `ldd` says `binary` needs.
fn libraries(binary: &Path) -> Vec<String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("ldd {}: {e}", binary.display()));
    assert!(
        out.status.success(),
        "ldd {}: {}",
        binary.display(),
        stderr(&out)
    );
    stdout(&out)
        .lines()
        .filter_map(|l| {
            // "libx.so => /lib/.../libx.so (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => l.split_whitespace().next(),
            }?;
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

/// A busybox rootfs with Debian's ip, iptables (legacy and nft), ip6tables
/// and nft, their libraries and the xtables extensions.
fn network_tools_rootfs(rootfs: &Path) {
    busybox_rootfs(rootfs);
    let mut needed = BTreeSet::new();
    for (host, inside) in PROGRAMS {
        let host = Path::new(host);
        copy_into(rootfs, host, inside);
        needed.extend(libraries(host));
    }
    let extensions: Vec<_> = std::fs::read_dir(XTABLES_DIR)
        .unwrap_or_else(|e| panic!("{XTABLES_DIR}: {e} (apt-get install iptables)"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    for ext in &extensions {
        copy_into(rootfs, ext, &ext.to_string_lossy());
        needed.extend(libraries(ext));
    }
    for lib in &needed {
        copy_into(rootfs, Path::new(lib), lib);
    }
    for (alias, target) in ALIASES {
        std::os::unix::fs::symlink(target, rootfs.join("usr/local/sbin").join(alias))
            .unwrap_or_else(|e| panic!("symlink {alias}: {e}"));
    }
    if Path::new("/etc/protocols").is_file() {
        copy_into(rootfs, Path::new("/etc/protocols"), "/etc/protocols");
    }
}

/// A spec running `script` with the network capabilities.
fn privileged_spec(script: &str) -> serde_json::Value {
    let mut spec = default_spec(&["sh", "-c", script]);
    let caps = serde_json::json!(ALL_CAPS);
    spec["process"]["capabilities"] = serde_json::json!({
        "bounding": caps, "effective": caps, "permitted": caps
    });
    spec["process"]["noNewPrivileges"] = serde_json::json!(false);
    spec
}

fn network_tools_bundle(dir: &Path, script: &str) -> std::path::PathBuf {
    require_guest();
    let bundle = dir.join("bundle");
    network_tools_rootfs(&bundle.join("rootfs"));
    write_bundle(&bundle, &privileged_spec(script))
}

/// Each check: a name, then the command the container runs for it. A
/// check prints `ok <name>` or `FAIL <name>: <output>`.
const CHECKS: &[(&str, &str)] = &[
    // Links.
    ("brctl-addbr", "brctl addbr foobar"),
    ("bridge", "ip link add br1 type bridge vlan_filtering 1"),
    ("veth", "ip link add v0 type veth peer name v1"),
    ("bridge-port", "ip link set v0 master br1"),
    ("dummy", "ip link add d0 type dummy && ip link set d0 up"),
    ("vlan", "ip link add link d0 name d0.10 type vlan id 10"),
    ("macvlan", "ip link add mv0 link d0 type macvlan mode bridge"),
    (
        "ipvlan",
        "ip link add d1 type dummy && ip link add ipv0 link d1 type ipvlan mode l2",
    ),
    // br_netfilter: the sysctl kube-proxy sets exists.
    (
        "br-netfilter",
        "test -e /proc/sys/net/bridge/bridge-nf-call-iptables",
    ),
    // IPv6 and policy routing.
    (
        "ipv6-address",
        "ip -6 addr add fd00:14::1/64 dev d0 nodad && ip -6 addr show dev d0 | grep -q fd00:14::1",
    ),
    (
        "ipv6-route",
        "ip -6 route add fd00:15::/64 via fd00:14::2 dev d0",
    ),
    ("ipv4-address", "ip addr add 10.14.0.1/24 dev d0"),
    ("rule-ipv4", "ip rule add from 10.14.0.0/16 table 100"),
    ("rule-ipv6", "ip -6 rule add from fd00:14::/64 table 100"),
    ("route-table-ipv4", "ip route add 10.15.0.0/16 dev d0 table 100"),
    (
        "route-table-ipv6",
        "ip -6 route add default via fd00:14::2 dev d0 table 100",
    ),
    (
        "route-multipath",
        "ip route add 10.16.0.0/16 nexthop via 10.14.0.2 dev d0 nexthop via 10.14.0.3 dev d0",
    ),
    // Connection tracking.
    ("conntrack-proc", "test -e /proc/net/nf_conntrack"),
    // iptables, legacy x_tables.
    (
        "iptables-legacy-filter",
        "iptables-legacy -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED \
         -m comment --comment husk -j ACCEPT && iptables-legacy -A INPUT -m state --state INVALID -j DROP \
         && iptables-legacy -A INPUT -p tcp --dport 22 -j REJECT",
    ),
    (
        "iptables-legacy-nat",
        "iptables-legacy -t nat -A POSTROUTING -o d0 -j MASQUERADE \
         && iptables-legacy -t nat -A PREROUTING -p tcp -m multiport --dports 80,443 -j REDIRECT --to-ports 8080 \
         && iptables-legacy -t nat -A OUTPUT -p udp --dport 53 -m addrtype --dst-type LOCAL \
            -j DNAT --to-destination 10.14.0.2:5353 \
         && iptables-legacy -t nat -A POSTROUTING -p udp -s 10.14.0.0/24 -j SNAT --to-source 10.14.0.1 \
         && iptables-legacy -t nat -A POSTROUTING -m statistic --mode random --probability 0.5 -j RETURN",
    ),
    (
        "iptables-legacy-mangle",
        "iptables-legacy -t mangle -A PREROUTING -m mark --mark 1 -j MARK --set-mark 2 \
         && iptables-legacy -t mangle -A PREROUTING -j CONNMARK --save-mark",
    ),
    (
        "iptables-legacy-listed",
        "iptables-legacy-save -t nat | grep -q MASQUERADE",
    ),
    (
        "ip6tables-legacy",
        "ip6tables-legacy -A INPUT -m conntrack --ctstate ESTABLISHED -j ACCEPT \
         && ip6tables-legacy -A INPUT -p tcp --dport 22 -j REJECT \
         && ip6tables-legacy -t nat -A POSTROUTING -o d0 -j MASQUERADE \
         && ip6tables-legacy -t mangle -A PREROUTING -j MARK --set-mark 3",
    ),
    // iptables over nf_tables (nft_compat for the x_tables extensions).
    (
        "iptables-nft",
        "iptables-nft -A FORWARD -m conntrack --ctstate ESTABLISHED -m comment --comment husk -j ACCEPT \
         && iptables-nft -t nat -A POSTROUTING -o d0 -j MASQUERADE \
         && iptables-nft -t nat -A PREROUTING -p tcp --dport 80 -j DNAT --to-destination 10.14.0.2:8080 \
         && iptables-nft -t mangle -A OUTPUT -j MARK --set-mark 4",
    ),
    (
        "ip6tables-nft",
        "ip6tables-nft -A INPUT -p tcp -m multiport --dports 22,80 -j ACCEPT \
         && ip6tables-nft -t nat -A POSTROUTING -j MASQUERADE",
    ),
    (
        "iptables-nft-listed",
        "iptables-nft-save -t nat | grep -q MASQUERADE",
    ),
    // nftables.
    ("nft", "nft -f /tmp/husk.nft && nft list ruleset | grep -q masquerade"),
];

/// An nftables ruleset with the inet family, conntrack, NAT chains,
/// masquerade, redirect, DNAT and reject.
const NFT_RULES: &str = r#"table inet husk {
  chain input { type filter hook input priority 0; ct state established,related accept; ct state invalid drop; tcp dport 23 reject; }
  chain pre { type nat hook prerouting priority -100; tcp dport 80 redirect to :8080; }
  chain out { type nat hook output priority -100; ip daddr 10.14.0.9 dnat ip to 10.14.0.2; }
  chain post { type nat hook postrouting priority 100; oifname "d0" masquerade; }
}
"#;

fn script() -> String {
    // busybox sh runs its own applets ahead of PATH: iproute2's `ip` is
    // named by its path (brctl stays busybox's, as in the issue).
    let mut s = String::from(
        "ip() { /usr/local/sbin/ip \"$@\"; }\n\
         check() { name=$1; shift; if out=$(eval \"$*\" 2>&1); then echo \"ok $name\"; \
         else echo \"FAIL $name: $(echo $out)\"; fi; }\n",
    );
    s.push_str(&format!("cat > /tmp/husk.nft <<'EOF'\n{NFT_RULES}EOF\n"));
    for (name, cmd) in CHECKS {
        s.push_str(&format!("check {name} '{cmd}'\n"));
    }
    s.push_str("echo done\n");
    s
}

#[test]
fn each_networking_feature_of_the_guest_kernel_works_in_a_container() {
    for (_, cmd) in CHECKS {
        assert!(!cmd.contains('\''), "checks are single-quoted: {cmd}");
    }
    let dir = TestDir::new("guest-network");
    let root = dir.state_root();
    let bundle = network_tools_bundle(&dir.path, &script());
    let out = husk(
        &root,
        &[
            "run",
            "--bundle",
            bundle.to_str().unwrap_or_default(),
            "netfeatures",
        ],
    );
    let text = stdout(&out);
    assert!(
        out.status.success() && text.contains("done"),
        "husk run failed: {}{}",
        text,
        stderr(&out)
    );
    let failed: Vec<&str> = text.lines().filter(|l| l.starts_with("FAIL")).collect();
    let missing: Vec<&str> = CHECKS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !text.lines().any(|l| l == format!("ok {name}")))
        .collect();
    assert!(
        failed.is_empty() && missing.is_empty(),
        "guest networking checks failed:\n{}\nmissing: {missing:?}\nfull output:\n{text}",
        failed.join("\n")
    );
}

fn new_container(
    sandbox: &Sandbox,
    dir: &TestDir,
    id: &str,
    spec: &serde_json::Value,
) -> NewContainer {
    let rootfs = dir.path.join(id).join("rootfs");
    network_tools_rootfs(&rootfs);
    let rootfs_rel = sandbox
        .share_rootfs(id, &rootfs, None)
        .unwrap_or_else(|e| panic!("sharing the rootfs of {id}: {e}"));
    NewContainer {
        id: id.to_string(),
        spec_json: serde_json::to_vec(spec).unwrap_or_default(),
        rootfs_rel,
        shared_mounts: HashMap::new(),
        stdio: StdioTokens::default(),
        no_pivot: false,
        bundle: dir.path.join(id),
        guest_network_namespace: false,
    }
}

fn run_to_end(sandbox: &mut Sandbox, dir: &TestDir, id: &str, spec: &serde_json::Value) -> i32 {
    let c = new_container(sandbox, dir, id, spec);
    sandbox
        .create_container(c)
        .unwrap_or_else(|e| panic!("creating {id}: {e}"));
    start_to_end(sandbox, id)
}

/// Starts a created container and waits for its exit code.
fn start_to_end(sandbox: &mut Sandbox, id: &str) -> i32 {
    sandbox
        .start_container(id)
        .unwrap_or_else(|e| panic!("starting {id}: {e}"));
    sandbox
        .wait_process(id, "")
        .unwrap_or_else(|e| panic!("waiting for {id}: {e}"))
        .exit_code
}

const DEVICE_MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x53, 0x4b, 0x01];

fn update_request(mac: &[u8]) -> UpdateNetworkRequest {
    let addr = |address: Vec<u8>, prefix_len| IpAddress {
        address,
        prefix_len,
        ..Default::default()
    };
    let v6 = |last: u8| {
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[2] = 0x02;
        a[15] = last;
        a.to_vec()
    };
    let gw_mac = vec![0x02, 0x48, 0x55, 0x53, 0x4b, 0xfe];
    UpdateNetworkRequest {
        container_id: "pod".into(),
        interfaces: vec![NetworkInterface {
            name: "eth0".into(),
            mac: mac.to_vec(),
            mtu: 1400,
            addresses: vec![addr(vec![10, 200, 0, 2], 24), addr(v6(2), 64)],
            ..Default::default()
        }],
        routes: vec![
            WireRoute {
                gateway: vec![10, 200, 0, 1],
                device: "eth0".into(),
                metric: 100,
                ..Default::default()
            },
            WireRoute {
                gateway: v6(1),
                device: "eth0".into(),
                ipv6: true,
                ..Default::default()
            },
        ],
        neighbours: vec![WireNeighbour {
            address: vec![10, 200, 0, 1],
            mac: gw_mac,
            device: "eth0".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// UpdateNetwork in a real VM, before the host side exists: a container
/// without a network namespace of its own makes, in the guest's root
/// namespace, a dummy link with the MAC the host would give its tap (a
/// stand-in for the virtio-net device, which only the host side attaches);
/// a second container, created with a new network namespace and not
/// started, is configured through the agent API; its init then checks,
/// with iproute2, what it finds (each exit code names the failed check).
#[test]
fn update_network_configures_a_created_containers_namespace() {
    update_network_case(false);
}

/// As above, with the container taking the guest's own network namespace
/// (`guest_network_namespace`, as the CLI's and the shim's first container
/// of a sandbox do): the device is configured where it is, not moved; a
/// later container asking the same gets a new namespace (granted once).
#[test]
fn update_network_configures_the_guest_namespace_a_container_took() {
    update_network_case(true);
}

fn update_network_case(guest_network_namespace: bool) {
    let dir = TestDir::new(if guest_network_namespace {
        "guest-update-network-own"
    } else {
        "guest-update-network"
    });
    let mut sandbox = start_sandbox(&dir, "netupdate");

    let mut dev =
        privileged_spec("/usr/local/sbin/ip link add eth9 address 02:48:55:53:4b:01 type dummy");
    if let Some(ns) = dev["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "network");
    }
    assert_eq!(
        run_to_end(&mut sandbox, &dir, "dev", &dev),
        0,
        "making the stand-in device"
    );

    let checks = "ip=/usr/local/sbin/ip; \
        $ip link show eth0 | grep -q 'mtu 1400' || exit 10; \
        $ip link show eth0 | grep -q 'link/ether 02:48:55:53:4b:01' || exit 11; \
        $ip link show eth0 | grep -q '[<,]UP[,>]' || exit 12; \
        $ip addr show eth0 | grep -q 'inet 10.200.0.2/24' || exit 13; \
        $ip addr show eth0 | grep 'inet6 fd00:200::2/64' | grep -vq tentative || exit 14; \
        $ip route | grep -q '^default via 10.200.0.1 dev eth0 .*metric 100' || exit 15; \
        $ip -6 route | grep -q '^default via fd00:200::1 dev eth0' || exit 16; \
        $ip neigh | grep -q '^10.200.0.1 dev eth0 lladdr 02:48:55:53:4b:fe PERMANENT' || exit 17; \
        $ip link show lo | grep -q '[<,]UP[,>]' || exit 18; \
        set -- $(cat /proc/sys/net/ipv4/tcp_rmem); [ \"$3\" = 6291456 ] || exit 19; \
        set -- $(cat /proc/sys/net/ipv4/tcp_wmem); [ \"$3\" = 4194304 ] || exit 19; \
        exit 0";
    let pod = NewContainer {
        guest_network_namespace,
        ..new_container(&sandbox, &dir, "pod", &privileged_spec(checks))
    };
    sandbox
        .create_container(pod)
        .unwrap_or_else(|e| panic!("creating pod: {e}"));

    // The runtime's client has no UpdateNetwork call yet (the host side of
    // issue 14 adds it): a ttrpc connection of the test's own.
    let uds = sandbox_dir(&dir.state_root().join("sandbox"), "netupdate").join("vsock.sock");
    let stream = connect_port(&uds, AGENT_PORT).unwrap_or_else(|e| panic!("connecting: {e}"));
    let client = RpcClient::new(
        ttrpc::Client::new(stream.into_raw_fd()).unwrap_or_else(|e| panic!("ttrpc client: {e}")),
    );
    let ctx = || ttrpc::context::with_timeout(Duration::from_secs(60).as_nanos() as i64);

    // A malformed request is refused whole, naming the fault.
    let err = client
        .update_network(ctx(), &update_request(&DEVICE_MAC[..5]))
        .expect_err("a 5-byte MAC");
    let ttrpc::Error::RpcStatus(status) = &err else {
        panic!("not a status: {err:?}");
    };
    assert_eq!(
        ErrorKind::of_status(status),
        ErrorKind::InvalidArgument,
        "{status:?}"
    );
    assert!(
        status.message.contains("6 bytes, not 5"),
        "{}",
        status.message
    );

    client
        .update_network(ctx(), &update_request(&DEVICE_MAC))
        .unwrap_or_else(|e| panic!("UpdateNetwork: {e:?}"));

    assert_eq!(
        start_to_end(&mut sandbox, "pod"),
        0,
        "the pod's namespace lacks what UpdateNetwork asked (10 mtu, 11 mac, 12 up, 13 v4 \
         address, 14 v6 address usable, 15 v4 default route, 16 v6 default route, 17 \
         neighbour, 18 lo up, 19 the agent's TCP buffer ceilings)"
    );
    if guest_network_namespace {
        // The grant is spent: this one gets a new namespace, without eth0.
        let later = privileged_spec(
            "/usr/local/sbin/ip link show eth0 && exit 20; \
             /usr/local/sbin/ip link show lo | grep -q '[<,]UP[,>]' || exit 21; exit 0",
        );
        let c = NewContainer {
            guest_network_namespace: true,
            ..new_container(&sandbox, &dir, "later", &later)
        };
        sandbox
            .create_container(c)
            .unwrap_or_else(|e| panic!("creating later: {e}"));
        assert_eq!(
            start_to_end(&mut sandbox, "later"),
            0,
            "a second container asking for the guest's namespace (20: it sees eth0, the \
             guest's; 21: its lo is down)"
        );
    }
}
