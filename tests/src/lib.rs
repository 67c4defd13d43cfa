//! Support for husk's integration tests: they boot real microVMs (QEMU with
//! TCG on machines without hardware KVM) through the built binaries and the
//! sandbox library. A missing prerequisite fails a test with a message
//! saying what to build; nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The `husk` binary under test (`$HUSK_BIN`, else target/release/husk).
pub fn husk_bin() -> PathBuf {
    let p = std::env::var_os("HUSK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/husk"));
    assert!(
        p.is_file(),
        "{} is missing: run `make build` first (or set HUSK_BIN)",
        p.display()
    );
    p
}

/// Guest artifacts must exist: a test that cannot boot a VM fails.
pub fn require_guest() {
    for f in ["vmlinux", "initramfs.img"] {
        let p = workspace_root().join("target/guest").join(f);
        assert!(
            p.is_file(),
            "{} is missing: run `make build` first",
            p.display()
        );
    }
}

/// A directory for one test, removed (mounts first) when dropped.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let path = std::env::temp_dir().join(format!("husk-test-{name}-{}", std::process::id()));
        if path.exists() {
            let _ = husk_runtime::sandbox::unmount_below(&path);
            let _ = std::fs::remove_dir_all(&path);
        }
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TestDir { path }
    }

    /// The state root to pass as `--root` (sandboxes under `<root>/sandbox`).
    pub fn state_root(&self) -> PathBuf {
        self.path.join("state")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // A test that failed half-way leaves its sandboxes running: end
        // them (their helpers die with their monitor), so one failure does
        // not load the machine for every test after it. A passing test has
        // nothing left here (its leftovers check says so).
        kill_processes_naming(&self.path);
        let _ = husk_runtime::sandbox::unmount_below(&self.path);
        let _ = husk_runtime::sandbox::remove_tree_same_fs(&self.path);
    }
}

/// SIGKILLs every process whose command line names `marker` (or a jail
/// claimed for a sandbox under it), other than this one.
fn kill_processes_naming(marker: &Path) {
    let markers = markers_of(marker);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if markers.iter().any(|m| cmdline.contains(m)) {
            // SAFETY: kill(2) with a pid read from /proc; at worst it names
            // a process that already ended.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The content of `file` in host cgroup `cgroup` (a cgroupsPath), from the
/// first hierarchy that has it (v1 controllers or cgroup2), trimmed.
pub fn host_cgroup_file(cgroup: &str, file: &str) -> Option<String> {
    husk_runtime::host_cgroup::hierarchies()
        .iter()
        .map(|h| h.join(cgroup.trim_start_matches('/')).join(file))
        .find(|p| p.exists())
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        })
}

/// Makes a busybox rootfs at `dir` (Debian's busybox-static).
pub fn busybox_rootfs(dir: &Path) {
    let script = workspace_root().join("scripts/busybox-rootfs.sh");
    let out = Command::new(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(
        out.status.success(),
        "busybox-rootfs.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A runtime spec like `runc spec` writes, running `args`.
pub fn default_spec(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "husk-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// Writes a bundle (busybox rootfs + config.json) at `dir`.
pub fn write_bundle(dir: &Path, spec: &serde_json::Value) -> PathBuf {
    if !dir.join("rootfs/bin/busybox").exists() {
        busybox_rootfs(&dir.join("rootfs"));
    }
    let text = serde_json::to_vec_pretty(spec).unwrap_or_default();
    std::fs::write(dir.join("config.json"), text)
        .unwrap_or_else(|e| panic!("writing config.json: {e}"));
    dir.to_path_buf()
}

/// Runs `husk --root <root> <args>`.
pub fn husk(root: &Path, args: &[&str]) -> Output {
    husk_env(root, args, &[])
}

/// Like [`husk`] with extra environment variables.
///
/// Output goes through files, not pipes: after `create` the container holds
/// the stdio it was given (as under runc), so a pipe would reach EOF only
/// when the container ends. This waits for husk itself, then reads.
pub fn husk_env(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("husk-out-{}-{n}", std::process::id()));
    let (out_path, err_path) = (base.with_extension("out"), base.with_extension("err"));
    let out =
        std::fs::File::create(&out_path).unwrap_or_else(|e| panic!("{}: {e}", out_path.display()));
    let err =
        std::fs::File::create(&err_path).unwrap_or_else(|e| panic!("{}: {e}", err_path.display()));
    let mut cmd = Command::new(husk_bin());
    cmd.arg("--root").arg(root).args(args);
    cmd.stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("running husk: {e}"));
    let output = Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    output
}

/// Everything a sandbox could leave behind that mentions `marker` (a test's
/// directory): live processes, mounts, and files under `state_root`.
pub fn leftovers(marker: &Path, state_root: &Path) -> Vec<String> {
    let marker_s = marker.display().to_string();
    let markers = markers_of(marker);
    let mut found: Vec<String> = markers
        .iter()
        .skip(1)
        .map(|jail| format!("jail claimed for a sandbox under the marker: {jail}"))
        .collect();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // Zombies are reaped by their parent; only live processes count.
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'));
            if markers.iter().any(|m| cmdline.contains(m)) && !zombie {
                found.push(format!("process {pid}: {cmdline}"));
            }
        }
    }
    for line in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
    {
        if line.contains(&marker_s) {
            found.push(format!("mount: {line}"));
        }
    }
    if let Ok(entries) = std::fs::read_dir(state_root.join("sandbox")) {
        for e in entries.flatten() {
            found.push(format!("state entry: {}", e.path().display()));
        }
    }
    found
}

