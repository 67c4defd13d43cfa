//! The OCI runtime spec applied by the agent inside real guests: pid
//! namespace, user namespace, seccomp, capabilities, rlimits, cgroup limits
//! (OOM, pids, device rules), readonly rootfs, oomScoreAdj, sysctl,
//! linux.devices, and bad specs that must fail `create` cleanly.

use husk_tests::*;
use std::path::{Path, PathBuf};

fn bundle_with(dir: &TestDir, name: &str, spec: serde_json::Value) -> PathBuf {
    require_guest();
    let b = dir.path.join(name);
    std::fs::create_dir_all(&b).expect("mkdir bundle");
    write_bundle(&b, &spec)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        stdout(out),
        stderr(out)
    );
}

/// `husk run` of `script` under `sh -c` with `edit` applied to the spec.
fn run_sh(
    dir: &TestDir,
    name: &str,
    script: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> std::process::Output {
    let mut spec = default_spec(&["sh", "-c", script]);
    edit(&mut spec);
    let b = bundle_with(dir, name, spec);
    husk(&dir.state_root(), &["run", "--bundle", s(&b), name])
}

#[test]
fn pid_namespace_hides_the_guest_processes() {
    let dir = TestDir::new("oci-pidns");
    let out = run_sh(
        &dir,
        "pidns",
        "echo pid=$$; ls /proc | grep -c '^[0-9]'; cat /proc/1/comm",
        |_| {},
    );
    ok(&out, "run");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    // PID 1 is the namespace's holder, the process PID 2.
    assert_eq!(lines.first(), Some(&"pid=2"), "{text}");
    // Only the holder, the shell, ls and grep are visible in its /proc.
    let count: u32 = lines
        .get(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(99);
    assert!(count <= 4, "the container sees other processes: {text}");
    assert_eq!(lines.get(2), Some(&"husk-pidns-init"), "{text}");
}

#[test]
fn seccomp_denies_with_the_configured_errno() {
    let dir = TestDir::new("oci-seccomp");
    let out = run_sh(
        &dir,
        "sec",
        "mkdir /tmp/denied; echo rc=$?; test -d /tmp/denied && echo exists; echo still-running",
        |spec| {
            spec["linux"]["seccomp"] = serde_json::json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [
                    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 95},
                    // An argument rule that never matches must not deny.
                    {"names": ["write"], "action": "SCMP_ACT_ERRNO",
                     "args": [{"index": 0, "value": 999, "op": "SCMP_CMP_EQ"}]}
                ]
            });
        },
    );
    ok(&out, "run");
    let text = stdout(&out);
    assert!(text.contains("rc=1"), "mkdir was not denied: {text}");
    assert!(!text.contains("exists"), "mkdir went through: {text}");
    assert!(text.contains("still-running"), "{text}");
    assert!(
        stderr(&out).to_lowercase().contains("not supported"),
        "wrong errno (want EOPNOTSUPP): {}",
        stderr(&out)
    );
}

#[test]
fn dropped_capabilities_are_gone() {
    let dir = TestDir::new("oci-caps");
    let out = run_sh(
        &dir,
        "caps",
        "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status",
        |spec| {
            let set = serde_json::json!(["CAP_CHOWN", "CAP_KILL"]);
            spec["process"]["capabilities"] = serde_json::json!({
                "bounding": set, "effective": set, "permitted": set,
                "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]
            });
            // Ambient capabilities need privileges to be kept across exec.
            spec["process"]["noNewPrivileges"] = serde_json::json!(false);
        },
    );
    ok(&out, "run");
    let text = stdout(&out);
    // CAP_CHOWN = bit 0, CAP_KILL = bit 5 (linux/capability.h). Written
    // out, not taken from the `caps` crate the agent maps names with: the
    // kernel's view is checked against the header, not against the
    // agent's own table.
    for (set, mask) in [
        ("CapBnd", "0000000000000021"),
        ("CapEff", "0000000000000021"),
        ("CapPrm", "0000000000000021"),
        ("CapInh", "0000000000000020"),
        ("CapAmb", "0000000000000020"),
    ] {
        assert!(
            text.contains(&format!("{set}:\t{mask}")),
            "{set} is not {mask}: {text}"
        );
    }
}

