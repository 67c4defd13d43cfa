//! The warm pool (`husk pool serve`), with real microVMs: a pooled sandbox
//! serves one container and is never offered again; a spec of another size
//! cold-boots; the service's death takes no running container and leaves
//! no idle VM; an idle VM that died is replaced, never handed out; a bad
//! pool configuration is refused. Every test leaves nothing behind.

use husk_tests::pool::{TestPool, DEFAULT_CLASS};
use husk_tests::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// Runs husk with the pool's configuration.
fn husk_pool(pool: &TestPool, root: &Path, args: &[&str]) -> std::process::Output {
    let env = pool.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    husk_env(root, args, &env)
}

fn bundle(dir: &TestDir, name: &str, spec: serde_json::Value) -> PathBuf {
    let b = dir.path.join(name);
    std::fs::create_dir_all(&b).expect("mkdir bundle");
    write_bundle(&b, &spec)
}

/// The guest's boot id, read by an exec: each VM boot draws its own.
fn boot_id(pool: &TestPool, root: &Path, id: &str) -> String {
    let out = husk_pool(
        pool,
        root,
        &["exec", id, "cat", "/proc/sys/kernel/random/boot_id"],
    );
    ok(&out, "exec cat boot_id");
    let b = stdout(&out).trim().to_string();
    assert_eq!(b.len(), 36, "a boot id: {b:?}");
    b
}

/// Live processes whose command line names `what`.
fn processes_with(what: &str) -> Vec<String> {
    processes_naming(what)
        .into_iter()
        .map(|(pid, cmd)| format!("{pid}: {cmd}"))
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_nothing_left(dir: &TestDir, root: &Path, pool_dir: &Path) {
    let left = leftovers_settled(&dir.path, root);
    assert!(left.is_empty(), "left behind: {left:#?}");
    // The pool's directory holds no sandbox, keeper or socket.
    let mut files = Vec::new();
    if let Ok(classes) = std::fs::read_dir(pool_dir) {
        for class in classes.flatten().filter(|c| c.path().is_dir()) {
            for sub in ["vms", "keepers", "idle", "claimed", "retired"] {
                for e in std::fs::read_dir(class.path().join(sub))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    files.push(e.path().display().to_string());
                }
            }
        }
    }
    assert!(files.is_empty(), "left in the pool: {files:#?}");
}

