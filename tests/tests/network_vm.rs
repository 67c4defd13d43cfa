//! Networking end to end in a real microVM: an interface of a network
//! namespace (a veth, as CNI or Docker leave it) is wired to a tap, the tap
//! goes to QEMU as a virtio-net device, and a process in the guest pings
//! the far end of the veth. The guest's interface is configured here by the
//! container itself (`ip` in a busybox rootfs, with CAP_NET_ADMIN in the
//! guest's network namespace): the agent's UpdateNetwork, which will do
//! that from the discovered configuration, is the guest side's work.
//!
//! Traffic stays between namespaces the test makes (the guest, the client
//! namespace and the peer namespace).

use husk_protocol::agent::Stdio as StdioTokens;
use husk_runtime::network::{self, NetNs};
use husk_runtime::sandbox::{NewContainer, Sandbox, SandboxConfig};
use husk_tests::*;
use std::collections::HashMap;
use std::process::Command;

use husk_tests::netns::TestNetns as TestNs;

const GUEST_MAC: &str = "02:48:55:53:4b:21";
const PEER_MAC: &str = "02:48:55:53:4b:31";

#[test]
fn the_guest_reaches_the_far_end_of_the_clients_veth_through_the_tap() {
    require_guest();
    let client = TestNs::new("vm-c");
    let peer = TestNs::new("vm-p");
    client.ip(&format!(
        "link add eth0 type veth peer name peer0 netns {}",
        peer.name
    ));
    client.ip(&format!("link set eth0 address {GUEST_MAC}"));
    client.ip("addr add 10.213.0.2/24 dev eth0");
    client.ip("link set eth0 up");
    peer.ip(&format!("link set peer0 address {PEER_MAC}"));
    peer.ip("addr add 10.213.0.1/24 dev peer0");
    peer.ip("link set peer0 up");
    let links_before = client.ip("-o link show");

    let netns = NetNs::open(&client.path()).unwrap();
    let config = network::discover(&netns).expect("discovering the client namespace");
    let [eth0] = config.interfaces.as_slice() else {
        panic!("{config:?}")
    };
    let (tap, wiring) = network::wire(&netns, eth0)
        .expect("wiring eth0")
        .into_vm_tap()
        .expect("the tap for the VM");

    let dir = TestDir::new("net-vm");
    let husk_config = husk_runtime::config::Config::load().expect("husk config");
    let mut sc = SandboxConfig::new("net-vm", &husk_config);
    sc.state_root = dir.state_root().join("sandbox");
    sc.network = vec![tap];
    let mut sandbox = Sandbox::start(&husk_config, &sc)
        .unwrap_or_else(|e| panic!("starting the sandbox with a tap: {e}"));
    // The sandbox's QEMU holds the tap now; the config's copy can go.
    drop(sc);

    // The container shares the guest's network namespace (no "network"
    // entry), finds the virtio-net device by the client interface's MAC,
    // gives it the client interface's address, and connects to a closed
    // TCP port of the peer: "refused" is the peer kernel's RST, so the ARP
    // exchange and the SYN made the round trip (not ping: busybox's needs
    // POSIX timers, which the guest kernel leaves out).
    let script = format!(
        "dev=; for i in /sys/class/net/*; do \
           [ \"$(cat $i/address)\" = {GUEST_MAC} ] && dev=${{i##*/}}; done; \
         [ -n \"$dev\" ] || exit 10; \
         ip link set \"$dev\" up || exit 11; \
         ip addr add 10.213.0.2/24 dev \"$dev\" || exit 12; \
         nc 10.213.0.1 9 </dev/null 2>/tmp/nc.err; \
         grep -q refused /tmp/nc.err || {{ cat /tmp/nc.err; exit 13; }}; \
         ip neigh show 10.213.0.1 dev \"$dev\" | grep -q {PEER_MAC} || exit 14"
    );
    let mut spec = default_spec(&["sh", "-c", &script]);
    spec["linux"]["namespaces"] =
        serde_json::json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
    let caps = serde_json::json!(["CAP_NET_ADMIN", "CAP_NET_RAW"]);
    spec["process"]["capabilities"] = serde_json::json!({
        "bounding": caps, "effective": caps, "permitted": caps
    });
    let rootfs = dir.path.join("c/rootfs");
    busybox_rootfs(&rootfs);
    let rootfs_rel = sandbox
        .share_rootfs("c", &rootfs, None)
        .expect("sharing the rootfs");
    sandbox
        .create_container(NewContainer {
            id: "c".into(),
            spec_json: serde_json::to_vec(&spec).unwrap_or_default(),
            rootfs_rel,
            shared_mounts: HashMap::new(),
            stdio: StdioTokens::default(),
            no_pivot: false,
            bundle: dir.path.join("c"),
            // As the CLI's monitor creates its container.
            guest_network_namespace: true,
        })
        .expect("creating the container");
    sandbox
        .start_container("c")
        .expect("starting the container");
    let exit = sandbox
        .wait_process("c", "")
        .expect("waiting for the container");
    let console = std::fs::read_to_string(sandbox.console_log()).unwrap_or_default();
    assert_eq!(
        exit.exit_code, 0,
        "10: no guest interface with the MAC, 11/12: configuring it, 13: no RST \
         from the peer, 14: the peer's MAC not learnt; console:\n{console}"
    );
    sandbox.shutdown().expect("shutdown");

    network::unwire(&netns, &wiring).expect("unwiring");
    assert_eq!(client.ip("-o link show"), links_before);
    assert_eq!(network::discover(&netns).unwrap(), config);
    assert_eq!(
        leftovers_settled(&dir.path, &dir.state_root()),
        Vec::<String>::new()
    );
}