#[test]
fn rlimits_oom_score_adj_and_sysctl_are_applied() {
    let dir = TestDir::new("oci-rlimits");
    let out = run_sh(
        &dir,
        "rl",
        "ulimit -n; ulimit -Hn; cat /proc/self/oom_score_adj; cat /proc/sys/net/ipv4/ip_forward; domainname 2>/dev/null || cat /proc/sys/kernel/domainname",
        |spec| {
            spec["process"]["rlimits"] =
                serde_json::json!([{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}]);
            spec["process"]["oomScoreAdj"] = serde_json::json!(500);
            spec["linux"]["sysctl"] = serde_json::json!({"net.ipv4.ip_forward": "1"});
            spec["domainname"] = serde_json::json!("husk.example");
        },
    );
    ok(&out, "run");
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(
        lines,
        ["123", "456", "500", "1", "husk.example"],
        "stderr: {}",
        stderr(&out)
    );
}

#[test]
fn readonly_rootfs_refuses_writes_and_devices_are_created() {
    let dir = TestDir::new("oci-rootfs");
    let out = run_sh(
        &dir,
        "ro",
        "touch /x 2>/dev/null && echo wrote; stat -c '%t:%T %a %u' /dev/husk-null",
        |spec| {
            spec["root"]["readonly"] = serde_json::json!(true);
            spec["linux"]["devices"] = serde_json::json!([
                {"path": "/dev/husk-null", "type": "c", "major": 1, "minor": 3,
                 "fileMode": 0o640, "uid": 7, "gid": 7}
            ]);
        },
    );
    ok(&out, "run");
    let text = stdout(&out);
    assert!(!text.contains("wrote"), "the readonly rootfs took a write");
    assert!(
        text.contains("1:3 640 7"),
        "device not as configured: {text}"
    );
}

#[test]
fn memory_limit_oom_kills_the_process_with_137() {
    let dir = TestDir::new("oci-oom");
    // tail keeps the whole newline-free input in memory.
    let out = run_sh(&dir, "oom", "tail /dev/zero", |spec| {
        spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": 16 * 1024 * 1024}});
    });
    assert_eq!(
        out.status.code(),
        Some(137),
        "not OOM-killed: {}",
        stderr(&out)
    );
}

/// An OOM kill of a process that is not the container's init: the
/// container keeps running and `husk events` reports `{"type": "oom"}`,
/// as runc does.
#[test]
fn oom_kill_inside_a_running_container_is_an_oom_event() {
    let dir = TestDir::new("oci-oomev");
    let root = dir.state_root();
    let mut spec = default_spec(&["sh", "-c", "sleep 3; tail /dev/zero; sleep 600"]);
    spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": 16 * 1024 * 1024}});
    let b = bundle_with(&dir, "b", spec);
    ok(&husk(&root, &["run", "-d", "-b", s(&b), "oomev"]), "run -d");
    let events_out = dir.path.join("events.out");
    let file = std::fs::File::create(&events_out).expect("events file");
    let mut events = std::process::Command::new(husk_bin())
        .args(["--root", s(&root), "events", "--interval", "0.3s", "oomev"])
        .stdout(file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("husk events");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut text = String::new();
    while std::time::Instant::now() < deadline {
        text = std::fs::read_to_string(&events_out).unwrap_or_default();
        if text.contains("\"oom\"") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let st = husk(&root, &["state", "oomev"]);
    ok(&husk(&root, &["delete", "--force", "oomev"]), "delete");
    let _ = events.kill();
    let _ = events.wait();
    let oom = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["type"] == "oom");
    assert!(
        oom.is_some_and(|e| e["id"] == "oomev"),
        "no oom event: {text}"
    );
    assert!(stdout(&st).contains("\"running\""), "{}", stdout(&st));
    assert!(leftovers_settled(&dir.path, &root).is_empty());
}

#[test]
fn crashes_and_fork_bombs_leave_the_agent_serving() {
    become_subreaper();
    let dir = TestDir::new("oci-robust");
    let root = dir.state_root();
    let mut spec = default_spec(&["sleep", "600"]);
    spec["linux"]["resources"] = serde_json::json!({"pids": {"limit": 8}});
    let b = bundle_with(&dir, "b", spec);
    ok(&husk(&root, &["run", "-d", "-b", s(&b), "rb"]), "run -d");
    // A crash.
    let crash = husk(&root, &["exec", "rb", "sh", "-c", "kill -SEGV $$"]);
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            crash.status.code() == Some(139) || crash.status.signal() == Some(libc::SIGSEGV),
            "exec of a crashing process: {:?} {}",
            crash.status,
            stderr(&crash)
        );
    }
    // A fork bomb stopped by pids.max.
    let bomb = husk(
        &root,
        &[
            "exec",
            "rb",
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do sleep 30 & done 2>/dev/null; echo spawned",
        ],
    );
    assert!(stdout(&bomb).contains("spawned") || !bomb.status.success());
    // The agent still answers, and the container's init is still there.
    let alive = husk(&root, &["exec", "rb", "sh", "-c", "echo alive"]);
    // With the pids limit reached the exec itself may be refused; the
    // agent must still answer either way.
    assert!(
        stdout(&alive).contains("alive") || stderr(&alive).contains("cgroup"),
        "agent did not answer: {}{}",
        stdout(&alive),
        stderr(&alive)
    );
    let st = husk(&root, &["state", "rb"]);
    ok(&st, "state");
    assert!(stdout(&st).contains("running"), "{}", stdout(&st));
    ok(&husk(&root, &["delete", "--force", "rb"]), "delete");
    assert!(leftovers_settled(&dir.path, &root).is_empty());
}

