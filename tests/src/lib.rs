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
///
/// With `HUSK_TEST_POOL=1` in the environment, each test directory also
/// gets a warm pool (`pool::TestPool`, the default size class, in
/// `<dir>/pool`), and `HUSK_CONFIG` in this process's environment names its
/// configuration, so every husk, shim, containerd or podman the test starts
/// claims its sandboxes from it. Such runs need `--test-threads=1` (the
/// environment is the process's).
pub struct TestDir {
    pub path: PathBuf,
    pool: Option<pool::TestPool>,
}

/// Whether the client tests run with a warm pool (`HUSK_TEST_POOL=1`).
pub fn test_pool_on() -> bool {
    std::env::var("HUSK_TEST_POOL").is_ok_and(|v| v == "1")
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
        let pool = test_pool_on().then(|| {
            let pool = pool::TestPool::start(&path, &[pool::DEFAULT_CLASS]);
            std::env::set_var("HUSK_CONFIG", &pool.config);
            pool
        });
        TestDir { path, pool }
    }

    /// The warm pool of this test (`HUSK_TEST_POOL=1`).
    pub fn pool(&self) -> Option<&pool::TestPool> {
        self.pool.as_ref()
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
        if let Some(mut pool) = self.pool.take() {
            pool.stop();
            // What the pool served, for the run's log (--nocapture).
            let log = std::fs::read_to_string(&pool.log).unwrap_or_default();
            eprintln!(
                "husk-test-pool: {}: {} sandbox(es) claimed from the pool",
                self.path.display(),
                log.matches(" claimed by pid ").count()
            );
            std::env::remove_var("HUSK_CONFIG");
        }
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

/// A tarball of a busybox rootfs made at `dir/rootfs`, for the engines
/// that import images from one (podman, Docker).
pub fn busybox_tarball(dir: &Path) -> PathBuf {
    busybox_rootfs(&dir.join("rootfs"));
    let tar = dir.join("rootfs.tar");
    let out = Command::new("tar")
        .arg("-C")
        .arg(dir.join("rootfs"))
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()
        .unwrap_or_else(|e| panic!("tar: {e}"));
    assert!(out.status.success(), "tar: {}", stderr(&out));
    tar
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
///
/// A warm pool's own sandboxes under `marker` (`HUSK_TEST_POOL=1`: booting
/// or idle, not claimed) are the pool's, not left behind: they are not
/// counted. A claimed one is, until its container is deleted.
pub fn leftovers(marker: &Path, state_root: &Path) -> Vec<String> {
    let unclaimed = pool::unclaimed_markers(marker);
    leftovers_all(marker, state_root)
        .into_iter()
        .filter(|l| !unclaimed.iter().any(|u| l.contains(u.as_str())))
        .collect()
}

fn leftovers_all(marker: &Path, state_root: &Path) -> Vec<String> {
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
pub mod netns;
pub mod pool;

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
/// A warm pool's unclaimed sandboxes (`HUSK_TEST_POOL=1`) are not the
/// test's: they are left out.
pub fn pid_of(marker: &Path, name: &str) -> Option<i32> {
    let markers = markers_of(marker);
    let unclaimed = pool::unclaimed_markers(marker);
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
        let cmd = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?)
            .replace('\0', " ");
        (cmd.contains(name)
            && markers.iter().any(|m| cmd.contains(m))
            && !unclaimed.iter().any(|u| cmd.contains(u.as_str())))
        .then_some(pid)
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
pub fn proc_status(pid: i32) -> std::collections::HashMap<String, String> {
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
    let bad = jail_violations(pid, what);
    assert!(
        bad.is_empty(),
        "not jailed as docs/security.md says: {bad:#?}"
    );
    proc_status(pid)
        .get("Uid")
        .and_then(|u| u.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What of [`assert_jailed`] does not hold for `pid`.
pub fn jail_violations(pid: i32, what: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let mut check = |ok: bool, msg: String| {
        if !ok {
            bad.push(format!("{what} {pid}: {msg}"));
        }
    };
    let st = proc_status(pid);
    let field = |k: &str| st.get(k).cloned().unwrap_or_default();
    let ids = |k: &str| -> Vec<u32> {
        field(k)
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    let uids = ids("Uid");
    let gids = ids("Gid");
    let uid = uids.first().copied().unwrap_or(0);
    let defaults = husk_runtime::config::Config::default();
    let range = u64::from(defaults.jail_uid_base)
        ..u64::from(defaults.jail_uid_base) + u64::from(defaults.jail_uid_count);
    check(
        uids.len() == 4 && range.contains(&u64::from(uid)),
        format!("uids {uids:?}, not one of the jail range"),
    );
    check(uids.iter().all(|u| *u == uid), format!("uids {uids:?}"));
    check(gids.iter().all(|g| *g == uid), format!("gids {gids:?}"));
    check(
        field("Groups").is_empty(),
        format!("groups {}", field("Groups")),
    );
    for caps in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        check(
            field(caps) == "0000000000000000",
            format!("{caps} {}", field(caps)),
        );
    }
    check(field("NoNewPrivs") == "1", "no no_new_privs".into());
    check(
        field("Seccomp") == "2",
        format!("Seccomp {}", field("Seccomp")),
    );
    let ns = |p: i32, kind: &str| std::fs::read_link(format!("/proc/{p}/ns/{kind}")).ok();
    let me = std::process::id() as i32;
    for kind in ["mnt", "net", "ipc", "uts"] {
        let theirs = ns(pid, kind);
        check(
            theirs.is_some() && theirs != ns(me, kind),
            format!("shares our {kind} namespace (or none read)"),
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
        check(!root.join(absent).exists(), format!("sees /{absent}"));
    }
    check(root.join("usr").is_dir(), "no /usr in its root".into());
    bad
}

/// Host processes whose command line names `marker`, with that command line.
pub fn processes_naming(marker: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        if cmdline.contains(marker) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// What one host process of a sandbox is, by its command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRole {
    /// The sandbox's owner: the CLI's monitor or the containerd shim.
    Owner,
    Qemu,
    /// virtiofsd's parent, which only waits for its serving child.
    VirtiofsdParent,
    /// virtiofsd's serving process (PID 1 of a pid namespace of its own).
    Virtiofsd,
    VsockBackend,
}

/// Which uid a role runs as.
#[derive(Clone, Copy, Debug)]
pub enum UidRule {
    Root,
    /// A uid of the jail range (`jail_uid_base` .. + `jail_uid_count`).
    Jail,
}

/// What docs/security.md promises about one role's process, as
/// `/proc/<pid>/status` and `/proc/<pid>/ns/mnt` show it. `None`: not
/// promised, not checked. The one place these expectations live: the CLI
/// test (hostile.rs) and the containerd test (cri.rs) both check them.
#[derive(Clone, Copy, Debug)]
pub struct Confinement {
    pub uid: Option<UidRule>,
    /// Capabilities that must not be in `CapEff` (`u64::MAX`: none at all).
    pub cap_eff_lacks: u64,
    pub no_new_privs: Option<bool>,
    /// `Seccomp:` (2 = a filter).
    pub seccomp: Option<u8>,
    /// In a mount namespace other than the host's (the test's).
    pub own_mount_ns: Option<bool>,
    /// Jailed ([`jail_violations`]): the sandbox's uid, no groups or
    /// capabilities, namespaces and a root of its own.
    pub jailed: bool,
}

const CAP_MKNOD: u64 = 1 << 27;
const CAP_SETFCAP: u64 = 1 << 31;
const CAP_FSETID: u64 = 1 << 4;

/// docs/security.md, "Every helper of a sandbox runs jailed".
pub fn confinement(role: HostRole) -> Confinement {
    match role {
        // Root in the host's mounts: it makes the share's mounts.
        HostRole::Owner => Confinement {
            uid: Some(UidRule::Root),
            cap_eff_lacks: 0,
            no_new_privs: None,
            seccomp: None,
            own_mount_ns: Some(false),
            jailed: false,
        },
        // The jail (and `-sandbox on,...`, QEMU's own filter, under it).
        HostRole::Qemu => Confinement {
            uid: Some(UidRule::Jail),
            cap_eff_lacks: u64::MAX,
            no_new_privs: Some(true),
            seccomp: Some(2),
            own_mount_ns: Some(true),
            jailed: true,
        },
        // `--sandbox=namespace`: both virtiofsd processes are in their own
        // mount namespace.
        HostRole::VirtiofsdParent => Confinement {
            uid: None,
            cap_eff_lacks: 0,
            no_new_privs: None,
            seccomp: None,
            own_mount_ns: Some(true),
            jailed: false,
        },
        // `--seccomp=kill --modcaps=-mknod:-setfcap:-fsetid`, and the
        // spawner's no-set-id filter under its own.
        HostRole::Virtiofsd => Confinement {
            uid: None,
            cap_eff_lacks: CAP_MKNOD | CAP_SETFCAP | CAP_FSETID,
            no_new_privs: Some(true),
            seccomp: Some(2),
            own_mount_ns: Some(true),
            jailed: false,
        },
        // The jail: the sandbox's uid, no capabilities, no_new_privs, the
        // spawner's seccomp filter, namespaces and a root of its own.
        HostRole::VsockBackend => Confinement {
            uid: Some(UidRule::Jail),
            cap_eff_lacks: u64::MAX,
            no_new_privs: Some(true),
            seccomp: Some(2),
            own_mount_ns: Some(true),
            jailed: true,
        },
    }
}

/// The role of a sandbox's host process from its command line, if it is
/// one; virtiofsd's serving process is told from its parent by its pid
/// namespace.
pub fn host_role(pid: i32, cmdline: &str) -> Option<HostRole> {
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let program = cmdline.split(' ').next().unwrap_or_default();
    let name = Path::new(program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.starts_with("qemu-system") {
        Some(HostRole::Qemu)
    } else if name == "virtiofsd" {
        if ns(pid) == ns(std::process::id() as i32) {
            Some(HostRole::VirtiofsdParent)
        } else {
            Some(HostRole::Virtiofsd)
        }
    } else if name == "vhost-device-vsock" {
        Some(HostRole::VsockBackend)
    } else if name == "containerd-shim-husk-v2" || cmdline.contains(" __monitor ") {
        Some(HostRole::Owner)
    } else {
        None
    }
}

/// Checks one process against its role's [`confinement`]; returns what
/// does not hold.
pub fn confinement_violations(pid: i32, role: HostRole) -> Vec<String> {
    let want = confinement(role);
    let st = proc_status(pid);
    let field = |k: &str| st.get(k).cloned().unwrap_or_default();
    let mut bad = Vec::new();
    let uid: Option<u32> = field("Uid")
        .split_whitespace()
        .nth(1)
        .and_then(|u| u.parse().ok());
    let defaults = husk_runtime::config::Config::default();
    let jail = u64::from(defaults.jail_uid_base)
        ..u64::from(defaults.jail_uid_base) + u64::from(defaults.jail_uid_count);
    match (want.uid, uid) {
        (None, _) => {}
        (Some(UidRule::Root), Some(0)) => {}
        (Some(UidRule::Jail), Some(u)) if jail.contains(&u64::from(u)) => {}
        (Some(rule), got) => bad.push(format!("uid {got:?}, not {rule:?}")),
    }
    let cap_eff = u64::from_str_radix(&field("CapEff"), 16).unwrap_or(u64::MAX);
    if cap_eff & want.cap_eff_lacks != 0 {
        bad.push(format!(
            "CapEff {cap_eff:x} has {:x}",
            cap_eff & want.cap_eff_lacks
        ));
    }
    if let Some(nnp) = want.no_new_privs {
        if field("NoNewPrivs") != if nnp { "1" } else { "0" } {
            bad.push(format!("NoNewPrivs {}, not {}", field("NoNewPrivs"), nnp));
        }
    }
    if let Some(mode) = want.seccomp {
        if field("Seccomp") != mode.to_string() {
            bad.push(format!("Seccomp {}, not {mode}", field("Seccomp")));
        }
    }
    if let Some(own) = want.own_mount_ns {
        let mnt = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
        let theirs = mnt(pid);
        if theirs.is_none() || (theirs != mnt(std::process::id() as i32)) != own {
            bad.push(format!(
                "mount namespace {theirs:?}: {}",
                if own { "the host's" } else { "not the host's" }
            ));
        }
    }
    let mut bad: Vec<String> = bad
        .into_iter()
        .map(|b| format!("{role:?} {pid}: {b}"))
        .collect();
    if want.jailed {
        bad.extend(jail_violations(pid, &format!("{role:?}")));
    }
    bad
}

/// Checks every host process of a running sandbox against
/// docs/security.md: each of `roles` must be present, and every process of
/// `procs` with a role must hold its [`confinement`]. Panics naming each
/// process and field that does not.
pub fn assert_confined(procs: &[(i32, String)], roles: &[HostRole]) {
    let found: Vec<(i32, HostRole)> = procs
        .iter()
        .filter_map(|(pid, c)| host_role(*pid, c).map(|r| (*pid, r)))
        .collect();
    for role in roles {
        assert!(
            found.iter().any(|(_, r)| r == role),
            "no {role:?} among the sandbox's processes: {procs:?}"
        );
    }
    let bad: Vec<String> = found
        .iter()
        .flat_map(|(pid, role)| confinement_violations(*pid, *role))
        .collect();
    assert!(bad.is_empty(), "not as docs/security.md says: {bad:#?}");
}

/// `pid` and every process descending from it, with their command lines:
/// a sandbox owner and the helpers it spawned (jailed ones too, whose
/// command lines need not name the sandbox).
pub fn process_tree(pid: i32) -> Vec<(i32, String)> {
    let mut all: Vec<(i32, i32, String)> = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let ppid = proc_status(p)
            .get("PPid")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        all.push((p, ppid, cmdline));
    }
    let mut tree: Vec<(i32, String)> = all
        .iter()
        .filter(|(p, _, _)| *p == pid)
        .map(|(p, _, c)| (*p, c.clone()))
        .collect();
    // A sandbox claimed from a warm pool (HUSK_TEST_POOL=1): its helpers
    // are its keeper's children; the keeper holds a pidfd of its owner.
    tree.extend(
        all.iter()
            .filter(|(p, _, c)| c.contains(" pool keep ") && holds_pidfd_of(*p, pid))
            .map(|(p, _, c)| (*p, c.clone())),
    );
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i].0;
        for (p, ppid, c) in &all {
            if *ppid == parent && !tree.iter().any(|(t, _)| t == p) {
                tree.push((*p, c.clone()));
            }
        }
        i += 1;
    }
    tree
}

/// Whether process `holder` holds a pidfd of process `pid` (its fdinfo).
fn holds_pidfd_of(holder: i32, pid: i32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{holder}/fdinfo")) else {
        return false;
    };
    let wanted = format!("Pid:\t{pid}");
    fds.flatten().any(|fd| {
        std::fs::read_to_string(fd.path())
            .is_ok_and(|info| info.lines().any(|l| l.trim_end() == wanted))
    })
}

/// Boots a sandbox named `name` under the test's state root, with the
/// machine's husk config (library-level tests: no CLI, no containerd).
pub fn start_sandbox(dir: &TestDir, name: &str) -> husk_runtime::sandbox::Sandbox {
    require_guest();
    let config = husk_runtime::config::Config::load().expect("husk config");
    let mut sc = husk_runtime::sandbox::SandboxConfig::new(name, &config);
    sc.state_root = dir.state_root().join("sandbox");
    husk_runtime::sandbox::Sandbox::start(&config, &sc)
        .unwrap_or_else(|e| panic!("starting sandbox {name}: {e}"))
}

#[cfg(test)]
mod limits {
    /// One vCPU maximum for every hypervisor: the runtime sizes VMs by the
    /// bound husk-vmm's MP table holds.
    #[test]
    fn the_vcpu_maximum_is_husk_vmms() {
        assert_eq!(
            husk_runtime::sizing::MAX_VCPUS,
            u32::from(husk_vmm::mptable::MAX_VCPUS)
        );
    }
}
