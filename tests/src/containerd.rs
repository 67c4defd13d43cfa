//! A private containerd for the shim tests: Debian's containerd 1.6 on a
//! root, state and socket of its own under a [`TestDir`], with the husk shim
//! (target/release/containerd-shim-husk-v2) first on its PATH, a busybox
//! image and a pause image imported from a local OCI tarball (no registry),
//! and the CRI plugin configured with the `husk` runtime handler (and `runc`,
//! the benchmarks' reference). The configuration is written by
//! scripts/containerd-test-config.sh, which bench/run.py uses too.

use crate::{workspace_root, TestDir};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const NAMESPACE: &str = "husk-test";
pub const RUNTIME: &str = "io.containerd.husk.v2";
pub const IMAGE: &str = "docker.io/library/husk-busybox:latest";
/// The CRI sandbox image (named in scripts/containerd-test-config.sh).
pub const PAUSE_IMAGE: &str = "docker.io/library/husk-pause:latest";

/// The shim binary under test (`$HUSK_SHIM_BIN`, else target/release/…).
pub fn shim_bin() -> PathBuf {
    let p = std::env::var_os("HUSK_SHIM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/containerd-shim-husk-v2"));
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --release -p containerd-shim-husk-v2` (or set HUSK_SHIM_BIN)",
        p.display()
    );
    p
}

/// The CRI client used by the tests (target/release/husk-cri).
pub fn cri_bin() -> PathBuf {
    let p = workspace_root().join("target/release/husk-cri");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --release -p husk-cri-client`",
        p.display()
    );
    p
}