/// A change to a test's spec.
type SpecEdit = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
fn bad_specs_fail_create_naming_the_field_and_clean_up() {
    let dir = TestDir::new("oci-bad");
    let root = dir.state_root();
    let mounts = default_spec(&["true"])["mounts"]
        .as_array()
        .map_or(0, Vec::len);
    let missing_mount = format!("mounts[{mounts}] (/data): bind source /nonexistent/husk-source");
    let cases: Vec<(&str, SpecEdit, &str)> = vec![
        (
            "mnt",
            Box::new(|spec: &mut serde_json::Value| {
                if let Some(m) = spec["mounts"].as_array_mut() {
                    m.push(serde_json::json!({"destination": "/data", "type": "bind",
                        "source": "/nonexistent/husk-source", "options": ["rbind"]}))
                }
            }),
            // The host runtime checks host bind sources before the VM starts.
            &missing_mount,
        ),
        (
            "ns",
            Box::new(|spec: &mut serde_json::Value| {
                if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
                    ns.push(serde_json::json!({"type": "bogus"}));
                }
            }),
            "].type: unknown variant `bogus`",
        ),
        (
            "sec",
            Box::new(|spec: &mut serde_json::Value| {
                spec["linux"]["seccomp"] = serde_json::json!({"defaultAction": "SCMP_ACT_NOTIFY"});
            }),
            "seccomp",
        ),
        (
            "sysctl",
            Box::new(|spec: &mut serde_json::Value| {
                spec["linux"]["sysctl"] = serde_json::json!({"kernel.no_such_sysctl": "1"});
            }),
            "sysctl",
        ),
        (
            // Mappings without a user namespace in linux.namespaces.
            "idmap",
            Box::new(|spec: &mut serde_json::Value| {
                let map = serde_json::json!([{"containerID": 0, "hostID": 1000, "size": 65536}]);
                spec["linux"]["uidMappings"] = map.clone();
                spec["linux"]["gidMappings"] = map;
            }),
            "linux.uidMappings",
        ),
    ];
    for (name, edit, field) in cases {
        let mut spec = default_spec(&["true"]);
        edit(&mut spec);
        let b = bundle_with(&dir, name, spec);
        let out = husk(&root, &["create", "--bundle", s(&b), name]);
        assert!(!out.status.success(), "{name}: create succeeded");
        assert!(
            stderr(&out).contains(field),
            "{name}: error does not name {field}: {}",
            stderr(&out)
        );
        let st = husk(&root, &["state", name]);
        assert!(!st.status.success(), "{name}: container left behind");
    }
    assert!(leftovers_settled(&dir.path, &root).is_empty());
}

/// The words of each line, so `/proc/self/uid_map`'s column padding does
/// not matter.
fn words(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn owner(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.uid(), m.gid())
}

