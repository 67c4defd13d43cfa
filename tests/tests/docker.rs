//! Docker (Debian's docker.io) with husk as a runtime (`--add-runtime`),
//! on Docker's default bridge network: dockerd runs inside a network
//! namespace the test makes (`nsenter --net`, so its docker0 and
//! docker-proxy live there; `--iptables=false`), with its state under the
//! test directory. Docker's `libnetwork-setkey` prestart hook moves each
//! container's veth into /proc/<state.pid>/ns/net after `create` booted
//! the VM: husk wires it to the tap slot the VM booted with.

use husk_tests::netns::TestNetns;
use husk_tests::*;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Dockerd {
    dir: TestDir,
    netns: TestNetns,
    child: Child,
    stopped: bool,
}

impl Dockerd {
    fn start() -> Dockerd {
        require_guest();
        let setup = workspace_root().join("scripts/docker-test-setup.sh");
        let out = Command::new(&setup).output().expect("docker setup");
        assert!(
            out.status.success(),
            "installing docker.io: {}",
            stderr(&out)
        );
        let dir = TestDir::new("docker");
        let p = dir.path.clone();
        let netns = TestNetns::new("docker");
        let wrapper = p.join("husk-runtime");
        std::fs::write(
            &wrapper,
            format!("#!/bin/sh\nexec {} \"$@\"\n", husk_bin().display()),
        )
        .expect("wrapper");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let log = std::fs::File::create(p.join("dockerd.log")).expect("dockerd.log");
        let child = netns
            .command(&["dockerd"])
            .arg("--data-root")
            .arg(p.join("data"))
            .arg("--exec-root")
            .arg(p.join("exec"))
            .arg("--pidfile")
            .arg(p.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", p.join("docker.sock").display()))
            .args([
                "--iptables=false",
                "--ip-masq=false",
                "--bip",
                "10.213.11.1/24",
            ])
            .args(["--storage-driver", "vfs"])
            .arg("--add-runtime")
            .arg(format!("husk={}", wrapper.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting dockerd");
        let d = Dockerd {
            dir,
            netns,
            child,
            stopped: false,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.docker(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "dockerd did not come up: {}",
                d.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let tar = busybox_tarball(&p);
        let out = d.docker(&["import", &tar.display().to_string(), "husk-busybox"]);
        assert!(out.status.success(), "docker import: {}", stderr(&out));
        d
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("120")
            .arg("docker")
            .arg("-H")
            .arg(format!(
                "unix://{}",
                self.dir.path.join("docker.sock").display()
            ))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("docker")
    }

    /// `cmd` in dockerd's namespace (network only).
    fn in_netns(&self, cmd: &[&str]) -> Output {
        self.netns.run(cmd)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Dockerd {
    /// Stops dockerd (and its containerd) and undoes its mounts.
    fn stop(&mut self) {
        // Once: the pid of a reaped child may name another process.
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o '{}[^ ]*' /proc/self/mountinfo | sort -r | xargs -r umount -l",
                self.dir.path.display()
            ))
            .status();
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = self.docker(&["rm", "-f", "srv", "pub"]);
        self.stop();
    }
}

fn ok(out: &Output, what: &str, d: &Dockerd) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}\ndockerd log:\n{}",
        stdout(out),
        stderr(out),
        d.log_tail()
    );
    stdout(out)
}

/// Retries `nc` to `addr port` from dockerd's namespace until it reads
/// `want` (a server prints nothing before it listens).
fn served(d: &Dockerd, addr: &str, port: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = d.in_netns(&["busybox", "nc", "-w", "5", addr, port]);
        if stdout(&out).trim() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr}:{port} never answered {want:?}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn docker_bridge_network_reaches_gateway_and_peers_and_publishes_a_port() {
    let d = Dockerd::start();
    let server = "while :; do echo hello-docker | nc -l -p 8080; done";
    ok(
        &d.docker(&[
            "run",
            "-d",
            "--runtime",
            "husk",
            "--name",
            "srv",
            "husk-busybox",
            "sh",
            "-c",
            server,
        ]),
        "docker run -d srv",
        &d,
    );
    let ip = ok(
        &d.docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "srv"]),
        "docker inspect",
        &d,
    )
    .trim()
    .to_string();
    assert!(
        ip.starts_with("10.213.11."),
        "the container's address: {ip:?}"
    );
    served(&d, &ip, "8080", "hello-docker");

    // Another container reaches it and the gateway (port 9 of docker0's
    // address has no listener: "refused" is the namespace kernel's RST).
    let client = format!(
        "ip -o -4 addr show dev eth0; \
         for i in 1 2 3 4 5; do nc -w 5 {ip} 8080 </dev/null && break; sleep 0.5; done; \
         nc -w 5 10.213.11.1 9 </dev/null 2>&1; true"
    );
    let out = ok(
        &d.docker(&[
            "run",
            "--rm",
            "--runtime",
            "husk",
            "husk-busybox",
            "sh",
            "-c",
            &client,
        ]),
        "docker run --rm client",
        &d,
    );
    assert!(out.contains("inet 10.213.11."), "the client's eth0: {out}");
    assert!(
        out.contains("hello-docker"),
        "the client reached srv: {out}"
    );
    assert!(
        out.contains("refused"),
        "the client reached the gateway: {out}"
    );

    // -p: docker-proxy in dockerd's namespace forwards to the container.
    ok(
        &d.docker(&[
            "run",
            "-d",
            "--runtime",
            "husk",
            "--name",
            "pub",
            "-p",
            "18081:8080",
            "husk-busybox",
            "sh",
            "-c",
            server,
        ]),
        "docker run -d -p",
        &d,
    );
    served(&d, "10.213.11.1", "18081", "hello-docker");
    ok(&d.docker(&["rm", "-f", "srv", "pub"]), "docker rm -f", &d);
    let links = d.in_netns(&["ip", "-o", "link"]);
    assert!(
        !stdout(&links).contains("_husk"),
        "a tap was left: {}",
        stdout(&links)
    );
    // With dockerd gone, nothing of husk's is left under the test directory.
    let mut d = d;
    d.stop();
    let root = Path::new("/nonexistent-husk-root");
    assert_eq!(leftovers_settled(&d.dir.path, root), Vec::<String>::new());
}
