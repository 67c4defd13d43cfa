//! A hostile guest gains nothing on the host. Each test runs, in a real
//! microVM, what an attacker with root in the guest does (a privileged
//! container: every capability, no seccomp, so it can mount the virtio-fs
//! device itself and remount its volumes), then checks the outcome from the
//! host.

use husk_runtime::agent::{RPC_TIMEOUT, SHUTDOWN_TIMEOUT};
use husk_tests::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn privileged_spec(script: &str) -> serde_json::Value {
    let mut spec = default_spec(&["sh", "-c", script]);
    // Every capability there is, as `docker run --privileged` grants.
    let mut all: Vec<String> = caps::all().iter().map(|c| c.to_string()).collect();
    all.sort();
    let caps = serde_json::json!(all);
    spec["process"]["capabilities"] = serde_json::json!({
        "bounding": caps, "effective": caps, "permitted": caps
    });
    spec["process"]["noNewPrivileges"] = serde_json::json!(false);
    // Every device, as a privileged container gets.
    spec["linux"]["resources"] = serde_json::json!({"devices": [{"allow": true, "access": "rwm"}]});
    // The guest's pid namespace: PID 1 is the agent.
    if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "pid");
    }
    spec
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Guest root enters the agent's mount namespace and tries to plant what a
/// host walking the share would follow (a symlink where the next
/// container's mounts go, a directory for a container not yet created);
/// remounts a read-only volume read-write and writes it; makes a device
/// node on host storage; makes set-uid and set-gid files there, and writes
/// to a set-uid program the host already had. Every attempt is refused by the host, and the host
/// sees nothing of them. Writes the guest is entitled to (its rootfs, a rw
/// volume) still reach the host, so the refusals are not an accident of a
/// broken share.
#[test]
fn guest_root_cannot_plant_in_the_share_write_ro_volumes_or_make_device_nodes() {
    require_guest();
    let dir = TestDir::new("hostile-share");
    let root = dir.state_root();
    let ro = dir.path.join("ro-volume");
    let rw = dir.path.join("rw-volume");
    let canary = dir.path.join("canary");
    for d in [&ro, &rw, &canary] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    std::fs::write(ro.join("file"), "host content\n").expect("write");
    // A set-uid-root program already on the host's storage.
    let setuid_prog = rw.join("setuid-prog");
    std::fs::write(&setuid_prog, "#!/bin/sh\n").expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&setuid_prog, std::fs::Permissions::from_mode(0o4755))
            .expect("chmod");
    }
    let id = "hostile";
    // Guest root: no pid namespace of its own, so it enters the mount
    // namespace of the guest's PID 1 (the agent), where the share's root is
    // mounted at /run/husk/shared.
    let script = format!(
        r#"
attempt() {{ if sh -c "$1" 2>/dev/null; then echo "DONE: $1"; else echo "refused: $1"; fi; }}
guest() {{ nsenter -t 1 -m -- sh -c "$1" 2>/dev/null; }}
S=/run/husk/shared
guest "[ -d $S/{id}/rootfs ]" && echo "share: sees {id}/rootfs"
# Read-only in the guest's own kernel is the guest's to undo: it does.
guest "mount -o remount,rw $S" && echo "guest: share remounted rw"
mount -o remount,rw,bind /ro && echo "guest: /ro remounted rw"
attempt "nsenter -t 1 -m -- ln -s {canary} $S/planted"
attempt "nsenter -t 1 -m -- mkdir $S/next-container"
attempt "nsenter -t 1 -m -- ln -s {canary} $S/{id}/mounts/9"
attempt "nsenter -t 1 -m -- touch $S/{id}/mounts/new-file"
attempt "nsenter -t 1 -m -- touch $S/after-remount"
attempt "echo guest > /ro/file"
attempt "echo guest > /ro/new"
attempt "mknod /devnode c 1 3"
attempt "nsenter -t 1 -m -- mknod $S/{id}/rootfs/devnode2 b 7 0"
echo x > /rw/plain
attempt "chmod 4755 /rw/plain"
attempt "chmod 2755 /rw/plain"
attempt "install -m 4755 /bin/busybox /rw/suid-copy"
echo more >> /rw/setuid-prog && echo "setuid file: written"
echo guest > /rw/file && echo "rw volume: written"
echo guest > /rootfs-file && echo "rootfs: written"
"#,
        canary = canary.display(),
    );
    let mut spec = privileged_spec(&script);
    let mounts = spec["mounts"].as_array_mut().expect("mounts");
    mounts.push(serde_json::json!({
        "destination": "/ro", "type": "bind", "source": ro, "options": ["rbind", "ro"]
    }));
    mounts.push(serde_json::json!({
        "destination": "/rw", "type": "bind", "source": rw, "options": ["rbind", "rw"]
    }));
    let bundle = dir.path.join("bundle");
    std::fs::create_dir_all(&bundle).expect("mkdir bundle");
    write_bundle(&bundle, &spec);
    let out = husk(&root, &["run", "-b", s(&bundle), id]);
    let text = stdout(&out);
    assert!(out.status.success(), "run failed: {text}{}", stderr(&out));
    assert!(text.contains(&format!("share: sees {id}/rootfs")), "{text}");
    assert!(text.contains("guest: share remounted rw"), "{text}");
    assert!(text.contains("guest: /ro remounted rw"), "{text}");
    assert!(!text.contains("DONE:"), "the guest got through:\n{text}");
    assert_eq!(text.matches("refused:").count(), 12, "{text}");
    assert!(
        text.contains("rw volume: written")
            && text.contains("rootfs: written")
            && text.contains("setuid file: written"),
        "{text}"
    );
    // No set-id file on host storage: none made, and the one the guest
    // wrote to lost its bit.
    {
        use std::os::unix::fs::PermissionsExt;
        for entry in std::fs::read_dir(&rw).expect("rw volume").flatten() {
            let mode = entry.metadata().expect("stat").permissions().mode();
            assert_eq!(mode & 0o6000, 0, "{:?} is set-id: {mode:o}", entry.path());
        }
        assert_eq!(
            std::fs::read_to_string(&setuid_prog).expect("setuid-prog"),
            "#!/bin/sh\nmore\n"
        );
    }

    // From the host: the read-only volume is as it was.
    assert_eq!(
        std::fs::read_to_string(ro.join("file")).expect("ro file"),
        "host content\n"
    );
    assert!(!ro.join("new").exists());
    // No device node on host storage.
    let rootfs = bundle.join("rootfs");
    assert!(!rootfs.join("devnode").exists() && !rootfs.join("devnode2").exists());
    // The canary the links pointed at was never written to.
    assert_eq!(std::fs::read_dir(&canary).expect("canary").count(), 0);
    // The entitled writes did arrive.
    assert_eq!(
        std::fs::read_to_string(rw.join("file")).expect("rw"),
        "guest\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("rootfs-file")).expect("rootfs file"),
        "guest\n"
    );
    let _ = std::fs::remove_file(rootfs.join("rootfs-file"));
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// The share as the host leaves it while a container runs: the guest's view
/// is a read-only, nosuid, nodev mount; every bind under it is nosuid and
/// nodev; a `ro` volume is read-only on the host itself; the sandbox's
/// directory is a size-limited tmpfs of its own.
#[test]
fn the_share_is_read_only_nosuid_nodev_on_the_host() {
    require_guest();
    let dir = TestDir::new("hostile-flags");
    let root = dir.state_root();
    let ro = dir.path.join("ro-volume");
    std::fs::create_dir_all(&ro).expect("mkdir");
    let mut spec = default_spec(&["sleep", "600"]);
    spec["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(serde_json::json!({
            "destination": "/ro", "type": "bind", "source": ro, "options": ["rbind", "ro"]
        }));
    let bundle = dir.path.join("bundle");
    std::fs::create_dir_all(&bundle).expect("mkdir bundle");
    write_bundle(&bundle, &spec);
    let out = husk(&root, &["run", "-d", "-b", s(&bundle), "flags"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sandbox = husk_runtime::sandbox::sandbox_dir(&root.join("sandbox"), "flags");
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    // mount point -> per-mount options (field 6)
    let options = |mount_point: &Path| -> Option<String> {
        info.lines().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(4) == Some(&s(mount_point))).then(|| f.get(5).unwrap_or(&"").to_string())
        })
    };
    let view = sandbox.join("shared");
    let o = options(&view).unwrap_or_else(|| panic!("{} is not a mount:\n{info}", view.display()));
    for flag in ["ro", "nosuid", "nodev"] {
        assert!(o.split(',').any(|x| x == flag), "guest view {o}: no {flag}");
    }
    for (rel, want_ro) in [("flags/rootfs", false), ("flags/mounts/5", true)] {
        for base in ["host", "shared"] {
            let p = sandbox.join(base).join(rel);
            let o = options(&p).unwrap_or_else(|| panic!("{} is not a mount", p.display()));
            let flags: Vec<&str> = o.split(',').collect();
            assert!(
                flags.contains(&"nosuid") && flags.contains(&"nodev"),
                "{}: {o}",
                p.display()
            );
            assert_eq!(flags.contains(&"ro"), want_ro, "{}: {o}", p.display());
        }
    }
    // The sandbox's files live on its own size-limited tmpfs.
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(s(&sandbox)))
        .unwrap_or_else(|| panic!("{} is not a mount:\n{info}", sandbox.display()));
    let (mount_opts, fs) = line.split_once(" - ").expect("mountinfo separator");
    assert!(fs.starts_with("tmpfs "), "{line}");
    for flag in ["nosuid", "nodev", "noexec"] {
        assert!(
            mount_opts
                .split(' ')
                .nth(5)
                .unwrap_or("")
                .split(',')
                .any(|x| x == flag),
            "{line}: no {flag}"
        );
    }
    for opt in ["size=16384k", "nr_inodes=4096"] {
        assert!(fs.split([' ', ',']).any(|x| x == opt), "{line}: no {opt}");
    }
    // Nobody but root can list or write the share's directories on the host.
    use std::os::unix::fs::PermissionsExt;
    for rel in ["host", "shared", "host/flags", "host/flags/mounts"] {
        let mode = std::fs::metadata(sandbox.join(rel))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o711, "{rel} is {mode:o}");
    }
    assert!(husk(&root, &["delete", "--force", "flags"])
        .status
        .success());
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// A guest chooses its process names: `husk ps` never passes an escape
/// sequence, a bell or a carriage return from them to the terminal.
#[test]
fn escape_sequences_in_guest_process_names_never_reach_the_terminal() {
    require_guest();
    let dir = TestDir::new("hostile-ps");
    let root = dir.state_root();
    // `ps` shows a process's name (its comm): the name of the script it
    // runs, which the guest chooses. This one is ESC ] 0 ; p w BEL ESC [ 2 J CR.
    let spec = default_spec(&[
        "sh",
        "-c",
        r#"n="$(printf '\033]0;pw\007\033[2J\r')"; printf '#!/bin/sh\nsleep 600\n' > "/tmp/$n"; chmod +x "/tmp/$n"; exec "/tmp/$n""#,
    ]);
    let bundle = dir.path.join("bundle");
    std::fs::create_dir_all(&bundle).expect("mkdir bundle");
    write_bundle(&bundle, &spec);
    let out = husk(&root, &["run", "-d", "-b", s(&bundle), "ps-evil"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The script runs once the shell has made it: ask until it is there.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let out = husk(&root, &["ps", "ps-evil"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        if text.contains("pw") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        text.contains("]0;pw?"),
        "the process is not listed:\n{text}"
    );
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "control characters reached the terminal: {text:?}"
    );
    assert!(husk(&root, &["delete", "--force", "ps-evil"])
        .status
        .success());
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// Every host process of a running sandbox is confined as docs/security.md
/// says (`husk_tests::confinement`): QEMU and the vsock backend jailed (the
/// sandbox's one uid of the jail range, no groups or capabilities,
/// no_new_privs, seccomp, mount, network, IPC and UTS namespaces and a root
/// of their own, QEMU seeing only its two ends of the sandbox directory);
/// virtiofsd's serving process under its seccomp filter, in namespaces of
/// its own, without the capabilities to make device nodes, set file
/// capabilities or keep set-id bits; the monitor root in the host's mounts.
#[test]
fn device_helpers_run_under_their_filters_and_the_vsock_backend_jailed() {
    require_guest();
    let dir = TestDir::new("hostile-procs");
    let root = dir.state_root();
    let bundle = dir.path.join("bundle");
    std::fs::create_dir_all(&bundle).expect("mkdir bundle");
    write_bundle(&bundle, &default_spec(&["sleep", "600"]));
    let out = husk(&root, &["run", "-d", "-b", s(&bundle), "procs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let marker = dir.path.display().to_string();
    let monitor = processes_naming(&marker)
        .into_iter()
        .find(|(_, c)| c.contains(" __monitor "))
        .expect("the sandbox's monitor");
    let procs = process_tree(monitor.0);
    // The expectations live in one place (husk_tests::confinement), shared
    // with the containerd pod test.
    assert_confined(
        &procs,
        &[
            HostRole::Owner,
            HostRole::Qemu,
            HostRole::VirtiofsdParent,
            HostRole::Virtiofsd,
            HostRole::VsockBackend,
        ],
    );
    // QEMU and the vsock backend share the sandbox's one jail uid.
    let uid_of = |role: HostRole| -> Vec<String> {
        procs
            .iter()
            .filter(|(pid, c)| host_role(*pid, c) == Some(role))
            .map(|(pid, _)| proc_status(*pid).get("Uid").cloned().unwrap_or_default())
            .collect()
    };
    let (qemu_uid, vsock_uid) = (uid_of(HostRole::Qemu), uid_of(HostRole::VsockBackend));
    assert!(
        qemu_uid.len() == 1 && qemu_uid == vsock_uid,
        "{qemu_uid:?} {vsock_uid:?}"
    );
    // Of the sandbox's directory, QEMU sees its two ends: virtiofsd's
    // socket and the console FIFO; no log, no state, no share.
    let qemu = procs
        .iter()
        .find(|(pid, c)| host_role(*pid, c) == Some(HostRole::Qemu))
        .expect("qemu");
    let sandbox_dir = husk_runtime::sandbox::sandbox_dir(&root.join("sandbox"), "procs");
    let seen = format!("/proc/{}/root{}", qemu.0, sandbox_dir.display());
    let mut names: Vec<String> = std::fs::read_dir(&seen)
        .unwrap_or_else(|e| panic!("{seen}: {e}"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["console.fifo", "vhost-fs.sock"], "qemu sees {seen}");
    assert!(husk(&root, &["delete", "--force", "procs"])
        .status
        .success());
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: i32) -> u64 {
    proc_status(pid)
        .get("VmRSS")
        .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Guest root floods the serial console and its stdout for a minute. The
/// console log on the host stays under its cap (1 MiB, plus one 64 KiB
/// chunk, in each of console.log and console.log.1), the sandbox's owner
/// (the monitor) stays under 64 MiB and each helper under its stated bound
/// (QEMU: the VM's RAM + 192 MiB, the vsock backend: RAM + 64 MiB,
/// virtiofsd: 64 MiB), the stdout really flows, and other sandboxes are
/// created, run and answer meanwhile.
#[test]
fn a_console_flood_is_capped_and_other_sandboxes_keep_working() {
    require_guest();
    let dir = TestDir::new("hostile-flood");
    let root = dir.state_root();
    // The guest's console is ttyS0 (4:64): guest root makes the node and
    // writes to it without end, and floods its stdout meanwhile.
    let script = "mknod /dev/ttyS0 c 4 64 || exit 1; (while :; do cat /bin/busybox; done) & \
                  while :; do cat /bin/busybox > /dev/ttyS0; done";
    let flood = dir.path.join("flood");
    std::fs::create_dir_all(&flood).expect("mkdir");
    write_bundle(&flood, &privileged_spec(script));
    // The container's stdout is a pipe a thread here drains and counts (a
    // file would fill the disk).
    let (reader, writer) = std::io::pipe().expect("pipe");
    let status = std::process::Command::new(husk_bin())
        .arg("--root")
        .arg(&root)
        .args(["run", "-d", "-b", s(&flood), "flood"])
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("husk run");
    assert!(status.success(), "husk run -d flood failed");
    let drained = std::thread::spawn(move || {
        let mut reader = reader;
        std::io::copy(&mut reader, &mut std::io::sink()).unwrap_or(0)
    });
    let sandbox = husk_runtime::sandbox::sandbox_dir(&root.join("sandbox"), "flood");
    let console = sandbox.join("console.log");
    let rotated = sandbox.join("console.log.1");
    let monitor = pid_of(&dir.path, "__monitor").expect("the flood's monitor");
    // Every host process of the flooding sandbox, with the bound its
    // resident memory must stay under (the VM's RAM is 128 MiB).
    let helpers: Vec<(&str, i32, u64)> = [
        ("qemu-system", (128 + 192) << 10),
        ("virtiofsd", 64 << 10),
        ("vhost-device-vsock", (128 + 64) << 10),
    ]
    .into_iter()
    .map(|(name, bound)| {
        let pid = pid_of(&dir.path, name).unwrap_or_else(|| panic!("no {name}"));
        (name, pid, bound)
    })
    .collect();
    let mut helper_rss: Vec<u64> = vec![0; helpers.len()];
    let cap = husk_runtime::console::CONSOLE_CAP + (64 << 10);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);

    let quiet = dir.path.join("quiet");
    std::fs::create_dir_all(&quiet).expect("mkdir");
    write_bundle(&quiet, &default_spec(&["echo", "still here"]));

    let start = std::time::Instant::now();
    let (mut max_rss, mut max_log, mut runs) = (0, 0, 0);
    while start.elapsed() < std::time::Duration::from_secs(60) {
        max_rss = max_rss.max(rss_kib(monitor));
        for (i, (_, pid, _)) in helpers.iter().enumerate() {
            helper_rss[i] = helper_rss[i].max(rss_kib(*pid));
        }
        max_log = max_log.max(size(&console)).max(size(&rotated));
        if runs < 3 && start.elapsed() > std::time::Duration::from_secs(10 + 15 * runs) {
            let out = husk(&root, &["run", "-b", s(&quiet), &format!("quiet{runs}")]);
            assert!(out.status.success(), "{}", stderr(&out));
            assert_eq!(stdout(&out), "still here\n");
            runs += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert_eq!(runs, 3);
    assert!(size(&rotated) > 0, "the flood never reached the cap");
    assert!(
        max_log <= cap,
        "console log grew to {max_log} bytes (cap {cap})"
    );
    // The monitor copies through one 64 KiB buffer: its memory does not
    // follow the flood (measured ~10 MiB; the bound leaves room).
    assert!(max_rss < 64 << 10, "the monitor grew to {max_rss} KiB");
    for ((name, _, bound), rss) in helpers.iter().zip(&helper_rss) {
        assert!(rss < bound, "{name} grew to {rss} KiB (bound {bound} KiB)");
    }
    assert!(husk(&root, &["delete", "--force", "flood"])
        .status
        .success());
    // The stdout flood did flow (at tens of MiB/s here) while all this held.
    let bytes = drained.join().expect("drain thread");
    assert!(
        bytes > 256 << 20,
        "only {bytes} bytes of stdout in a minute"
    );
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// A read-only rootfs (`root.readonly`) is read-only on the host, not only
/// in the guest's kernel: guest root remounts its `/` read-write and writes
/// to it, and writes through its own view of the share; both are refused
/// and the host's rootfs is untouched. The mount points the container
/// needs in it (a tmpfs and a file bind at paths the image lacks, a `cwd`
/// it lacks) were made by the host before it was shared, so the container
/// runs.
#[test]
fn a_read_only_rootfs_is_read_only_on_the_host() {
    require_guest();
    let dir = TestDir::new("hostile-rorootfs");
    let root = dir.state_root();
    let id = "rorootfs";
    let file = dir.path.join("bound-file");
    std::fs::write(&file, "bound\n").expect("write");
    let script = format!(
        r#"
attempt() {{ if sh -c "$1" 2>/dev/null; then echo "DONE: $1"; else echo "refused: $1"; fi; }}
S=/run/husk/shared
pwd
cat /new/file
touch /new/tmp/ok && echo "tmpfs: written"
mount -o remount,rw / && echo "guest: / remounted rw"
attempt "echo guest > /guest-file"
attempt "echo guest >> /bin/busybox"
attempt "nsenter -t 1 -m -- sh -c 'echo guest > $S/{id}/rootfs/via-share'"
attempt "nsenter -t 1 -m -- mkdir $S/{id}/rootfs/via-share-dir"
"#
    );
    let mut spec = privileged_spec(&script);
    spec["root"]["readonly"] = serde_json::json!(true);
    spec["process"]["cwd"] = serde_json::json!("/work/dir");
    let mounts = spec["mounts"].as_array_mut().expect("mounts");
    mounts.push(serde_json::json!({
        "destination": "/new/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]
    }));
    mounts.push(serde_json::json!({
        "destination": "/new/file", "type": "bind", "source": file, "options": ["rbind", "ro"]
    }));
    let bundle = dir.path.join("bundle");
    std::fs::create_dir_all(&bundle).expect("mkdir bundle");
    write_bundle(&bundle, &spec);
    let rootfs = bundle.join("rootfs");
    let busybox_before = std::fs::read(rootfs.join("bin/busybox")).expect("busybox");
    let out = husk(&root, &["run", "-b", s(&bundle), id]);
    let text = stdout(&out);
    assert!(out.status.success(), "run failed: {text}{}", stderr(&out));
    assert!(text.lines().any(|l| l == "/work/dir"), "{text}");
    assert!(text.contains("bound\ntmpfs: written"), "{text}");
    assert!(text.contains("guest: / remounted rw"), "{text}");
    assert!(!text.contains("DONE:"), "the guest got through:\n{text}");
    assert_eq!(text.matches("refused:").count(), 4, "{text}");
    // From the host: nothing written, the program unchanged, and the mount
    // points the host made are the only new entries.
    for absent in ["guest-file", "via-share", "via-share-dir"] {
        assert!(!rootfs.join(absent).exists(), "{absent} on the host");
    }
    assert_eq!(
        std::fs::read(rootfs.join("bin/busybox")).expect("busybox"),
        busybox_before
    );
    assert!(rootfs.join("new/tmp").is_dir() && rootfs.join("new/file").is_file());
    assert!(rootfs.join("work/dir").is_dir());
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

// --- Attacks from the agent itself -------------------------------------
//
// A guest whose kernel and agent are the attacker's answers the host's RPCs
// as it likes. These tests boot the hostile agent (the `hostile-test`
// feature, target/guest/initramfs-hostile.img) and choose its attack with
// `husk.hostile=<attack>` on the guest kernel's command line.

/// The kernel parameter naming the hostile agent's attack (agent/src/hostile.rs).
const HOSTILE_PARAM: &str = "husk.hostile=";
/// How far past a documented timeout the host may answer on a loaded machine.
const MARGIN: Duration = Duration::from_secs(15);

/// The hostile agent's initramfs, which `make build` makes.
fn hostile_initramfs() -> PathBuf {
    let p = workspace_root().join("target/guest/initramfs-hostile.img");
    assert!(
        p.is_file(),
        "{} is missing: run `make build` (or `make initramfs-hostile`) first",
        p.display()
    );
    p
}

/// A runtime configuration booting the hostile agent with `attack`.
fn hostile_config(dir: &TestDir, attack: &str) -> PathBuf {
    let p = dir.path.join("hostile.toml");
    let body = format!(
        "initramfs = \"{}\"\nkernel_params = \"{HOSTILE_PARAM}{attack}\"\n",
        hostile_initramfs().display()
    );
    std::fs::write(&p, body).expect("writing the config");
    p
}

/// The content of file `name` in a newc cpio archive (an initramfs).
fn cpio_file(archive: &[u8], name: &str) -> Option<Vec<u8>> {
    let field = |h: &[u8], i: usize| -> Option<usize> {
        let hex = std::str::from_utf8(h.get(6 + 8 * i..14 + 8 * i)?).ok()?;
        usize::from_str_radix(hex, 16).ok()
    };
    let pad4 = |n: usize| (n + 3) & !3;
    let mut at = 0;
    while let Some(header) = archive.get(at..at + 110) {
        if &header[..6] != b"070701" {
            return None;
        }
        let (size, name_len) = (field(header, 6)?, field(header, 11)?);
        let path = archive.get(at + 110..at + 110 + name_len.checked_sub(1)?)?;
        let data = pad4(at + 110 + name_len);
        if path == b"TRAILER!!!" {
            return None;
        }
        if path.strip_prefix(b"./").unwrap_or(path) == name.as_bytes() {
            return archive.get(data..data + size).map(<[u8]>::to_vec);
        }
        at = pad4(data + size);
    }
    None
}

/// What the agent (/init) of an initramfs says to `--version`.
fn agent_version(dir: &TestDir, initramfs: &Path) -> String {
    let archive = std::fs::read(initramfs).expect("reading the initramfs");
    let agent =
        cpio_file(&archive, "init").unwrap_or_else(|| panic!("{}: no /init", initramfs.display()));
    let path = dir.path.join("init");
    std::fs::write(&path, agent).expect("writing the agent");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let out = std::process::Command::new(&path)
        .arg("--version")
        .output()
        .expect("running the agent's --version");
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

/// The production initramfs has no hostile mode: its agent says so, and
/// holds no trace of the mode's messages; the hostile agent says it has
/// (so neither check is blind).
#[test]
fn the_production_agent_has_no_hostile_mode() {
    require_guest();
    let dir = TestDir::new("hostile-production");
    let production = workspace_root().join("target/guest/initramfs.img");
    let version = agent_version(&dir, &production);
    assert!(version.starts_with("husk-agent "), "{version:?}");
    assert!(
        !version.contains("hostile"),
        "production agent: {version:?}"
    );
    let version = agent_version(&dir, &hostile_initramfs());
    assert!(
        version.contains("(hostile-test"),
        "hostile agent: {version:?}"
    );
    let contains = |haystack: &[u8], needle: &str| {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    };
    let production = std::fs::read(production).expect("reading initramfs.img");
    let hostile = std::fs::read(hostile_initramfs()).expect("reading initramfs-hostile.img");
    for word in ["hostile test mode", "unknown hostile attack"] {
        assert!(contains(&hostile, word), "the hostile agent lacks {word:?}");
        assert!(
            !contains(&production, word),
            "the production initramfs holds {word:?}"
        );
    }
}

/// An error line from the host: one line, no control characters, short.
fn assert_clean_error_line(err: &str) {
    assert!(err.starts_with("husk: "), "{err:?}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(
        !err.trim_end_matches('\n').chars().any(char::is_control),
        "control characters reached the terminal: {err:?}"
    );
    assert!(err.len() < 8 << 10, "a {} byte error line", err.len());
}

/// Creates a container on a hostile agent answering StartContainer with
/// `attack`; `husk start` then fails with an error saying `expect`, as soon
/// as the answer arrives or, for an attack with none, once the RPC timeout
/// has passed and not much later. The container is stopped, `husk delete`
/// ends it promptly (the guest cannot hold it up), and nothing is left.
fn start_attack_fails_cleanly(dir: &TestDir, attack: &str, expect: &str, times_out: bool) {
    start_attack_fails_cleanly_while(dir, attack, expect, times_out, || ());
}

/// [`start_attack_fails_cleanly`], running `meanwhile` on another thread
/// while `husk start` waits; returns what `meanwhile` returned and whether
/// it was done before `husk start` was.
fn start_attack_fails_cleanly_while<T: Send + 'static>(
    dir: &TestDir,
    attack: &str,
    expect: &str,
    times_out: bool,
    meanwhile: impl FnOnce() -> T + Send + 'static,
) -> (T, bool) {
    let root = dir.state_root();
    let config = hostile_config(dir, attack);
    let bundle = dir.path.join("bundle");
    std::fs::create_dir_all(&bundle).expect("mkdir bundle");
    write_bundle(&bundle, &default_spec(&["sleep", "600"]));
    let env = [("HUSK_CONFIG", s(&config))];
    let out = husk_env(&root, &["create", "-b", s(&bundle), attack], &env);
    assert!(out.status.success(), "create: {}", stderr(&out));

    let other = std::thread::spawn(move || {
        let value = meanwhile();
        (value, Instant::now())
    });
    let t = Instant::now();
    let out = husk(&root, &["start", attack]);
    let took = t.elapsed();
    let (value, other_done) = other.join().expect("the other thread");
    let other_first = other_done < t + took;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "start: {err}");
    assert!(err.contains(expect), "start: {err:?}");
    assert_clean_error_line(&err);
    if times_out {
        assert!(
            took >= RPC_TIMEOUT && took < RPC_TIMEOUT + MARGIN,
            "start failed after {took:?} (timeout {RPC_TIMEOUT:?})"
        );
    } else {
        assert!(took < RPC_TIMEOUT, "start failed only after {took:?}");
    }

    let st = husk(&root, &["state", attack]);
    assert!(st.status.success(), "state: {}", stderr(&st));
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("state JSON");
    assert_eq!(st["status"], "stopped");
    let t = Instant::now();
    let out = husk(&root, &["delete", attack]);
    assert!(out.status.success(), "delete: {}", stderr(&out));
    let took = t.elapsed();
    assert!(
        took < SHUTDOWN_TIMEOUT + MARGIN,
        "delete took {took:?} (shutdown timeout {SHUTDOWN_TIMEOUT:?})"
    );
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
    (value, other_first)
}

/// A frame on the request's stream of a type that is no response.
#[test]
fn a_reply_frame_of_a_bad_type_is_an_error() {
    require_guest();
    let dir = TestDir::new("hostile-bad-type");
    start_attack_fails_cleanly(&dir, "start-bad-type", "malformed frame (type 0x7f", false);
}

/// A reply whose payload is not protobuf.
#[test]
fn a_reply_that_is_not_protobuf_is_an_error() {
    require_guest();
    let dir = TestDir::new("hostile-garbage");
    start_attack_fails_cleanly(&dir, "start-garbage", "the reply is malformed", false);
}

/// A well-formed reply on a stream the host never opened is no answer.
#[test]
fn a_reply_on_a_stream_never_opened_is_no_answer() {
    require_guest();
    let dir = TestDir::new("hostile-wrong-stream");
    start_attack_fails_cleanly(&dir, "start-wrong-stream", "no answer within", true);
}

/// A 4 MiB reply (the largest frame ttrpc takes): an error whose message is
/// escape sequences end to end. The host keeps a short, printable part.
#[test]
fn a_4_mib_reply_gives_a_short_printable_error() {
    require_guest();
    let dir = TestDir::new("hostile-huge");
    start_attack_fails_cleanly(
        &dir,
        "start-huge",
        "?]0;pwned??[2J??31m?husk: forged ",
        false,
    );
}

/// A header claiming 4 GiB, then silence: the host allocates nothing for
/// it, ends the connection at once (no later reply could be found in the
/// stream), and the guest cannot hold the delete up.
#[test]
fn a_reply_header_claiming_4_gib_ends_the_connection_and_delete_works() {
    require_guest();
    let dir = TestDir::new("hostile-oversized");
    start_attack_fails_cleanly(
        &dir,
        "start-oversized",
        "a reply of 4294967295 bytes",
        false,
    );
}

/// StartContainer never answered: `husk start` fails at the timeout;
/// while it waits, another sandbox (the production agent) is created, runs
/// and answers.
#[test]
fn an_rpc_that_never_answers_times_out_and_other_sandboxes_work() {
    require_guest();
    let dir = TestDir::new("hostile-hang");
    let root = dir.state_root();
    let bystander = dir.path.join("bystander");
    std::fs::create_dir_all(&bystander).expect("mkdir");
    write_bundle(&bystander, &default_spec(&["echo", "still here"]));
    let (out, during_the_hang) =
        start_attack_fails_cleanly_while(&dir, "start-hang", "no answer within", true, {
            let root = root.clone();
            move || husk(&root, &["run", "-b", s(&bystander), "bystander"])
        });
    assert!(out.status.success(), "bystander: {}", stderr(&out));
    assert_eq!(stdout(&out), "still here\n");
    assert!(during_the_hang, "the bystander ended after the hang");
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// The scheduler state of a process (`R`, `S`, `T`...), if it lives.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

/// Waits for `child` for at most `limit`, failing as soon as it or one of
/// its descendants (the shadow) is stopped.
fn wait_never_stopped(
    child: &mut std::process::Child,
    limit: Duration,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        for (pid, _) in process_tree(child.id() as i32) {
            let state = proc_state(pid);
            assert!(
                !matches!(state, Some('T' | 't')),
                "host process {pid} is stopped ({state:?})"
            );
        }
        assert!(Instant::now() < deadline, "husk still runs after {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// WaitProcess reports SIGSTOP, and then signal 999, as the signal that
/// ended the process: `husk run` exits 128+19 and 255 (the documented
/// mapping: 128+n capped at 255, a signal raised only when its default
/// action ends a process), and neither it nor its shadow is ever stopped.
#[test]
fn stop_and_out_of_range_exit_signals_give_a_status_never_a_stop() {
    require_guest();
    for (signal, code) in [(19, 147), (999, 255)] {
        let dir = TestDir::new(&format!("hostile-signal-{signal}"));
        let root = dir.state_root();
        let config = hostile_config(&dir, &format!("wait-signal-{signal}"));
        let bundle = dir.path.join("bundle");
        std::fs::create_dir_all(&bundle).expect("mkdir bundle");
        write_bundle(&bundle, &default_spec(&["true"]));
        let mut run = std::process::Command::new(husk_bin())
            .arg("--root")
            .arg(&root)
            .args(["run", "-b", s(&bundle), "sig"])
            .env("HUSK_CONFIG", &config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawning husk run");
        let status = wait_never_stopped(&mut run, Duration::from_secs(120));
        assert_eq!(status.code(), Some(code), "signal {signal}: {status:?}");
        assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
    }
}

/// As conmon sees it: the container's pid (the shadow) of a process
/// "ended by SIGSTOP" exits with status 128+19; it is never stopped, so a
/// caller waiting for it gets a status.
#[test]
fn a_stop_signal_exit_gives_the_pid_file_process_a_status() {
    require_guest();
    become_subreaper();
    let dir = TestDir::new("hostile-signal-pid");
    let root = dir.state_root();
    let config = hostile_config(&dir, "wait-signal-19");
    let bundle = dir.path.join("bundle");
    std::fs::create_dir_all(&bundle).expect("mkdir bundle");
    write_bundle(&bundle, &default_spec(&["true"]));
    let pid_file = dir.path.join("pid");
    let env = [("HUSK_CONFIG", s(&config))];
    let out = husk_env(
        &root,
        &[
            "create",
            "-b",
            s(&bundle),
            "--pid-file",
            s(&pid_file),
            "sig",
        ],
        &env,
    );
    assert!(out.status.success(), "create: {}", stderr(&out));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let out = husk(&root, &["start", "sig"]);
    assert!(out.status.success(), "start: {}", stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let mut status = 0;
        // SAFETY: waitpid on the shadow this process adopted (subreaper);
        // status is written.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::WUNTRACED) };
        assert!(rc >= 0, "waitpid: {}", std::io::Error::last_os_error());
        if rc == pid {
            assert!(!libc::WIFSTOPPED(status), "the shadow {pid} stopped");
            break status;
        }
        assert!(Instant::now() < deadline, "the shadow {pid} still runs");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        libc::WIFEXITED(status),
        "the shadow ended by a signal: {status:x}"
    );
    assert_eq!(libc::WEXITSTATUS(status), 147);
    let st = husk(&root, &["state", "sig"]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("state JSON");
    assert_eq!(st["status"], "stopped");
    assert!(husk(&root, &["delete", "sig"]).status.success());
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// An exec refused with an error full of escape sequences: `husk exec`
/// says so on one printable line.
#[test]
fn escape_sequences_in_an_agent_error_never_reach_the_terminal() {
    require_guest();
    let dir = TestDir::new("hostile-exec");
    let root = dir.state_root();
    run_sleeper_under(&dir, "exec-escapes", "ex");
    let out = husk(&root, &["exec", "ex", "true"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "exec: {err}");
    assert!(
        err.contains("exec refused ?]0;pwned??[2J??31m?husk: forged end"),
        "{err:?}"
    );
    assert_clean_error_line(&err);
    assert!(husk(&root, &["delete", "--force", "ex"]).status.success());
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// `husk run -d` of a busybox sleeper `id` in `dir`'s state root, its
/// guest's agent making `attack`.
fn run_sleeper_under(dir: &TestDir, attack: &str, id: &str) {
    let config = hostile_config(dir, attack);
    let bundle = dir.path.join("bundle");
    std::fs::create_dir_all(&bundle).expect("mkdir bundle");
    write_bundle(&bundle, &default_spec(&["sleep", "600"]));
    let env = [("HUSK_CONFIG", s(&config))];
    let out = husk_env(
        &dir.state_root(),
        &["run", "-d", "-b", s(&bundle), id],
        &env,
    );
    assert!(out.status.success(), "{attack}: run: {}", stderr(&out));
}

/// `husk exec` of `script` with `bytes` bytes on its stdin, from a thread
/// that stops when husk stops taking them: its output and exit status,
/// with how long it took.
fn exec_with_stdin(
    root: &Path,
    id: &str,
    script: &str,
    bytes: usize,
) -> (std::process::Output, Duration) {
    use std::io::Write;
    let t0 = Instant::now();
    let mut exec = std::process::Command::new(husk_bin())
        .arg("--root")
        .arg(root)
        .args(["exec", id, "sh", "-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning husk exec");
    let mut stdin = exec.stdin.take().expect("stdin");
    // Ends with an error when husk closes its end: that is the point.
    let feeder = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            if stdin.write_all(&chunk[..n]).is_err() {
                return;
            }
            left -= n;
        }
    });
    let deadline = t0 + Duration::from_secs(60) + MARGIN;
    loop {
        if exec.try_wait().expect("waiting for husk exec").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = exec.kill();
            let _ = exec.wait();
            panic!("husk exec still runs after {:?}", t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = exec.wait_with_output().expect("husk exec output");
    let _ = feeder.join();
    (out, t0.elapsed())
}

/// A guest that lies in its stdin acknowledgements gains nothing: one that
/// acknowledges more than was ever sent has its stdin closed by the host
/// (the process sees EOF after at most one window), and one that never
/// acknowledges gets one window (192 KiB) and no more, while the exec it
/// belongs to still ends when its process does. Either way husk exec
/// returns the process's status, the host stays bounded, and delete leaves
/// nothing.
#[test]
fn lying_stdin_acknowledgements_stop_stdin_and_nothing_else() {
    require_guest();
    let sent = 4 << 20;
    let window = husk_protocol::STDIN_WINDOW as usize;
    for attack in ["stdin-ack-beyond", "stdin-ack-never"] {
        let dir = TestDir::new(&format!("hostile-{attack}"));
        let root = dir.state_root();
        run_sleeper_under(&dir, attack, "acks");
        // The guest acknowledges (or would) every 48 KiB; the host sends
        // at most a window ahead of the last acknowledgement it believes.
        let script = match attack {
            // Counts what arrives until the host closes stdin.
            "stdin-ack-beyond" => "wc -c",
            // Takes less than one window and ends: the exec must end too,
            // though the host's stdin pump still waits for a count.
            _ => "head -c 100000 | wc -c",
        };
        let (out, took) = exec_with_stdin(&root, "acks", script, sent);
        assert!(
            out.status.success(),
            "{attack}: exec after {took:?}: {:?} {}",
            out.status,
            stderr(&out)
        );
        let got: usize = stdout(&out)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{attack}: wc said {:?}", stdout(&out)));
        match attack {
            "stdin-ack-beyond" => assert!(
                got > 0 && got <= window,
                "{attack}: the process got {got} of {sent} bytes: the host went on after a \
                 count beyond what it sent (at most one window, {window}, may cross)"
            ),
            _ => assert_eq!(got, 100_000, "{attack}"),
        }
        // The sandbox still serves: a plain exec answers.
        let out = husk(&root, &["exec", "acks", "echo", "still"]);
        assert_eq!(stdout(&out).trim(), "still", "{attack}: {}", stderr(&out));
        let out = husk(&root, &["delete", "-f", "acks"]);
        assert!(out.status.success(), "{attack}: delete: {}", stderr(&out));
        assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
    }
}