/// Polls `leftovers` for up to two seconds (processes take a moment to be
/// reaped) and returns what remains.
pub fn leftovers_settled(marker: &Path, state_root: &Path) -> Vec<String> {
    for _ in 0..100 {
        let l = leftovers(marker, state_root);
        if l.is_empty() {
            return l;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    leftovers(marker, state_root)
}

/// stdout as a string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as a string.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
pub mod containerd;

/// Makes this process adopt orphaned descendants, as conmon does, so a
/// container's shadow process (state.pid) can be waited for here.
pub fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes this process's reaping.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER failed");
}

/// How a waited-for process ended: (exit code, terminating signal).
pub fn wait_pid(pid: i32) -> (Option<i32>, Option<i32>) {
    let mut status = 0;
    // SAFETY: waitpid on a pid this process adopted; status is written.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(
        rc,
        pid,
        "waitpid({pid}) failed: {}",
        std::io::Error::last_os_error()
    );
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

/// Receives one fd sent with SCM_RIGHTS on a listening socket (the console
/// socket protocol runc uses).
pub fn receive_console_fd(listener: &std::os::unix::net::UnixListener) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd};
    let (conn, _) = listener.accept().expect("console socket accept");
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .expect("recvmsg");
    for c in msg.cmsgs().expect("cmsgs") {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the fd was just received and is ours.
            return unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no fd received on the console socket");
}

/// The pid of a live process whose command line contains both `name` and
/// `marker` (a test's directory).
pub fn pid_of(marker: &Path, name: &str) -> Option<i32> {
    let markers = markers_of(marker);
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
        let cmd = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?)
            .replace('\0', " ");
        (cmd.contains(name) && markers.iter().any(|m| cmd.contains(m))).then_some(pid)
    })
}

/// What names a sandbox under `marker` in a process's command line: the
/// marker itself, and the directory of each jail whose uid claim names a
/// sandbox under it (a jailed backend's command line names only that).
pub fn markers_of(marker: &Path) -> Vec<String> {
    let marker_s = marker.display().to_string();
    let mut markers = vec![marker_s.clone()];
    let root = Path::new(husk_runtime::jail::JAIL_ROOT);
    if let Ok(claims) = std::fs::read_dir(root.join("uids")) {
        for claim in claims.flatten() {
            let owner = std::fs::read_to_string(claim.path()).unwrap_or_default();
            if owner.starts_with(&marker_s) {
                let uid = claim.file_name().to_string_lossy().into_owned();
                markers.push(format!("{}/", root.join(uid).display()));
            }
        }
    }
    markers
}

/// `/proc/<pid>/status` fields of a process, by name.
pub fn proc_status_of(pid: i32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Checks that `pid` runs jailed as docs/security.md says for QEMU, husk-vmm
/// and the vsock backend: uid and gid one id of the jail range (the default
/// `jail_uid_base`/`jail_uid_count`), no groups but `allowed_groups`, no
/// capabilities, no_new_privs, a seccomp filter, and mount, network, IPC and
/// UTS namespaces not the host's, its root holding no host tree (no /etc
/// but the loader's cache, no /home, /root, /var, /proc). Returns the uid.
pub fn assert_jailed(pid: i32, what: &str) -> u32 {
    let st = proc_status_of(pid);
    let field = |k: &str| st.get(k).cloned().unwrap_or_default();
    let ids = |k: &str| -> Vec<u32> {
        field(k)
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    let uids = ids("Uid");
    let gids = ids("Gid");
    assert_eq!(uids.len(), 4, "{what} {pid}: {st:?}");
    let uid = uids[0];
    assert!(
        (1_800_000_000..1_801_000_000).contains(&uid),
        "{what} {pid} runs as uid {uid}, not one of the jail range"
    );
    assert!(uids.iter().all(|u| *u == uid), "{what}: uids {uids:?}");
    assert!(gids.iter().all(|g| *g == uid), "{what}: gids {gids:?}");
    assert_eq!(field("Groups"), "", "{what} {pid} keeps groups");
    for caps in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(field(caps), "0000000000000000", "{what} {pid}: {caps}");
    }
    assert_eq!(field("NoNewPrivs"), "1", "{what} {pid}");
    assert_eq!(field("Seccomp"), "2", "{what} {pid}");
    let ns = |p: i32, kind: &str| std::fs::read_link(format!("/proc/{p}/ns/{kind}")).ok();
    let me = std::process::id() as i32;
    for kind in ["mnt", "net", "ipc", "uts"] {
        let theirs = ns(pid, kind);
        assert!(theirs.is_some(), "{what} {pid}: no {kind} namespace read");
        assert_ne!(
            theirs,
            ns(me, kind),
            "{what} {pid} shares our {kind} namespace"
        );
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    for absent in [
        "etc/passwd",
        "etc/shadow",
        "home",
        "root",
        "var/lib",
        "var/log",
        "proc",
        "sys",
        "boot",
    ] {
        assert!(!root.join(absent).exists(), "{what} {pid} sees /{absent}");
    }
    assert!(
        root.join("usr").is_dir(),
        "{what} {pid}: no /usr in its root"
    );
    uid
}
