//! Network namespaces the tests make themselves: every packet of a network
//! test stays between them (ip netns, veth pairs, bridges inside them).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// A network namespace (`ip netns add husk-t-<pid>-<tag>`) with `lo` up;
/// deleted when dropped.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    pub fn new(tag: &str) -> TestNetns {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test makes network namespaces: run it as root"
        );
        let name = format!("husk-t-{}-{tag}", std::process::id());
        run_ip(&["netns", "add", &name]);
        let ns = TestNetns { name };
        ns.ip("link set lo up");
        ns
    }

    /// Where its bind mount is (what a spec's `linux.namespaces` names).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME <args>` (split at spaces), which must succeed; its stdout.
    pub fn ip(&self, args: &str) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend(args.split_whitespace());
        run_ip(&all)
    }

    /// `cmd` with only the network namespace entered (`nsenter --net`:
    /// `ip netns exec` would also remount /sys and hide the cgroup mounts).
    pub fn run(&self, cmd: &[&str]) -> Output {
        self.command(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("nsenter {cmd:?}: {e}"))
    }

    /// The command line that runs `cmd` in the namespace.
    pub fn command(&self, cmd: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).args(cmd);
        c
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip (iproute2) is needed for this test: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
