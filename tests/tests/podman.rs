//! podman drives husk as its OCI runtime (through conmon, as it drives runc):
//! run --rm, a detached container with exec (with and without a tty), stop,
//! rm, exit codes. The test installs and configures podman itself: a local
//! busybox image imported from a tarball, no registry, private storage.

use husk_tests::netns::TestNetns;
use husk_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Podman {
    dir: TestDir,
    /// The network namespace podman runs in (`nsenter --net`), where its
    /// CNI bridge goes; None: the host's (these tests then use
    /// `--network none`).
    netns: Option<String>,
}

impl Podman {
    fn new() -> Podman {
        Podman::setup(None)
    }

    /// podman inside the network namespace `netns` (made by the test),
    /// with a CNI network of its own as the default: a bridge `husk-pm0`
    /// (10.213.10.0/24, gateway .1), portmap for `-p`, IPAM state under the
    /// test directory.
    fn in_netns(netns: &str) -> Podman {
        Podman::setup(Some(netns))
    }

    fn setup(netns: Option<&str>) -> Podman {
        require_guest();
        let setup = workspace_root().join("scripts/podman-test-setup.sh");
        let out = Command::new(&setup).output().expect("podman setup");
        assert!(
            out.status.success(),
            "installing podman: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // One directory per test: the two tests of this file run at once.
        let dir = TestDir::new(if netns.is_some() {
            "podman-net"
        } else {
            "podman"
        });
        let p = &dir.path;
        // husk's state for this test lives under the test directory.
        let wrapper = p.join("husk-runtime");
        // conmon passes husk no environment of ours: the configuration (a
        // warm pool's, HUSK_TEST_POOL=1) is named here.
        let config = std::env::var("HUSK_CONFIG")
            .map(|c| format!("export HUSK_CONFIG='{c}'\n"))
            .unwrap_or_default();
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\n{config}exec {} --root {} \"$@\"\n",
                husk_bin().display(),
                p.join("husk-root").display()
            ),
        )
        .expect("wrapper");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // Root here lacks CAP_SYS_RESOURCE, so podman's default rlimits are dropped.
        std::fs::write(
            p.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"husk\"\n[engine.runtimes]\nhusk = [\"{}\"]\n[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\ndefault_network = \"husk-test\"\n",
                wrapper.display(),
                p.join("cni").display()
            ),
        )
        .expect("containers.conf");
        std::fs::write(
            p.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                p.join("run").display(),
                p.join("storage").display()
            ),
        )
        .expect("storage.conf");
        std::fs::create_dir_all(p.join("cni")).expect("cni dir");
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "husk-test",
            "plugins": [
                {"type": "bridge", "bridge": "husk-pm0", "isGateway": true, "ipMasq": false,
                 "hairpinMode": true,
                 "ipam": {"type": "host-local", "dataDir": p.join("cni-ipam"),
                          "routes": [{"dst": "0.0.0.0/0"}],
                          "ranges": [[{"subnet": "10.213.10.0/24", "gateway": "10.213.10.1"}]]}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        std::fs::write(p.join("cni/husk-test.conflist"), conflist.to_string()).expect("CNI config");
        let tar = busybox_tarball(p);
        let podman = Podman {
            dir,
            netns: netns.map(str::to_string),
        };
        let out = podman.run(&[
            "import",
            tar.to_str().unwrap_or_default(),
            "localhost/husk-busybox:latest",
        ]);
        assert!(out.status.success(), "podman import: {}", stderr(&out));
        podman
    }

    fn run(&self, args: &[&str]) -> Output {
        let p = &self.dir.path;
        let mut command = Command::new("nsenter");
        match &self.netns {
            Some(ns) => command.arg(format!("--net=/run/netns/{ns}")),
            None => command.arg("--"),
        };
        command
            .arg("timeout")
            .arg("120")
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", p.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", p.join("storage.conf"))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("podman")
    }

    fn husk_root(&self) -> PathBuf {
        self.dir.path.join("husk-root")
    }
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