#[test]
fn user_namespace_maps_ids_for_the_container_and_its_execs() {
    become_subreaper();
    let dir = TestDir::new("oci-userns");
    let root = dir.state_root();
    // A host directory the container's root (host uid 1000) may write to.
    let data = dir.path.join("data");
    std::fs::create_dir_all(&data).expect("mkdir data");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777))
            .expect("chmod data");
    }
    // What the init sees goes to a file on the host (written as the
    // container's root, so its owner is checked too); then it stays up
    // for an exec. Mounts, devices (bound, not made: no mknod in a user
    // namespace), sysctl and hostname must still work.
    let script = "{ cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; \
                  cat /proc/sys/net/ipv4/ip_forward; hostname; \
                  echo x > /dev/null && echo null-ok; head -c 3 /dev/zero | wc -c; \
                  stat -c '%t:%T %a %u' /dev/husk-null; echo end; } > /data/init-view 2>&1; \
                  exec sleep 600";
    let mut spec = default_spec(&["sh", "-c", script]);
    let map = serde_json::json!([{"containerID": 0, "hostID": 1000, "size": 65536}]);
    spec["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces")
        .push(serde_json::json!({"type": "user"}));
    spec["linux"]["uidMappings"] = map.clone();
    spec["linux"]["gidMappings"] = map;
    spec["linux"]["sysctl"] = serde_json::json!({"net.ipv4.ip_forward": "1"});
    spec["linux"]["devices"] = serde_json::json!([
        {"path": "/dev/husk-null", "type": "c", "major": 1, "minor": 3,
         "fileMode": 0o640, "uid": 7, "gid": 7}
    ]);
    spec["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(serde_json::json!({"destination": "/data", "type": "bind",
            "source": s(&data), "options": ["rbind", "rw"]}));
    let b = bundle_with(&dir, "b", spec);
    ok(&husk(&root, &["run", "-d", "-b", s(&b), "uns"]), "run -d");

    let view = data.join("init-view");
    let mut text = String::new();
    for _ in 0..600 {
        text = std::fs::read_to_string(&view).unwrap_or_default();
        if text.contains("end") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        words(&text),
        [
            "0 1000 65536",
            "0 1000 65536",
            "0",
            "0",
            "1",
            "husk-test",
            "null-ok",
            "3",
            "1:3 640 7",
            "end"
        ],
        "the init's view: {text}"
    );
    // Root in the container is uid/gid 1000 outside.
    assert_eq!(owner(&view), (1000, 1000));

    let exec = husk(
        &root,
        &[
            "exec",
            "uns",
            "sh",
            "-c",
            "cat /proc/self/uid_map /proc/self/gid_map; id -u; touch /data/from-exec",
        ],
    );
    ok(&exec, "exec");
    assert_eq!(
        words(&stdout(&exec)),
        ["0 1000 65536", "0 1000 65536", "0"],
        "the exec's view"
    );
    assert_eq!(owner(&data.join("from-exec")), (1000, 1000));

    ok(&husk(&root, &["delete", "--force", "uns"]), "delete");
    assert!(leftovers_settled(&dir.path, &root).is_empty());
}

/// runc's default allow-list, as docker and containerd spell it out after
/// a deny-all.
fn runc_default_device_rules() -> Vec<serde_json::Value> {
    let mut rules = vec![
        serde_json::json!({"allow": true, "type": "c", "access": "m"}),
        serde_json::json!({"allow": true, "type": "b", "access": "m"}),
        serde_json::json!({"allow": true, "type": "c", "major": 136, "access": "rwm"}),
    ];
    for (major, minor) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 2),
        (10, 200),
    ] {
        rules.push(
            serde_json::json!({"allow": true, "type": "c", "major": major,
            "minor": minor, "access": "rwm"}),
        );
    }
    rules
}

