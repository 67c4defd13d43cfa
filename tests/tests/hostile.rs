//! A hostile guest gains nothing on the host. Each test runs, in a real
//! microVM, what an attacker with root in the guest does (a privileged
//! container: every capability, no seccomp, so it can mount the virtio-fs
//! device itself and remount its volumes), then checks the outcome from the
//! host.

use husk_tests::*;
use std::path::Path;

const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_ADMIN",
    "CAP_SYS_RESOURCE",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
];

fn privileged_spec(script: &str) -> serde_json::Value {
    let mut spec = default_spec(&["sh", "-c", script]);
    let caps = serde_json::json!(ALL_CAPS);
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
/// node on host storage. Every attempt is refused by the host, and the host
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
    assert_eq!(text.matches("refused:").count(), 9, "{text}");
    assert!(
        text.contains("rw volume: written") && text.contains("rootfs: written"),
        "{text}"
    );

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
/// nodev; a `ro` volume is read-only on the host itself.
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

/// The device helpers of a running sandbox run under their own filters, as
/// docs/security.md says: QEMU under its seccomp sandbox, virtiofsd's
/// serving process under its seccomp filter, in a mount namespace of its
/// own, without the capabilities to make device nodes or set file
/// capabilities; the vsock backend jailed: an unprivileged uid of the
/// jail range, no capabilities, no_new_privs, the spawner's seccomp filter,
/// its socket directory handed back to root once its sockets exist.
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

/// Guest root floods the serial console for a minute. The console log on
/// the host stays under its cap (1 MiB, plus one 64 KiB chunk, in each of
/// console.log and console.log.1), the sandbox's owner (the monitor) stays
/// under a fixed memory bound, and another sandbox is created, runs and
/// answers meanwhile.
#[test]
fn a_console_flood_is_capped_and_other_sandboxes_keep_working() {
    require_guest();
    let dir = TestDir::new("hostile-flood");
    let root = dir.state_root();
    // The guest's console is ttyS0 (4:64): guest root makes the node and
    // writes to it without end.
    let script = "mknod /dev/ttyS0 c 4 64 && while :; do cat /bin/busybox > /dev/ttyS0; done";
    let flood = dir.path.join("flood");
    std::fs::create_dir_all(&flood).expect("mkdir");
    write_bundle(&flood, &privileged_spec(script));
    let out = husk(&root, &["run", "-d", "-b", s(&flood), "flood"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sandbox = husk_runtime::sandbox::sandbox_dir(&root.join("sandbox"), "flood");
    let console = sandbox.join("console.log");
    let rotated = sandbox.join("console.log.1");
    let monitor = pid_of(&dir.path, "__monitor").expect("the flood's monitor");
    let cap = husk_runtime::console::CONSOLE_CAP + (64 << 10);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);

    let quiet = dir.path.join("quiet");
    std::fs::create_dir_all(&quiet).expect("mkdir");
    write_bundle(&quiet, &default_spec(&["echo", "still here"]));

    let start = std::time::Instant::now();
    let (mut max_rss, mut max_log, mut runs) = (0, 0, 0);
    while start.elapsed() < std::time::Duration::from_secs(60) {
        max_rss = max_rss.max(rss_kib(monitor));
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
    assert!(husk(&root, &["delete", "--force", "flood"])
        .status
        .success());
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}