fn no_leftovers(podman: &Podman, root: &Path) {
    let sandboxes = std::fs::read_dir(root.join("sandbox"))
        .map(|d| d.count())
        .unwrap_or(0);
    let containers = std::fs::read_dir(root.join("containers"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!((sandboxes, containers), (0, 0), "husk state left behind");
    assert_eq!(
        leftovers_settled(root, &podman.dir.path.join("no-such-state")),
        Vec::<String>::new()
    );
}

#[test]
fn podman_runs_execs_stops_and_removes_husk_containers() {
    let podman = Podman::new();
    let img = "localhost/husk-busybox:latest";
    let out = podman.run(&["run", "--rm", "--network", "none", img, "echo", "hi"]);
    assert_eq!(ok(&out, "podman run --rm"), "hi\n");
    let out = podman.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        img,
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "exit code through podman: {}",
        stderr(&out)
    );

    ok(
        &podman.run(&[
            "run",
            "-d",
            "--name",
            "c1",
            "--network",
            "none",
            img,
            "sleep",
            "1000",
        ]),
        "podman run -d",
    );
    let out = podman.run(&["exec", "c1", "sh", "-c", "echo from-exec"]);
    assert_eq!(ok(&out, "podman exec"), "from-exec\n");
    let out = podman.run(&["exec", "-t", "c1", "tty"]);
    assert!(
        ok(&out, "podman exec -t").contains("/dev/pts/"),
        "no tty in exec -t"
    );
    let ps = ok(
        &podman.run(&["ps", "--format", "{{.Names}} {{.Status}}"]),
        "podman ps",
    );
    assert!(ps.contains("c1 Up"), "{ps}");
    ok(&podman.run(&["stop", "-t", "10", "c1"]), "podman stop");
    let st = ok(
        &podman.run(&["inspect", "--format", "{{.State.Status}}", "c1"]),
        "inspect",
    );
    assert_eq!(st.trim(), "exited");
    ok(&podman.run(&["rm", "c1"]), "podman rm");
    no_leftovers(&podman, &podman.husk_root());
}

/// Retries an HTTP GET of `addr:port` from `netns` (curl) until it reads
/// `want` (the server prints its facts before it listens).
fn served(netns: &TestNetns, addr: &str, port: &str, want: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let url = format!("http://{addr}:{port}/");
    loop {
        let out = netns.run(&["curl", "-s", "--max-time", "5", &url]);
        if stdout(&out).trim() == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{addr}:{port} never answered {want:?}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// podman's bridge network with husk: the container's guest gets the
/// address CNI gave it, serves HTTP (busybox httpd) to curl in the test's
/// namespace,
/// and `-p` publishes the port there; after rm, no tap is left.
#[test]
fn podman_bridge_network_serves_and_publishes_a_port() {
    let netns = TestNetns::new("podman");
    let podman = Podman::in_netns(&netns.name);
    let img = "localhost/husk-busybox:latest";
    ok(
        &podman.run(&[
            "run",
            "-d",
            "--name",
            "web",
            "-p",
            "18080:8080",
            img,
            "sh",
            "-c",
            "ip -o -4 addr show dev eth0; mkdir -p /www && echo hello-from-podman > /www/index.html \
             && exec httpd -f -p 8080 -h /www",
        ]),
        "podman run -d -p",
    );
    let ip = ok(
        &podman.run(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            "web",
        ]),
        "podman inspect",
    )
    .trim()
    .to_string();
    assert!(
        ip.starts_with("10.213.10."),
        "the container's address: {ip:?}"
    );
    served(&netns, &ip, "8080", "hello-from-podman");
    // It printed its address before it served, so the log has it now.
    let logs = ok(&podman.run(&["logs", "web"]), "podman logs");
    assert!(
        logs.contains(&format!("inet {ip}/24")),
        "the guest's eth0 has CNI's address: {logs}"
    );
    // Published: the namespace's own address, port 18080 (portmap's DNAT).
    served(&netns, "10.213.10.1", "18080", "hello-from-podman");
    ok(&podman.run(&["rm", "-f", "-t", "0", "web"]), "podman rm -f");
    let links = netns.run(&["ip", "-o", "link"]);
    assert!(
        !stdout(&links).contains("_husk"),
        "a tap was left: {}",
        stdout(&links)
    );
    no_leftovers(&podman, &podman.husk_root());
}