#[test]
fn device_cgroup_rules_deny_and_narrow_access() {
    become_subreaper();
    let dir = TestDir::new("oci-devcg");
    let root = dir.state_root();
    let out = run_sh(
        &dir,
        "devcg",
        "head -c 1 /dev/zero; echo zero=$?; echo x > /dev/null && echo null-ok; \
         head -c 1 /dev/husk-kmsg | wc -c; echo x > /dev/husk-kmsg; echo kmsg=$?; \
         head -c 1 /dev/husk-port; echo port=$?",
        |spec| {
            // Deny all, the usual allow-list, then /dev/zero denied and
            // /dev/kmsg (not in the list) allowed for reading only.
            let mut rules = vec![serde_json::json!({"allow": false, "access": "rwm"})];
            rules.extend(runc_default_device_rules());
            rules.push(serde_json::json!({"allow": false, "type": "c", "major": 1,
                "minor": 5, "access": "rwm"}));
            rules.push(serde_json::json!({"allow": true, "type": "c", "major": 1,
                "minor": 11, "access": "r"}));
            spec["linux"]["resources"] = serde_json::json!({"devices": rules});
            // Nodes outside the allow-list: /dev/kmsg's and /dev/port's numbers.
            spec["linux"]["devices"] = serde_json::json!([
                {"path": "/dev/husk-kmsg", "type": "c", "major": 1, "minor": 11},
                {"path": "/dev/husk-port", "type": "c", "major": 1, "minor": 4}
            ]);
        },
    );
    ok(&out, "run");
    let (text, err) = (stdout(&out), stderr(&out));
    assert_eq!(
        text.lines().map(str::trim).collect::<Vec<_>>(),
        ["zero=1", "null-ok", "1", "kmsg=1", "port=1"],
        "stderr: {err}"
    );
    for node in ["/dev/zero", "/dev/husk-kmsg", "/dev/husk-port"] {
        assert!(
            err.lines()
                .any(|l| l.contains(node) && l.contains("Operation not permitted")),
            "{node} was not refused by the device cgroup: {err}"
        );
    }

    // An update swaps the filter of a running container: without a
    // deny-all, the rules refine the default list.
    let b = bundle_with(&dir, "upd", default_spec(&["sleep", "600"]));
    ok(&husk(&root, &["run", "-d", "-b", s(&b), "upd"]), "run -d");
    let probe = "echo x > /dev/null && echo write-ok; cat /dev/null && echo read-ok";
    let before = husk(&root, &["exec", "upd", "sh", "-c", probe]);
    assert_eq!(
        stdout(&before),
        "write-ok\nread-ok\n",
        "{}",
        stderr(&before)
    );
    let resources = dir.path.join("resources.json");
    std::fs::write(
        &resources,
        r#"{"devices": [{"allow": false, "type": "c", "major": 1, "minor": 3, "access": "w"}]}"#,
    )
    .expect("write resources.json");
    ok(
        &husk(&root, &["update", "-r", s(&resources), "upd"]),
        "update",
    );
    let after = husk(&root, &["exec", "upd", "sh", "-c", probe]);
    assert_eq!(stdout(&after), "read-ok\n", "{}", stderr(&after));
    assert!(
        stderr(&after).contains("Operation not permitted"),
        "{}",
        stderr(&after)
    );
    ok(&husk(&root, &["delete", "--force", "upd"]), "delete");
    assert!(leftovers_settled(&dir.path, &root).is_empty());
}

/// A time namespace with a boottime offset: the container (and a process
/// exec'd into it) sees the shifted uptime, the guest does not; offsets
/// without a time namespace are refused naming the field.
#[test]
fn time_namespace_shifts_the_container_clocks() {
    let dir = TestDir::new("oci-timens");
    let root = dir.state_root();
    const TEN_DAYS: u64 = 10 * 86_400;
    let mut spec = default_spec(&["sleep", "600"]);
    if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
        ns.push(serde_json::json!({"type": "time"}));
    }
    spec["linux"]["timeOffsets"] = serde_json::json!({
        "boottime": {"secs": TEN_DAYS, "nanosecs": 0},
        "monotonic": {"secs": TEN_DAYS, "nanosecs": 0}
    });
    let b = bundle_with(&dir, "t", spec.clone());
    ok(
        &husk(&root, &["run", "-d", "-b", s(&b), "timens"]),
        "run -d",
    );
    let uptime = |out: &std::process::Output| -> f64 {
        stdout(out)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no uptime: {}{}", stdout(out), stderr(out)))
    };
    // The exec joins the container's time namespace.
    let inside = husk(&root, &["exec", "timens", "cat", "/proc/uptime"]);
    ok(&inside, "exec");
    let shifted = uptime(&inside);
    assert!(
        shifted >= TEN_DAYS as f64 && shifted < TEN_DAYS as f64 + 3600.0,
        "uptime in the container: {shifted}"
    );
    ok(&husk(&root, &["delete", "--force", "timens"]), "delete");

    // The same clocks without the namespace: the guest's own uptime.
    let mut plain = default_spec(&["cat", "/proc/uptime"]);
    plain["linux"]["namespaces"] = spec["linux"]["namespaces"].clone();
    if let Some(ns) = plain["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "time");
    }
    let b = bundle_with(&dir, "plain", plain.clone());
    let out = husk(&root, &["run", "-b", s(&b), "plainclock"]);
    ok(&out, "run");
    assert!(uptime(&out) < 3600.0, "guest uptime {}", uptime(&out));

    // Offsets need a new time namespace.
    plain["linux"]["timeOffsets"] = spec["linux"]["timeOffsets"].clone();
    let b = bundle_with(&dir, "bad", plain);
    let out = husk(&root, &["create", "-b", s(&b), "badtime"]);
    assert!(!out.status.success(), "create succeeded");
    assert!(
        stderr(&out).contains("linux.timeOffsets"),
        "{}",
        stderr(&out)
    );
    assert!(leftovers_settled(&dir.path, &root).is_empty());
}