/// Runs scripts/containerd-test-setup.sh (installs containerd, makes the
/// image tarball once) and returns the tarball.
pub fn setup() -> PathBuf {
    let cache = workspace_root().join("target/containerd-test");
    let script = workspace_root().join("scripts/containerd-test-setup.sh");
    let out = Command::new(&script)
        .arg(&cache)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(
        out.status.success(),
        "containerd-test-setup.sh failed (containerd is needed for these tests): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for bin in ["containerd", "ctr"] {
        assert!(
            which(bin).is_some(),
            "{bin} is not on PATH after containerd-test-setup.sh"
        );
    }
    cache.join("images.tar")
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

pub struct Containerd {
    /// The network namespace containerd runs in (`/run/netns/NAME`), where
    /// its CNI plugins put their bridge; None: the host's, with the test
    /// CNI plugin that configures nothing.
    netns: Option<String>,
    pub dir: TestDir,
    pub socket: PathBuf,
    /// `HUSK_SHIM_ROOT` of the shims: their VMs' directories.
    pub husk_root: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd for test `name` and imports the images.
    pub fn start(name: &str) -> Containerd {
        Containerd::start_in(name, None)
    }

    /// Starts containerd for test `name` inside the network namespace
    /// `netns` (made by the test), with real CNI: Debian's `bridge`
    /// (a bridge `husk-br0` in that namespace, the gateway 10.213.9.1) and
    /// `host-local` (10.213.9.0/24, its state under the test directory).
    /// Only the network namespace is entered (`nsenter --net`): `ip netns
    /// exec` would also hide the host's cgroup mounts.
    pub fn start_with_bridge_cni(name: &str, netns: &str) -> Containerd {
        Containerd::start_in(name, Some(netns))
    }

    fn start_in(name: &str, netns: Option<&str>) -> Containerd {
        crate::require_guest();
        shim_bin();
        let images = setup();
        let dir = TestDir::new(name);
        let root = dir.path.clone();
        // The same configuration as the benchmarks (bench/run.py).
        let script = workspace_root().join("scripts/containerd-test-config.sh");
        let out = Command::new(&script)
            .arg(&root)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
        assert!(
            out.status.success(),
            "containerd-test-config.sh: {}",
            crate::stderr(&out)
        );
        if netns.is_some() {
            let cni = root.join("cni");
            let _ = std::fs::remove_file(cni.join("10-husk-test.conflist"));
            for plugin in ["bridge", "host-local"] {
                let bin = Path::new("/usr/lib/cni").join(plugin);
                assert!(
                    bin.is_file(),
                    "{} is missing: apt-get install containernetworking-plugins",
                    bin.display()
                );
                let _ = std::os::unix::fs::symlink(&bin, root.join("cni-bin").join(plugin));
            }
            let conflist = serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "husk-bridge",
                "plugins": [{
                    "type": "bridge",
                    "bridge": "husk-br0",
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "subnet": "10.213.9.0/24",
                        "gateway": "10.213.9.1",
                        "dataDir": root.join("cni-ipam"),
                    }
                }]
            });
            std::fs::write(cni.join("10-husk-bridge.conflist"), conflist.to_string())
                .unwrap_or_else(|e| panic!("writing the CNI config: {e}"));
        }
        let mut c = Containerd {
            netns: netns.map(str::to_string),
            socket: root.join("containerd.sock"),
            husk_root: root.join("husk"),
            dir,
            child: None,
        };
        c.spawn();
        // Into the test namespace (ctr) and CRI's (k8s.io).
        for ns in [NAMESPACE, "k8s.io"] {
            let out = Command::new("ctr")
                .arg("-a")
                .arg(&c.socket)
                .args(["-n", ns, "images", "import", &images.display().to_string()])
                .output()
                .unwrap_or_else(|e| panic!("ctr images import: {e}"));
            assert!(
                out.status.success(),
                "ctr images import: {}",
                crate::stderr(&out)
            );
        }
        c
    }

    /// Runs containerd on the configuration in the test directory and
    /// waits until it answers.
    fn spawn(&mut self) {
        let root = &self.dir.path;
        let shim_dir = shim_bin()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // Appended to, so a restart keeps the first run's log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("containerd.log"))
            .unwrap_or_else(|e| panic!("containerd.log: {e}"));
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("containerd");
                c
            }
            None => Command::new("containerd"),
        };
        let child = command
            .arg("--config")
            .arg(root.join("config.toml"))
            .env("PATH", path)
            .env("HUSK_SHIM_ROOT", &self.husk_root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting containerd: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.socket.exists() && self.ctr(&["version"]).status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops containerd with SIGTERM, waits for it to exit, and starts it
    /// again on the same configuration, root, state and socket. The shims
    /// run on: containerd reconnects to them from its state directory.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    other => panic!(
                        "containerd did not exit within 20 s of SIGTERM ({other:?}): {}",
                        self.log_tail()
                    ),
                }
            }
        }
        self.spawn();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `ctr -a <socket> -n husk-test <args>`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args)
            .output()
            .unwrap_or_else(|e| panic!("running ctr: {e}"))
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a")
            .arg(&self.socket)
            .arg("-n")
            .arg(NAMESPACE)
            .args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// What husk left: live processes mentioning the test directory (other
    /// than containerd), mounts of the shim's VMs and bundles, VM directories.
    pub fn leftovers(&self) -> Vec<String> {
        let marker = self.dir.path.display().to_string();
        // A warm pool's unclaimed sandboxes (HUSK_TEST_POOL=1) are the pool's.
        let unclaimed = crate::pool::unclaimed_markers(&self.dir.path);
        let mut found = Vec::new();
        for pid in pids_with(&marker) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let pooled = {
                let text = String::from_utf8_lossy(&cmdline);
                unclaimed.iter().any(|u| text.contains(u.as_str()))
            };
            // containerd itself and the test's own ctr clients are not husk's.
            if pid != self.pid() && !cmdline.starts_with(b"ctr\0") && !pooled {
                found.push(format!(
                    "process {pid}: {}",
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                ));
            }
        }
        let husk = self.husk_root.display().to_string();
        for line in std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
        {
            let bundle_mount =
                line.contains(&marker) && line.contains("io.containerd.runtime.v2.task");
            if line.contains(&husk) || bundle_mount {
                found.push(format!("mount: {line}"));
            }
        }
        for ns in [NAMESPACE, "k8s.io"] {
            if let Ok(entries) = std::fs::read_dir(self.husk_root.join(ns)) {
                for e in entries.flatten() {
                    found.push(format!("VM directory: {}", e.path().display()));
                }
            }
        }
        found
    }

    /// Polls [`Self::leftovers`] for up to five seconds.
    pub fn leftovers_settled(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let l = self.leftovers();
            if l.is_empty() || Instant::now() > deadline {
                return l;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `husk-cri <socket> <args>` (the CRI client of shim-v2/cri-client).
    pub fn cri(&self, args: &[&str]) -> Output {
        Command::new(cri_bin())
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running husk-cri: {e}"))
    }

    /// Pids of QEMU (VM) processes started for this containerd: booted by
    /// its shims, or claimed by them from the test's warm pool.
    pub fn vm_pids(&self) -> Vec<u32> {
        let husk = self.husk_root.display().to_string();
        let mut pids = pids_with(&husk);
        for claimed in crate::pool::claimed_markers(&self.dir.path) {
            pids.extend(pids_with(&claimed));
        }
        pids.sort();
        pids.dedup();
        pids.into_iter()
            .filter(|pid| {
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
                let name = exe
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                name.starts_with("qemu") || name == "husk-vmm"
            })
            .collect()
    }

    /// Pids of husk shims serving this containerd.
    pub fn shim_pids(&self) -> Vec<u32> {
        let marker = self.socket.display().to_string();
        pids_with(&marker)
            .into_iter()
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains("containerd-shim-husk-v2")
            })
            .collect()
    }
}

/// Live (non-zombie) processes whose command line contains `marker`.
pub fn pids_with(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        if cmdline.contains(marker) && !zombie {
            pids.push(pid);
        }
    }
    pids
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Shims first (they take their VMs with them), then containerd.
        for pid in self.shim_pids() {
            // SAFETY: kill(2) of a shim this test's containerd started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        std::thread::sleep(Duration::from_millis(200));
        let _ = husk_runtime::sandbox::unmount_below(&self.dir.path);
    }
}
