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

use husk_tests::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

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
fn network_tools_bundle(dir: &Path, script: &str) -> std::path::PathBuf {
    require_guest();
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    busybox_rootfs(&rootfs);
    let mut needed = BTreeSet::new();
    for (host, inside) in PROGRAMS {
        let host = Path::new(host);
        copy_into(&rootfs, host, inside);
        needed.extend(libraries(host));
    }
    let extensions: Vec<_> = std::fs::read_dir(XTABLES_DIR)
        .unwrap_or_else(|e| panic!("{XTABLES_DIR}: {e} (apt-get install iptables)"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    for ext in &extensions {
        copy_into(&rootfs, ext, &ext.to_string_lossy());
        needed.extend(libraries(ext));
    }
    for lib in &needed {
        copy_into(&rootfs, Path::new(lib), lib);
    }
    for (alias, target) in ALIASES {
        std::os::unix::fs::symlink(target, rootfs.join("usr/local/sbin").join(alias))
            .unwrap_or_else(|e| panic!("symlink {alias}: {e}"));
    }
    if Path::new("/etc/protocols").is_file() {
        copy_into(&rootfs, Path::new("/etc/protocols"), "/etc/protocols");
    }

    let mut spec = default_spec(&["sh", "-c", script]);
    let caps = serde_json::json!(ALL_CAPS);
    spec["process"]["capabilities"] = serde_json::json!({
        "bounding": caps, "effective": caps, "permitted": caps
    });
    spec["process"]["noNewPrivileges"] = serde_json::json!(false);
    write_bundle(&bundle, &spec)
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