#[test]
fn a_pooled_sandbox_serves_one_container_and_never_returns_to_the_pool() {
    let dir = TestDir::new("pool-once");
    let root = dir.state_root();
    let mut pool = TestPool::start(&dir.path, &[DEFAULT_CLASS]);
    let cg = format!("/husk-test-{}/pool-once", std::process::id());
    let mut spec = default_spec(&["sleep", "600"]);
    spec["linux"]["cgroupsPath"] = serde_json::json!(cg);
    let b = bundle(&dir, "b", spec);
    // The second container: a cgroup of its own.
    let mut spec2 = default_spec(&["sleep", "600"]);
    spec2["linux"]["cgroupsPath"] = serde_json::json!(format!("{cg}-2"));
    let b2 = bundle(&dir, "b2", spec2);

    let first = pool.idle_ids();
    assert_eq!(first.len(), 1, "one idle sandbox: {first:?}");
    ok(
        &husk_pool(&pool, &root, &["run", "-d", "-b", s(&b), "one"]),
        "run one",
    );
    assert_eq!(
        pool.claimed_ids(),
        first,
        "the first container took the idle one"
    );
    assert!(!pool.idle_ids().contains(&first[0]));
    // Its host processes moved into the container's cgroup, keeper included.
    let qemu = pid_of(&dir.path, "qemu-system").expect("no qemu process");
    // The keeper, still the VMM's parent.
    let keeper: i32 = proc_status(qemu)
        .get("PPid")
        .and_then(|p| p.parse().ok())
        .expect("the VMM's parent");
    let keeper_cmd = std::fs::read(format!("/proc/{keeper}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&keeper_cmd).contains("pool\0keep"),
        "the VMM's parent is not its keeper"
    );
    for name in ["qemu-system", "virtiofsd", "vhost-device-vsock", "keeper"] {
        let pid = match name {
            "keeper" => keeper,
            _ => pid_of(&dir.path, name).unwrap_or_else(|| panic!("no {name} process")),
        };
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(
            cgroups.lines().any(|l| l.ends_with(&cg)),
            "{name} is not in {cg}: {cgroups}"
        );
    }
    let one = boot_id(&pool, &root, "one");

    // The service boots a replacement; the second container gets it.
    pool.wait_idle(1, Duration::from_secs(120));
    let second = pool.idle_ids();
    assert_eq!(second.len(), 1);
    assert_ne!(second, first, "a new sandbox, not the claimed one back");
    ok(
        &husk_pool(&pool, &root, &["run", "-d", "-b", s(&b2), "two"]),
        "run two",
    );
    let two = boot_id(&pool, &root, "two");
    assert_ne!(one, two, "two containers, two VMs, two boots");
    let mut claimed = pool.claimed_ids();
    claimed.sort();
    let mut both = vec![first[0].clone(), second[0].clone()];
    both.sort();
    assert_eq!(claimed, both);

    // Deleting the first ends its VM: gone, not back in the pool.
    ok(
        &husk_pool(&pool, &root, &["kill", "one", "KILL"]),
        "kill one",
    );
    ok(
        &husk_pool(&pool, &root, &["delete", "-f", "one"]),
        "delete one",
    );
    let vm_dir = pool.class_dir().join("vms").join(&first[0]);
    wait_until(
        "the first VM's processes end",
        Duration::from_secs(10),
        || processes_with(s(&vm_dir)).is_empty(),
    );
    assert!(!vm_dir.exists(), "{} is left", vm_dir.display());
    pool.wait_idle(1, Duration::from_secs(120));
    assert!(!pool.idle_ids().contains(&first[0]));
    assert!(!pool.claimed_ids().contains(&first[0]));
    assert_eq!(
        boot_id(&pool, &root, "two"),
        two,
        "the other container is untouched"
    );
    ok(
        &husk_pool(&pool, &root, &["delete", "-f", "two"]),
        "delete two",
    );
    pool.stop();
    assert_nothing_left(&dir, &root, &pool.pool_dir);
    for cg in [cg.clone(), format!("{cg}-2")] {
        assert!(
            host_cgroup_file(&cg, "cgroup.procs").is_none(),
            "the host cgroup {cg} is left"
        );
    }
}

#[test]
fn a_spec_that_fits_no_class_cold_boots() {
    let dir = TestDir::new("pool-nofit");
    let root = dir.state_root();
    let mut pool = TestPool::start(&dir.path, &[DEFAULT_CLASS]);
    let idle = pool.idle_ids();
    // 256 MiB plus the guest overhead: not the pool's 128 MiB class.
    let mut spec = default_spec(&["sleep", "600"]);
    spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": 256u64 << 20}});
    let b = bundle(&dir, "b", spec);
    ok(
        &husk_pool(&pool, &root, &["run", "-d", "-b", s(&b), "big"]),
        "run big",
    );
    assert_eq!(pool.idle_ids(), idle, "the pooled sandbox is still idle");
    assert!(pool.claimed_ids().is_empty());
    // Its own VM, booted for it in its own directory (a tmpfs of its own).
    let own = husk_runtime::sandbox::sandbox_dir(&root.join("sandbox"), "big");
    let qemu = processes_with(s(&own));
    assert!(
        qemu.iter().any(|p| p.contains("qemu-system")),
        "no VM booted in {}: {qemu:?}",
        own.display()
    );
    let out = husk_pool(
        &pool,
        &root,
        &["exec", "big", "sh", "-c", "grep MemTotal /proc/meminfo"],
    );
    ok(&out, "exec");
    let kib: u64 = stdout(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        kib > 200 * 1024,
        "a VM sized for 256 MiB, not 128: {kib} KiB"
    );
    ok(&husk_pool(&pool, &root, &["delete", "-f", "big"]), "delete");
    pool.stop();
    assert_nothing_left(&dir, &root, &pool.pool_dir);
}

#[test]
fn killing_the_service_keeps_claimed_containers_and_leaves_no_idle_vm() {
    let dir = TestDir::new("pool-kill");
    let root = dir.state_root();
    let mut pool = TestPool::start(&dir.path, &[DEFAULT_CLASS]);
    let b = bundle(&dir, "b", default_spec(&["sleep", "600"]));
    ok(
        &husk_pool(&pool, &root, &["run", "-d", "-b", s(&b), "kept"]),
        "run",
    );
    let claimed = pool.claimed_ids();
    assert_eq!(claimed.len(), 1);
    pool.wait_idle(1, Duration::from_secs(120));
    let idle = pool.idle_ids();
    let vms = pool.class_dir().join("vms");
    pool.kill_service();
    // The idle keeper sees the service die and tears its VM down.
    let idle_vm = vms.join(&idle[0]);
    wait_until("the idle VM ends", Duration::from_secs(30), || {
        processes_with(s(&idle_vm)).is_empty() && !idle_vm.exists()
    });
    assert!(pool.idle_ids().is_empty());
    // The claimed one runs on, and still takes commands.
    let claimed_vm = vms.join(&claimed[0]);
    assert!(
        processes_with(s(&claimed_vm))
            .iter()
            .any(|p| p.contains("qemu-system")),
        "the claimed VM died with the service"
    );
    let st = husk(&root, &["state", "kept"]);
    ok(&st, "state");
    assert!(stdout(&st).contains("\"running\""), "{}", stdout(&st));
    let out = husk(&root, &["exec", "kept", "echo", "still-here"]);
    ok(&out, "exec");
    assert_eq!(stdout(&out).trim(), "still-here");
    ok(&husk(&root, &["delete", "-f", "kept"]), "delete");
    assert_nothing_left(&dir, &root, &pool.pool_dir);
}

#[test]
fn an_idle_vm_that_died_is_replaced_and_never_handed_out() {
    let dir = TestDir::new("pool-died");
    let root = dir.state_root();
    let mut pool = TestPool::start(&dir.path, &[DEFAULT_CLASS]);
    let dead = pool.idle_ids();
    let vm_dir = pool.class_dir().join("vms").join(&dead[0]);
    let qemu: Vec<i32> = processes_naming(s(&vm_dir))
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(qemu.len(), 1, "the idle sandbox's VMM");
    // SAFETY: kill(2) on the pid just read from /proc.
    unsafe { libc::kill(qemu[0], libc::SIGKILL) };
    wait_until(
        "the dead sandbox is torn down",
        Duration::from_secs(30),
        || !vm_dir.exists() && !pool.idle_ids().contains(&dead[0]),
    );
    pool.wait_idle(1, Duration::from_secs(120));
    let fresh = pool.idle_ids();
    assert_ne!(fresh, dead);
    let b = bundle(&dir, "b", default_spec(&["sleep", "600"]));
    ok(
        &husk_pool(&pool, &root, &["run", "-d", "-b", s(&b), "live"]),
        "run",
    );
    assert_eq!(pool.claimed_ids(), fresh, "the replacement was handed out");
    let out = husk_pool(&pool, &root, &["exec", "live", "echo", "alive"]);
    ok(&out, "exec");
    assert_eq!(stdout(&out).trim(), "alive");
    ok(
        &husk_pool(&pool, &root, &["delete", "-f", "live"]),
        "delete",
    );
    pool.stop();
    assert_nothing_left(&dir, &root, &pool.pool_dir);
}

#[test]
fn a_bad_pool_configuration_is_refused_naming_what_is_wrong() {
    let dir = TestDir::new("pool-bad");
    for (extra, classes, words) in [
        ("", vec![(1, 128, 0)], "pool_size 0"),
        ("", vec![(100_000, 128, 1)], "vcpus 100000: this host has"),
        (
            "",
            vec![(1, 1 << 30, 1)],
            "memory_mib 1073741824: this host has",
        ),
        ("", vec![], "no [[pool]] entry"),
        (
            "[[pool]]\nvcpus = 1\nmemory_mib = 128\npool_size = 1\nsize = 2\n",
            vec![],
            "unknown field `size`",
        ),
    ] {
        let (config, pool_dir) = husk_tests::pool::write_config(&dir.path, &classes, extra);
        let out = std::process::Command::new(husk_bin())
            .args(["pool", "serve"])
            .env("HUSK_CONFIG", &config)
            .output()
            .expect("husk pool serve");
        assert!(!out.status.success(), "{extra}{classes:?}: accepted");
        let err = stderr(&out);
        assert!(err.contains(words), "{classes:?}: {err}");
        assert!(!pool_dir.exists(), "{} was made", pool_dir.display());
        // The status reads the same configuration, and refuses it alike.
        if !classes.is_empty() || !extra.is_empty() {
            let out = std::process::Command::new(husk_bin())
                .args(["pool", "status"])
                .env("HUSK_CONFIG", &config)
                .output()
                .expect("husk pool status");
            assert!(!out.status.success(), "status accepted {classes:?}");
            assert!(stderr(&out).contains(words), "{}", stderr(&out));
        }
    }
    let left = leftovers_settled(&dir.path, &dir.state_root());
    assert!(left.is_empty(), "left behind: {left:#?}");
}