/// `husk run` with a network namespace the test made (as CNI or podman
/// make one): the container's guest gets its two interfaces with the same
/// MACs, MTU 1400, IPv4 and IPv6 addresses and both default routes, and
/// talks to a server in the peer namespace over each; afterwards the
/// namespace is as it was (no tap, no filter left).
#[test]
fn husk_run_gets_the_interfaces_of_the_namespace_it_is_given() {
    require_guest();
    let client = TestNs::new("run-c");
    let peer = TestNs::new("run-p");
    client.ip(&format!(
        "link add eth0 type veth peer name peer0 netns {}",
        peer.name
    ));
    client.ip(&format!("link set eth0 address {GUEST_MAC} mtu 1400 up"));
    client.ip("addr add 10.213.1.2/24 dev eth0");
    client.ip("addr add fd00:213:1::2/64 dev eth0 nodad");
    peer.ip(&format!("link set peer0 address {PEER_MAC} mtu 1400 up"));
    peer.ip("addr add 10.213.1.1/24 dev peer0");
    peer.ip("addr add fd00:213:1::1/64 dev peer0 nodad");
    client.ip("route add default via 10.213.1.1 dev eth0");
    client.ip("-6 route add default via fd00:213:1::1 dev eth0");
    client.ip(&format!(
        "link add eth1 type veth peer name peer1 netns {}",
        peer.name
    ));
    client.ip("link set eth1 up");
    client.ip("addr add 10.213.2.2/24 dev eth1");
    peer.ip("link set peer1 up");
    peer.ip("addr add 10.213.2.1/24 dev peer1");
    let links_before = client.ip("-o link show");
    // A server in the peer namespace, on every address.
    let mut server = Command::new("ip")
        .args([
            "netns", "exec", &peer.name, "busybox", "nc", "-ll", "-p", "8080",
        ])
        .args(["-e", "/bin/echo", "hello-from-peer"])
        .spawn()
        .expect("busybox nc server in the peer namespace");
    std::thread::sleep(std::time::Duration::from_millis(300));

    let dir = TestDir::new("net-run");
    let root = dir.state_root();
    let script = "cd /sys/class/net; echo eth0 $(cat eth0/mtu) $(cat eth0/address); \
         echo eth1 $(cat eth1/mtu); \
         ip -o addr show dev eth0 | grep -q 'inet 10.213.1.2/24' && echo v4; \
         ip -o addr show dev eth0 | grep -q 'inet6 fd00:213:1::2/64' && echo v6; \
         ip route | grep -q 'default via 10.213.1.1' && echo default4; \
         ip -6 route | grep -q 'default via fd00:213:1::1' && echo default6; \
         nc -w 5 10.213.1.1 8080 </dev/null; \
         nc -w 5 fd00:213:1::1 8080 </dev/null; \
         nc -w 5 10.213.2.1 8080 </dev/null";
    let mut spec = default_spec(&["sh", "-c", script]);
    spec["linux"]["namespaces"] = serde_json::json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
        {"type": "network", "path": client.path()}
    ]);
    let bundle = dir.path.join("b");
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    write_bundle(&bundle, &spec);
    let out = husk(&root, &["run", "-b", &bundle.display().to_string(), "net"]);
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.status.success(), "husk run: {}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "eth0 1400 {GUEST_MAC}\neth1 1500\nv4\nv6\ndefault4\ndefault6\n\
             hello-from-peer\nhello-from-peer\nhello-from-peer\n"
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(client.ip("-o link show"), links_before, "a tap was left");
    for dev in ["eth0", "eth1"] {
        let out = Command::new("tc")
            .args(["-n", &client.name, "filter", "show", "dev", dev, "ingress"])
            .output()
            .expect("tc");
        assert_eq!(stdout(&out), "", "a filter was left on {dev}");
    }
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// A monitor that crashed took its VM and the taps with it, but left its
/// filter on the client's interface: `husk delete` removes it, from the
/// namespace path saved at create, and the client's interface stays.
#[test]
fn delete_after_a_crashed_monitor_unwires_the_namespace() {
    require_guest();
    let client = TestNs::new("crash-c");
    let peer = TestNs::new("crash-p");
    client.ip(&format!(
        "link add eth0 type veth peer name peer0 netns {}",
        peer.name
    ));
    client.ip("link set eth0 up");
    client.ip("addr add 10.213.3.2/24 dev eth0");
    let links_before = client.ip("-o link show");
    let dir = TestDir::new("net-crash");
    let root = dir.state_root();
    let mut spec = default_spec(&["sleep", "600"]);
    spec["linux"]["namespaces"] = serde_json::json!([
        {"type": "pid"}, {"type": "mount"},
        {"type": "network", "path": client.path()}
    ]);
    let bundle = dir.path.join("b");
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    write_bundle(&bundle, &spec);
    let b = bundle.display().to_string();
    let out = husk(&root, &["run", "-d", "-b", &b, "crash"]);
    assert!(out.status.success(), "husk run -d: {}", stderr(&out));
    let filters = || {
        let out = Command::new("tc")
            .args([
                "-n",
                &client.name,
                "filter",
                "show",
                "dev",
                "eth0",
                "ingress",
            ])
            .output()
            .expect("tc");
        stdout(&out)
    };
    assert!(filters().contains("mirred"), "no redirect while running");
    let st: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("containers/crash/state.json")).expect("state.json"),
    )
    .expect("state");
    let monitor = st["monitor_pid"].as_i64().expect("monitor pid") as i32;
    // SAFETY: kill(2) of the monitor named by the container's state.
    unsafe { libc::kill(monitor, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{monitor}/exe")).exists()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = husk(&root, &["delete", "crash"]);
    assert!(
        out.status.success(),
        "delete after the crash: {}",
        stderr(&out)
    );
    assert_eq!(filters(), "", "husk's filter outlived the delete");
    assert_eq!(client.ip("-o link show"), links_before);
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// Docker's way, as its `libnetwork-setkey` prestart hook does it: the spec
/// asks for a new network namespace (no path), and a prestart hook reads
/// the state's pid from stdin and moves a veth into /proc/<pid>/ns/net,
/// addressed and with a default route, after the VM booted. The VM booted
/// with a tap slot; the monitor wires the interface to it after the hook,
/// and the guest gets it (its MAC, address, route) before start.
#[test]
fn an_interface_a_prestart_hook_adds_reaches_the_guest() {
    require_guest();
    let peer = TestNs::new("hook-p");
    // The veth waits in the peer namespace until the hook moves one end.
    peer.ip("link add hookc0 type veth peer name peer0");
    peer.ip(&format!("link set hookc0 address {GUEST_MAC}"));
    peer.ip("link set peer0 up");
    peer.ip("addr add 10.213.4.1/24 dev peer0");
    let mut server = Command::new("ip")
        .args([
            "netns", "exec", &peer.name, "busybox", "nc", "-ll", "-p", "8080",
        ])
        .args(["-e", "/bin/echo", "hello-through-the-slot"])
        .spawn()
        .expect("busybox nc server in the peer namespace");
    let hook = format!(
        "pid=$(sed -n 's/.*\"pid\": *\\([0-9][0-9]*\\).*/\\1/p'); \
         ip -n {peer} link set hookc0 netns $pid && \
         nsenter --net=/proc/$pid/ns/net sh -c 'ip link set hookc0 name eth0 && \
           ip addr add 10.213.4.2/24 dev eth0 && ip link set eth0 up && \
           ip route add default via 10.213.4.1'",
        peer = peer.name
    );
    let dir = TestDir::new("net-hook");
    let root = dir.state_root();
    let mut spec = default_spec(&[
        "sh",
        "-c",
        "echo $(cat /sys/class/net/eth0/address); ip -o -4 addr show dev eth0; \
         ip route | grep default; \
         for i in 1 2 3 4 5; do nc -w 5 10.213.4.1 8080 </dev/null && break; sleep 0.5; done",
    ]);
    spec["hooks"] = serde_json::json!({
        "prestart": [{"path": "/bin/sh", "args": ["sh", "-c", hook], "timeout": 20}]
    });
    let bundle = dir.path.join("b");
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    write_bundle(&bundle, &spec);
    let out = husk(
        &root,
        &["run", "-b", &bundle.display().to_string(), "hooked"],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.status.success(), "husk run: {}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first().copied(), Some(GUEST_MAC), "{text}");
    assert!(text.contains("inet 10.213.4.2/24"), "{text}");
    assert!(text.contains("default via 10.213.4.1"), "{text}");
    assert_eq!(
        lines.last().copied(),
        Some("hello-through-the-slot"),
        "{text}"
    );
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// A network namespace path that is not one: create fails naming
/// `linux.namespaces`, and nothing is left (no VM, tap, state).
#[test]
fn a_network_path_that_is_not_a_namespace_is_refused() {
    require_guest();
    let dir = TestDir::new("net-bad");
    let root = dir.state_root();
    let mut spec = default_spec(&["true"]);
    spec["linux"]["namespaces"] = serde_json::json!([
        {"type": "pid"}, {"type": "mount"},
        {"type": "network", "path": "/etc/hostname"}
    ]);
    let bundle = dir.path.join("b");
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    write_bundle(&bundle, &spec);
    let out = husk(
        &root,
        &["create", "-b", &bundle.display().to_string(), "bad"],
    );
    assert!(
        !out.status.success(),
        "create with /etc/hostname as a netns"
    );
    assert!(
        stderr(&out).contains("linux.namespaces"),
        "{}",
        stderr(&out)
    );
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// husk's filters on `dev` in `ns`: the u32 filters of its ingress qdisc.
fn ingress_filters(ns: &TestNs, dev: &str) -> String {
    let out = Command::new("tc")
        .args(["-n", &ns.name, "filter", "show", "dev", dev, "ingress"])
        .output()
        .expect("tc");
    stdout(&out)
}

/// A client namespace with one veth (eth0, addressed) to a peer namespace.
fn client_with_veth(role: &str, subnet: u8) -> (TestNs, TestNs) {
    let client = TestNs::new(&format!("{role}-c"));
    let peer = TestNs::new(&format!("{role}-p"));
    client.ip(&format!(
        "link add eth0 type veth peer name peer0 netns {}",
        peer.name
    ));
    client.ip("link set eth0 up");
    client.ip(&format!("addr add 10.213.{subnet}.2/24 dev eth0"));
    peer.ip("link set peer0 up");
    peer.ip(&format!("addr add 10.213.{subnet}.1/24 dev peer0"));
    (client, peer)
}

fn bundle_in(dir: &TestDir, client: &TestNs, args: &[&str]) -> String {
    let mut spec = default_spec(args);
    spec["linux"]["namespaces"] = serde_json::json!([
        {"type": "pid"}, {"type": "mount"},
        {"type": "network", "path": client.path()}
    ]);
    let bundle = dir.path.join("b");
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    write_bundle(&bundle, &spec);
    bundle.display().to_string()
}

/// The client removes its interface while the container runs (a CNI DEL
/// before the runtime's delete, a `docker network disconnect`): the
/// container goes on running (exec works), and delete succeeds and leaves
/// no tap, filter or qdisc of husk's.
#[test]
fn an_interface_removed_while_running_is_no_error_and_leaves_nothing() {
    require_guest();
    let (client, _peer) = client_with_veth("gone", 5);
    let dir = TestDir::new("net-gone");
    let root = dir.state_root();
    let b = bundle_in(&dir, &client, &["sleep", "600"]);
    let out = husk(&root, &["run", "-d", "-b", &b, "gone"]);
    assert!(out.status.success(), "husk run -d: {}", stderr(&out));
    assert!(ingress_filters(&client, "eth0").contains("mirred"));
    client.ip("link del eth0");
    let out = husk(&root, &["exec", "gone", "cat", "/proc/self/comm"]);
    assert!(
        out.status.success(),
        "exec after the interface went: {}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "cat\n");
    let out = husk(&root, &["delete", "-f", "gone"]);
    assert!(out.status.success(), "delete: {}", stderr(&out));
    let links = client.ip("-o link show");
    assert!(
        links.lines().all(|l| l.contains(": lo:")),
        "links left: {links}"
    );
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// Two interfaces with one MAC: the guest finds its devices by MAC, so
/// create fails naming the MAC, and leaves no VM, tap, filter or state.
#[test]
fn interfaces_sharing_a_mac_are_refused_and_leave_nothing() {
    require_guest();
    let (client, peer) = client_with_veth("dupmac", 6);
    client.ip(&format!(
        "link add eth1 type veth peer name peer1 netns {}",
        peer.name
    ));
    client.ip("link set eth0 address 02:48:55:53:4b:61");
    client.ip("link set eth1 address 02:48:55:53:4b:61 up");
    let links_before = client.ip("-o link show");
    let dir = TestDir::new("net-dupmac");
    let root = dir.state_root();
    let b = bundle_in(&dir, &client, &["true"]);
    let out = husk(&root, &["create", "-b", &b, "dupmac"]);
    assert!(!out.status.success(), "create with a MAC given twice");
    assert!(
        stderr(&out).contains("02:48:55:53:4b:61") && stderr(&out).contains("twice"),
        "{}",
        stderr(&out)
    );
    assert_eq!(client.ip("-o link show"), links_before, "a tap was left");
    for dev in ["eth0", "eth1"] {
        assert_eq!(
            ingress_filters(&client, dev),
            "",
            "a filter was left on {dev}"
        );
    }
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// husk killed mid-create: the monitor (which wired the namespace before
/// booting) is SIGKILLed as soon as its tap exists. `husk create` fails
/// saying so, and removes husk's filter from the client's interface (the
/// tap went with the VMM); nothing of the container is left.
#[test]
fn a_monitor_killed_mid_create_leaves_no_tap_or_filter() {
    require_guest();
    let (client, _peer) = client_with_veth("midc", 7);
    let links_before = client.ip("-o link show");
    let dir = TestDir::new("net-midc");
    let root = dir.state_root();
    let b = bundle_in(&dir, &client, &["true"]);
    // Output to a file: the shadow keeps what it was given.
    let err_path = dir.path.join("create.err");
    let err = std::fs::File::create(&err_path).expect("create.err");
    let mut create = Command::new(husk_bin())
        .arg("--root")
        .arg(&root)
        .args(["create", "-b", &b, "midc"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .expect("husk create");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !client.ip("-o link show").contains("_husk") {
        assert!(std::time::Instant::now() < deadline, "no tap appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let root_text = root.display().to_string();
    let named: Vec<i32> = processes_naming("__monitor")
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains(&root_text) && cmdline.ends_with(" midc "))
        .map(|(pid, _)| pid)
        .collect();
    // The monitor's own children carry its command line between fork and
    // exec (the jail's spawns): the monitor is the one whose parent is not.
    let parent = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
            })
    };
    let monitor: Vec<i32> = named
        .iter()
        .copied()
        .filter(|pid| parent(*pid).is_some_and(|pp| !named.contains(&pp)))
        .collect();
    assert_eq!(monitor.len(), 1, "the monitor of midc: {monitor:?}");
    // SAFETY: kill(2) of the monitor process found above.
    unsafe { libc::kill(monitor[0], libc::SIGKILL) };
    let status = create.wait().expect("husk create");
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(!status.success(), "create survived its monitor");
    assert!(err.contains("died"), "{err}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while client.ip("-o link show") != links_before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(client.ip("-o link show"), links_before, "a tap was left");
    assert_eq!(ingress_filters(&client, "eth0"), "", "a filter was left");
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// 200 create/delete cycles of a container with a network namespace
/// leave the namespace as it was (links, qdiscs, filters) and nothing of
/// husk's behind (processes, mounts, cgroups, state).
#[test]
fn two_hundred_create_delete_cycles_with_networking_leak_nothing() {
    require_guest();
    let (client, _peer) = client_with_veth("cycles", 8);
    let links_before = client.ip("-o link show");
    let qdiscs_before = Command::new("tc")
        .args(["-n", &client.name, "qdisc", "show"])
        .output()
        .expect("tc");
    let dir = TestDir::new("net-cycles");
    let root = dir.state_root();
    let b = bundle_in(&dir, &client, &["true"]);
    for i in 0..200 {
        let id = format!("cycle{i}");
        let out = husk(&root, &["create", "-b", &b, &id]);
        assert!(out.status.success(), "create {i}: {}", stderr(&out));
        let out = husk(&root, &["delete", "-f", &id]);
        assert!(out.status.success(), "delete {i}: {}", stderr(&out));
        if i % 50 == 49 {
            assert_eq!(
                client.ip("-o link show"),
                links_before,
                "after {} cycles",
                i + 1
            );
            assert_eq!(
                ingress_filters(&client, "eth0"),
                "",
                "after {} cycles",
                i + 1
            );
        }
    }
    let qdiscs = Command::new("tc")
        .args(["-n", &client.name, "qdisc", "show"])
        .output()
        .expect("tc");
    assert_eq!(stdout(&qdiscs), stdout(&qdiscs_before));
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}
