//! The runc-compatible CLI, driving real microVMs: the lifecycle, exit
//! statuses through state.pid, stdio, the console socket, exec, pause,
//! hooks, host bind mounts, scale and bad input.

use husk_tests::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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

fn state(root: &Path, id: &str) -> serde_json::Value {
    let out = husk(root, &["state", id]);
    ok(&out, "husk state");
    serde_json::from_slice(&out.stdout).expect("state JSON")
}

#[test]
fn lifecycle_create_start_state_kill_delete() {
    // PID 1 of a pid namespace ignores signals it has no handler for (as
    // under runc): the process handles TERM by dying of it.
    become_subreaper();
    let dir = TestDir::new("lifecycle");
    let root = dir.state_root();
    let b = bundle_with(
        &dir,
        "b",
        default_spec(&[
            "sh",
            "-c",
            "trap 'trap - TERM; kill -TERM $$' TERM; sleep 600 & wait",
        ]),
    );
    let pid_file = dir.path.join("pid");
    let out = husk(
        &root,
        &[
            "create",
            "--bundle",
            s(&b),
            "--pid-file",
            s(&pid_file),
            "lc",
        ],
    );
    ok(&out, "create");
    let st = state(&root, "lc");
    assert_eq!(st["status"], "created");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(st["pid"], pid);
    assert_eq!(st["id"], "lc");
    ok(&husk(&root, &["start", "lc"]), "start");
    assert_eq!(state(&root, "lc")["status"], "running");
    let list = husk(&root, &["list", "--format", "json"]);
    ok(&list, "list");
    assert!(stdout(&list).contains("\"lc\""));
    let del = husk(&root, &["delete", "lc"]);
    assert!(
        !del.status.success(),
        "delete of a running container must fail"
    );
    ok(&husk(&root, &["kill", "lc", "TERM"]), "kill");
    assert_eq!(
        wait_pid(pid),
        (None, Some(libc::SIGTERM)),
        "state.pid must die as the container did"
    );
    assert_eq!(state(&root, "lc")["status"], "stopped");
    let again = husk(&root, &["kill", "lc", "KILL"]);
    assert!(
        !again.status.success(),
        "kill of a stopped container must fail"
    );
    ok(&husk(&root, &["delete", "lc"]), "delete");
    assert!(!husk(&root, &["state", "lc"]).status.success());
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

#[test]
fn exit_code_and_signal_deaths_come_through_the_pid() {
    become_subreaper();
    let dir = TestDir::new("exitcodes");
    let root = dir.state_root();
    let b = bundle_with(&dir, "b", default_spec(&["sh", "-c", "exit 7"]));
    let out = husk(&root, &["run", "--bundle", s(&b), "seven"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "run of exit 7: {}",
        stderr(&out)
    );

    let b2 = bundle_with(&dir, "b2", default_spec(&["sleep", "600"]));
    let pid_file = dir.path.join("pid");
    ok(
        &husk(
            &root,
            &["create", "-b", s(&b2), "--pid-file", s(&pid_file), "nine"],
        ),
        "create",
    );
    ok(&husk(&root, &["start", "nine"]), "start");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    ok(&husk(&root, &["kill", "nine", "9"]), "kill -9");
    assert_eq!(
        wait_pid(pid),
        (None, Some(9)),
        "a SIGKILLed container's pid dies by SIGKILL (status 128+9)"
    );
    ok(&husk(&root, &["delete", "nine"]), "delete");

    // Killing state.pid from the host kills the container.
    ok(
        &husk(
            &root,
            &["create", "-b", s(&b2), "--pid-file", s(&pid_file), "victim"],
        ),
        "create",
    );
    ok(&husk(&root, &["start", "victim"]), "start");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    // SAFETY: kill(2) of the shadow process this test adopted.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_pid(pid);
    let mut stopped = false;
    for _ in 0..200 {
        if state(&root, "victim")["status"] == "stopped" {
            stopped = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(stopped, "killing state.pid did not stop the container");
    ok(&husk(&root, &["delete", "victim"]), "delete");
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

#[test]
fn stdout_carries_64_mib_intact_and_stdin_eof_arrives() {
    let dir = TestDir::new("stdio");
    let root = dir.state_root();
    let script = "head -c 67108864 /dev/urandom > /big && md5sum /big >&2 && cat /big && rm /big";
    let b = bundle_with(&dir, "b", default_spec(&["sh", "-c", script]));
    let out = husk(&root, &["run", "--bundle", s(&b), "big"]);
    ok(&out, "run");
    assert_eq!(out.stdout.len(), 64 << 20, "stdout length");
    let guest_md5 = stderr(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let mut md5 = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    md5.stdin
        .take()
        .expect("stdin")
        .write_all(&out.stdout)
        .expect("write");
    let host_md5 = String::from_utf8_lossy(&md5.wait_with_output().expect("md5sum").stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(guest_md5.len(), 32, "guest md5sum: {}", stderr(&out));
    assert_eq!(host_md5, guest_md5, "64 MiB arrived changed");

    // cat ends only when stdin's EOF reaches it.
    let b2 = bundle_with(
        &dir,
        "b2",
        default_spec(&["sh", "-c", "cat; echo eof-seen"]),
    );
    let mut child = Command::new(husk_bin())
        .args(["--root", s(&root), "run", "--bundle", s(&b2), "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"through stdin\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    ok(&out, "run cat");
    assert_eq!(stdout(&out), "through stdin\neof-seen\n");
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

#[test]
fn stdin_through_cat_stdout_carries_32_mib_intact_both_ways_at_once() {
    // stdin spliced into the container's pipe and its stdout spliced back,
    // at the same time: a writer that does not read would fill both pipes
    // and the streams' buffers, so this also proves each side waits for the
    // other instead of buffering.
    const BYTES: usize = 32 << 20;
    let dir = TestDir::new("stdin-cat");
    let root = dir.state_root();
    let b = bundle_with(&dir, "b", default_spec(&["cat"]));
    let mut data = vec![0u8; BYTES];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let mut child = Command::new(husk_bin())
        .args(["--root", s(&root), "run", "--bundle", s(&b), "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut input = child.stdin.take().expect("stdin");
    let sent = data.clone();
    let writer = std::thread::spawn(move || input.write_all(&sent));
    let out = child.wait_with_output().expect("wait");
    writer
        .join()
        .expect("writer thread")
        .expect("write to husk run");
    ok(&out, "run cat");
    assert_eq!(out.stdout.len(), BYTES, "bytes back through cat");
    assert!(out.stdout == data, "32 MiB came back changed");
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

fn read_until(master: &mut std::fs::File, needle: &str) -> String {
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !seen.contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "waited for {needle:?}, got {seen:?}"
        );
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => panic!("reading the console: {e} (so far {seen:?})"),
        }
    }
    seen
}

#[test]
fn console_socket_tty_and_exec_with_and_without_tty() {
    become_subreaper();
    let dir = TestDir::new("tty");
    let root = dir.state_root();
    let mut spec = default_spec(&["sh"]);
    spec["process"]["terminal"] = serde_json::json!(true);
    let b = bundle_with(&dir, "b", spec);
    let sock_path = dir.path.join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock_path).expect("bind console socket");
    let pid_file = dir.path.join("pid");
    let create = {
        let (root, b, sock, pid_file) =
            (root.clone(), b.clone(), sock_path.clone(), pid_file.clone());
        std::thread::spawn(move || {
            husk(
                &root,
                &[
                    "create",
                    "-b",
                    s(&b),
                    "--console-socket",
                    s(&sock),
                    "--pid-file",
                    s(&pid_file),
                    "tty",
                ],
            )
        })
    };
    let master = receive_console_fd(&listener);
    ok(
        &create.join().expect("create thread"),
        "create with console socket",
    );
    ok(&husk(&root, &["start", "tty"]), "start");
    let mut master = std::fs::File::from(master);
    master
        .write_all(b"echo tty-$((6*7))\n")
        .expect("write to console");
    let seen = read_until(&mut master, "tty-42");
    assert!(seen.contains("tty-42"), "{seen}");

    // exec without a tty: stdout comes back, the exit code too.
    let out = husk(
        &root,
        &["exec", "tty", "sh", "-c", "echo from-exec; exit 5"],
    );
    assert_eq!(
        out.status.code(),
        Some(5),
        "exec exit code: {}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "from-exec\n");

    // exec with a tty through its own console socket.
    let sock2 = dir.path.join("console2.sock");
    let listener2 = std::os::unix::net::UnixListener::bind(&sock2).expect("bind");
    let exec = {
        let (root, sock2) = (root.clone(), sock2.clone());
        std::thread::spawn(move || {
            husk(
                &root,
                &[
                    "exec",
                    "-t",
                    "--console-socket",
                    s(&sock2),
                    "tty",
                    "sh",
                    "-c",
                    "tty; echo exec-tty-ok",
                ],
            )
        })
    };
    let mut m2 = std::fs::File::from(receive_console_fd(&listener2));
    let seen = read_until(&mut m2, "exec-tty-ok");
    assert!(seen.contains("/dev/pts/"), "exec -t has no tty: {seen}");
    ok(&exec.join().expect("exec thread"), "exec -t");

    master.write_all(b"exit 3\n").expect("write");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(wait_pid(pid), (Some(3), None));
    ok(&husk(&root, &["delete", "tty"]), "delete");
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

#[test]
fn pause_resume_ps_and_events() {
    let dir = TestDir::new("pause");
    let root = dir.state_root();
    let b = bundle_with(&dir, "b", default_spec(&["sleep", "600"]));
    ok(&husk(&root, &["run", "-d", "-b", s(&b), "p"]), "run -d");
    ok(&husk(&root, &["pause", "p"]), "pause");
    assert_eq!(state(&root, "p")["status"], "paused");
    let frozen = husk(&root, &["exec", "p", "true"]);
    assert!(
        !frozen.status.success(),
        "exec into a paused container must fail"
    );
    ok(&husk(&root, &["resume", "p"]), "resume");
    assert_eq!(state(&root, "p")["status"], "running");
    let ps = husk(&root, &["ps", "--format", "json", "p"]);
    ok(&ps, "ps");
    let pids: Vec<u32> = serde_json::from_slice(&ps.stdout).expect("ps json");
    assert!(!pids.is_empty());
    let ev = husk(&root, &["events", "--stats", "p"]);
    ok(&ev, "events --stats");
    let ev: serde_json::Value = serde_json::from_slice(&ev.stdout).expect("events json");
    assert_eq!(ev["type"], "stats");
    assert!(
        ev["data"]["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0,
        "{ev}"
    );
    ok(
        &husk(&root, &["update", "--memory", "50000000", "p"]),
        "update",
    );
    ok(&husk(&root, &["delete", "--force", "p"]), "delete --force");
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

#[test]
fn hooks_run_in_order_with_the_state_on_stdin() {
    let dir = TestDir::new("hooks");
    let root = dir.state_root();
    let log = dir.path.join("hooks.log");
    let mut spec = default_spec(&["true"]);
    let hook = |name: &str| serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo {name} $(cat) >> {}", log.display())], "timeout": 10});
    spec["hooks"] = serde_json::json!({
        "createRuntime": [hook("createRuntime")],
        "prestart": [hook("prestart")],
        "poststart": [hook("poststart")],
        "poststop": [hook("poststop")],
    });
    let b = bundle_with(&dir, "b", spec);
    ok(
        &husk(&root, &["run", "-b", s(&b), "hooked"]),
        "run with hooks",
    );
    let text = std::fs::read_to_string(&log).expect("hook log");
    let order: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default())
        .collect();
    assert_eq!(
        order,
        ["createRuntime", "prestart", "poststart", "poststop"],
        "{text}"
    );
    for line in text.lines() {
        let json = line.split_once(' ').map(|x| x.1).unwrap_or_default();
        let st: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(st["id"], "hooked");
        assert!(st["bundle"].as_str().unwrap_or_default().ends_with("/b"));
    }

    // A failing createRuntime hook fails create and leaves nothing.
    let mut spec = default_spec(&["true"]);
    spec["hooks"] = serde_json::json!({"createRuntime": [{"path": "/bin/false"}]});
    let b = bundle_with(&dir, "bad", spec);
    let out = husk(&root, &["create", "-b", s(&b), "badhook"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("createRuntime hook"),
        "{}",
        stderr(&out)
    );
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// poststart and poststop run from the hooks saved at create: a bundle
/// whose config.json is gone by start does not skip them, and each gets the
/// state on stdin (poststop's says stopped).
#[test]
fn poststart_and_poststop_run_when_the_bundle_no_longer_loads() {
    let dir = TestDir::new("savedhooks");
    let root = dir.state_root();
    let log = dir.path.join("hooks.log");
    let mut spec = default_spec(&["true"]);
    let hook = |name: &str| serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo {name} $(cat) >> {}", log.display())], "timeout": 10});
    spec["hooks"] = serde_json::json!({
        "poststart": [hook("poststart")],
        "poststop": [hook("poststop")],
    });
    let b = bundle_with(&dir, "b", spec);
    ok(&husk(&root, &["create", "-b", s(&b), "saved"]), "create");
    std::fs::remove_file(b.join("config.json")).expect("remove config.json");
    ok(&husk(&root, &["start", "saved"]), "start without a bundle");
    ok(&husk(&root, &["delete", "--force", "saved"]), "delete");
    let text = std::fs::read_to_string(&log).expect("hook log");
    let lines: Vec<(&str, serde_json::Value)> = text
        .lines()
        .map(|l| {
            let (name, json) = l.split_once(' ').unwrap_or_default();
            let st = serde_json::from_str(json).unwrap_or_else(|e| panic!("{l}: {e}"));
            (name, st)
        })
        .collect();
    let order: Vec<&str> = lines.iter().map(|(n, _)| *n).collect();
    assert_eq!(order, ["poststart", "poststop"], "{text}");
    for (_, st) in &lines {
        assert_eq!(st["id"], "saved", "{text}");
    }
    assert_eq!(lines[1].1["status"], "stopped", "{text}");
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// Every command that reaches into the guest goes through the container's
/// monitor, the one route in: with the monitor stopped (SIGSTOP), exec and
/// ps cannot reach the agent some other way, and each fails within its
/// bounded wait naming the monitor. Once the monitor runs again, they work.
#[test]
fn exec_and_ps_go_through_the_monitor() {
    let dir = TestDir::new("route");
    let root = dir.state_root();
    let b = bundle_with(&dir, "b", default_spec(&["sleep", "600"]));
    ok(&husk(&root, &["run", "-d", "-b", s(&b), "route"]), "run -d");
    let monitor = pid_of(&dir.path, "__monitor").expect("monitor pid");
    // SAFETY: kill(2) of the monitor process found above.
    unsafe { libc::kill(monitor, libc::SIGSTOP) };
    // Both at once: each waits out the CLI's bound on a quick request
    // (twice the agent's RPC timeout).
    let tries: Vec<_> = [vec!["exec", "route", "true"], vec!["ps", "route"]]
        .into_iter()
        .map(|args| {
            let root = root.clone();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let out = husk(&root, &args);
                (args, out, started.elapsed())
            })
        })
        .collect();
    for t in tries {
        let (args, out, took) = t.join().expect("husk thread");
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} worked without the monitor");
        assert!(
            err.contains("the monitor of container route") && err.contains("did not answer"),
            "{args:?}: {err}"
        );
        assert!(
            took < std::time::Duration::from_secs(120),
            "{args:?} took {took:?}"
        );
    }
    // SAFETY: kill(2) of the same process, stopped above.
    unsafe { libc::kill(monitor, libc::SIGCONT) };
    let out = husk(&root, &["exec", "route", "sh", "-c", "echo back; exit 4"]);
    assert_eq!(out.status.code(), Some(4), "exec: {}", stderr(&out));
    assert_eq!(stdout(&out), "back\n");
    ok(&husk(&root, &["ps", "route"]), "ps");
    // The exec's stdin goes through the monitor's pump too, and its end
    // arrives: cat ends, and its output is all out before husk exits.
    let mut cat = Command::new(husk_bin())
        .arg("--root")
        .arg(&root)
        .args(["exec", "route", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning husk exec");
    cat.stdin
        .take()
        .expect("stdin")
        .write_all(b"piped-in\n")
        .expect("write to exec");
    let out = cat.wait_with_output().expect("husk exec cat");
    ok(&out, "exec cat");
    assert_eq!(stdout(&out), "piped-in\n");
    // A detached exec returns at once; --pid-file names the host process
    // that lives as long as it does.
    let pid_file = dir.path.join("exec.pid");
    ok(
        &husk(
            &root,
            &[
                "exec",
                "-d",
                "--pid-file",
                s(&pid_file),
                "route",
                "sleep",
                "2",
            ],
        ),
        "exec -d",
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("exec pid file")
        .trim()
        .parse()
        .expect("pid");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while process_lives(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the detached exec never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ok(
        &husk(&root, &["delete", "--force", "route"]),
        "delete --force",
    );
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// createContainer and startContainer run inside the guest, in the
/// container's namespaces, with the state on stdin; a failing one fails
/// `start` naming it, and the container is cleaned up by delete.
#[test]
fn container_hooks_run_in_the_guest_in_the_container_namespaces() {
    let dir = TestDir::new("ghooks");
    let root = dir.state_root();
    let out_dir = dir.path.join("out");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let mut spec = default_spec(&[
        "sh",
        "-c",
        "readlink /proc/self/ns/mnt > /out/process.mnt; readlink /proc/self/ns/uts > /out/process.uts",
    ]);
    spec["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(serde_json::json!({
            "destination": "/out", "type": "bind", "source": out_dir, "options": ["rbind"]
        }));
    // Paths resolve in the container's rootfs (busybox), where the host's
    // files are not.
    let hook = |name: &str| {
        serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!(
            "cat > /out/{name}.json; echo {name} >> /out/order; hostname > /out/{name}.host; \
             readlink /proc/self/ns/mnt > /out/{name}.mnt; readlink /proc/self/ns/uts > /out/{name}.uts; \
             test -f /out/{name}.json && echo $HOOK_ENV > /out/{name}.env"
        )], "env": ["HOOK_ENV=from-config"], "timeout": 30})
    };
    spec["hooks"] = serde_json::json!({
        "createContainer": [hook("createContainer")],
        "startContainer": [hook("startContainer")],
    });
    let b = bundle_with(&dir, "b", spec.clone());
    ok(&husk(&root, &["run", "-b", s(&b), "ghook"]), "run");
    let read =
        |f: &str| std::fs::read_to_string(out_dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    assert_eq!(read("order"), "createContainer\nstartContainer\n");
    for (name, status) in [
        ("createContainer", "creating"),
        ("startContainer", "created"),
    ] {
        let st: serde_json::Value = serde_json::from_str(&read(&format!("{name}.json")))
            .unwrap_or_else(|e| panic!("{name} state: {e}"));
        assert_eq!(st["id"], "ghook", "{st}");
        assert_eq!(st["status"], status, "{st}");
        assert!(st["pid"].as_i64().is_some_and(|p| p > 0), "{st}");
        assert!(
            st["bundle"].as_str().is_some_and(|b| b.ends_with("/b")),
            "{st}"
        );
        // The container's uts and mount namespaces, not the agent's.
        assert_eq!(read(&format!("{name}.host")), "husk-test\n");
        assert_eq!(read(&format!("{name}.mnt")), read("process.mnt"), "{name}");
        assert_eq!(read(&format!("{name}.uts")), read("process.uts"), "{name}");
        assert_eq!(read(&format!("{name}.env")), "from-config\n");
    }
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());

    // A failing startContainer hook fails start, naming the hook; the
    // process never runs; delete cleans everything up.
    let mut spec = default_spec(&["sh", "-c", "touch /out/ran"]);
    spec["mounts"] = spec_mounts_with_out(&spec, &out_dir);
    spec["hooks"] = serde_json::json!({"startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 3"]}]});
    let b = bundle_with(&dir, "bad", spec);
    ok(&husk(&root, &["create", "-b", s(&b), "badghook"]), "create");
    let out = husk(&root, &["start", "badghook"]);
    assert!(!out.status.success(), "start succeeded");
    assert!(
        stderr(&out).contains("hooks.startContainer[0] (/bin/sh): exited with status 3"),
        "{}",
        stderr(&out)
    );
    assert!(!out_dir.join("ran").exists(), "the process ran");
    ok(&husk(&root, &["delete", "--force", "badghook"]), "delete");

    // A failing createContainer hook fails create (the guest process is
    // set up and parked at create) and leaves nothing; one past its
    // timeout is killed.
    let mut spec = default_spec(&["true"]);
    spec["hooks"] = serde_json::json!({"createContainer": [{"path": "/bin/sleep", "args": ["sleep", "60"], "timeout": 1}]});
    let b = bundle_with(&dir, "slow", spec);
    let out = husk(&root, &["create", "-b", s(&b), "slowghook"]);
    assert!(!out.status.success(), "create succeeded");
    assert!(
        stderr(&out).contains("hooks.createContainer[0] (/bin/sleep): killed after its timeout"),
        "{}",
        stderr(&out)
    );
    let st = husk(&root, &["state", "slowghook"]);
    assert!(!st.status.success(), "container left behind");

    // A created container that is deleted never runs its process.
    let mut spec = default_spec(&["sh", "-c", "touch /out/ran-after-delete"]);
    spec["mounts"] = spec_mounts_with_out(&spec, &out_dir);
    let b = bundle_with(&dir, "never", spec);
    ok(
        &husk(&root, &["create", "-b", s(&b), "neverstarted"]),
        "create",
    );
    ok(&husk(&root, &["delete", "neverstarted"]), "delete");
    assert!(
        !out_dir.join("ran-after-delete").exists(),
        "the process ran"
    );
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

fn spec_mounts_with_out(spec: &serde_json::Value, out_dir: &Path) -> serde_json::Value {
    let mut mounts = spec["mounts"].clone();
    if let Some(m) = mounts.as_array_mut() {
        m.push(serde_json::json!({
            "destination": "/out", "type": "bind", "source": out_dir, "options": ["rbind"]
        }));
    }
    mounts
}

#[test]
fn bind_mount_from_the_host_is_visible_and_read_only() {
    let dir = TestDir::new("bind");
    let root = dir.state_root();
    let host = dir.path.join("hostdata");
    std::fs::create_dir_all(&host).expect("mkdir");
    std::fs::write(host.join("file"), "host content\n").expect("write");
    let mut spec = default_spec(&[
        "sh",
        "-c",
        "cat /data/file; echo x > /data/new && echo WRITABLE || echo read-only",
    ]);
    spec["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(serde_json::json!({
            "destination": "/data", "type": "bind", "source": host, "options": ["rbind", "ro"]
        }));
    let b = bundle_with(&dir, "b", spec);
    let out = husk(&root, &["run", "-b", s(&b), "bind"]);
    ok(&out, "run");
    assert_eq!(stdout(&out), "host content\nread-only\n");
    assert!(!host.join("new").exists());
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

#[test]
fn twenty_containers_created_in_parallel_all_work() {
    let dir = TestDir::new("parallel");
    let root = dir.state_root();
    let b = bundle_with(&dir, "b", default_spec(&["sh", "-c", "echo ok-$HOSTNAME"]));
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let (root, b) = (root.clone(), b.clone());
            std::thread::spawn(move || husk(&root, &["run", "-b", s(&b), &format!("par{i}")]))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.join().expect("thread");
        ok(&out, &format!("container par{i}"));
        assert_eq!(stdout(&out), "ok-husk-test\n");
    }
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

#[test]
fn two_hundred_create_delete_cycles_leave_nothing() {
    let dir = TestDir::new("cycles");
    let root = dir.state_root();
    let b = bundle_with(&dir, "b", default_spec(&["true"]));
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (root, b) = (root.clone(), b.clone());
            std::thread::spawn(move || {
                for i in 0..100 {
                    let id = format!("cyc{w}-{i}");
                    let out = husk(&root, &["create", "-b", s(&b), &id]);
                    ok(&out, &format!("create {id}"));
                    let out = husk(&root, &["delete", &id]);
                    ok(&out, &format!("delete {id}"));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    // Shadows carry the state root in their argv, so this covers them too.
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// Bad input: a clear error naming the problem, non-zero exit, nothing left.
fn refused(root: &Path, args: &[&str], expect: &str, marker: &Path) {
    let out = husk(root, args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = stderr(&out);
    assert!(
        err.to_lowercase().contains(&expect.to_lowercase()),
        "{args:?}: error {err:?} does not mention {expect:?}"
    );
    assert_eq!(
        err.trim().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert_eq!(
        leftovers_settled(marker, root),
        Vec::<String>::new(),
        "{args:?}"
    );
}

#[test]
fn bad_input_is_refused_clearly_and_leaves_nothing() {
    become_subreaper();
    let dir = TestDir::new("badcli");
    let root = dir.state_root();
    let good = bundle_with(&dir, "good", default_spec(&["sleep", "600"]));
    let malformed = dir.path.join("malformed");
    std::fs::create_dir_all(malformed.join("rootfs")).expect("mkdir");
    std::fs::write(malformed.join("config.json"), "{ this is not json").expect("write");
    refused(
        &root,
        &["create", "-b", s(&malformed), "m1"],
        "malformed",
        &dir.path,
    );
    let mut spec = default_spec(&["true"]);
    spec["ociVersion"] = serde_json::json!("2.0.0");
    let v2 = bundle_with(&dir, "v2", spec);
    refused(
        &root,
        &["create", "-b", s(&v2), "m2"],
        "ociVersion",
        &dir.path,
    );
    let mut spec = default_spec(&["true"]);
    spec["root"]["path"] = serde_json::json!("no-such-rootfs");
    let norootfs = bundle_with(&dir, "norootfs", spec);
    refused(
        &root,
        &["create", "-b", s(&norootfs), "m3"],
        "rootfs",
        &dir.path,
    );
    // More memory than the host has: named, refused, nothing left (it was
    // cut to 32 bits before).
    let mut spec = default_spec(&["true"]);
    spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": i64::MAX}});
    let huge = bundle_with(&dir, "huge", spec);
    refused(
        &root,
        &["create", "-b", s(&huge), "m5"],
        "linux.resources.memory.limit",
        &dir.path,
    );
    let noexe = bundle_with(&dir, "noexe", default_spec(&["/no/such/program"]));
    refused(
        &root,
        &["create", "-b", s(&noexe), "m4"],
        "not found",
        &dir.path,
    );
    refused(
        &root,
        &["create", "-b", s(&good), "../x"],
        "invalid id format",
        &dir.path,
    );
    // Found wrong only after the VM booted and the container was created
    // in it: the monitor tears all of it down before create fails.
    let no_dir = dir.path.join("no-such-dir/pid");
    refused(
        &root,
        &["create", "-b", s(&good), "--pid-file", s(&no_dir), "m6"],
        "pid file",
        &dir.path,
    );
    ok(
        &husk(&root, &["create", "-b", s(&good), "dup"]),
        "create dup",
    );
    let out = husk(&root, &["create", "-b", s(&good), "dup"]);
    assert!(
        !out.status.success() && stderr(&out).contains("already exists"),
        "{}",
        stderr(&out)
    );
    let out = husk(&root, &["kill", "dup", "SIGNOPE"]);
    assert!(
        !out.status.success() && stderr(&out).contains("unknown signal"),
        "{}",
        stderr(&out)
    );
    ok(&husk(&root, &["delete", "--force", "dup"]), "delete dup");
    let out = husk(&root, &["--systemd-cgroup", "list"]);
    assert!(!out.status.success() && stderr(&out).contains("not supported"));
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// Every subcommand that names a container refuses an id that could name a
/// path, before touching anything: a state.json planted outside the root is
/// never read, deleted or acted on (runc: "invalid id format").
#[test]
fn every_subcommand_refuses_ids_that_could_name_a_path() {
    let dir = TestDir::new("ids");
    let root = dir.state_root();
    std::fs::create_dir_all(root.join("containers")).expect("mkdir containers");
    // <root>/containers/../../planted is <dir>/planted: a complete, stopped
    // container's state, whose bundle has a poststop hook.
    let planted = dir.path.join("planted");
    let canary = dir.path.join("canary");
    let bundle = dir.path.join("planted-bundle");
    std::fs::create_dir_all(&planted).expect("mkdir planted");
    std::fs::create_dir_all(bundle.join("rootfs")).expect("mkdir bundle");
    let mut spec = default_spec(&["true"]);
    spec["hooks"] = serde_json::json!({"poststop": [
        {"path": "/bin/sh", "args": ["sh", "-c", format!("touch {}", canary.display())]}
    ]});
    std::fs::write(bundle.join("config.json"), spec.to_string()).expect("config");
    let state = serde_json::json!({
        "id": "../../planted", "bundle": bundle, "status": "stopped", "pid": 0,
        "monitor_pid": 0, "monitor_start": 0, "created": "2026-01-01T00:00:00.000000000Z"
    });
    std::fs::write(planted.join("state.json"), state.to_string()).expect("state");
    let long = "a".repeat(65);
    for id in [
        "../../planted",
        "..",
        "a/b",
        long.as_str(),
        "a b",
        "x\u{1b}[2Jy",
    ] {
        for args in [
            vec!["delete", id],
            vec!["delete", "--force", id],
            vec!["state", id],
            vec!["start", id],
            vec!["kill", id, "KILL"],
            vec!["pause", id],
            vec!["resume", id],
            vec!["ps", id],
            vec!["events", id],
            vec!["exec", id, "true"],
            vec!["update", "--memory", "1000000", id],
            vec!["create", "-b", "/nonexistent", id],
        ] {
            let out = husk(&root, &args);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            assert!(err.contains("invalid id format"), "{args:?}: {err}");
            assert!(
                !err.contains('\u{1b}'),
                "{args:?} echoed a raw escape: {err:?}"
            );
        }
    }
    assert!(
        planted.join("state.json").is_file(),
        "the planted state was touched"
    );
    assert!(!canary.exists(), "a hook of the planted bundle ran");
}

/// `husk` with stdout and stderr to files, not waited for.
fn husk_spawn(root: &Path, args: &[&str], out: &Path) -> std::process::Child {
    let file = |ext: &str| {
        std::fs::File::create(out.with_extension(ext)).unwrap_or_else(|e| panic!("{e}"))
    };
    Command::new(husk_bin())
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file("out"))
        .stderr(file("err"))
        .spawn()
        .expect("spawning husk")
}

/// Races on one id: two creates at once (one wins, the other is told it
/// exists), a delete while the create is still booting the VM (it waits for
/// the create and then removes everything), pause while the process exits
/// (never "paused" over "stopped"). Nothing leaks, no state is corrupted.
#[test]
fn create_delete_and_pause_races_on_one_id() {
    become_subreaper();
    let dir = TestDir::new("races");
    let root = dir.state_root();
    let b = bundle_with(&dir, "b", default_spec(&["sleep", "600"]));

    // Two creates of one id at once.
    let (o1, o2) = (dir.path.join("c1"), dir.path.join("c2"));
    let mut c1 = husk_spawn(&root, &["create", "-b", s(&b), "twin"], &o1);
    let mut c2 = husk_spawn(&root, &["create", "-b", s(&b), "twin"], &o2);
    let (r1, r2) = (c1.wait().expect("wait"), c2.wait().expect("wait"));
    assert!(
        r1.success() != r2.success(),
        "exactly one create must win: {r1} {r2}"
    );
    let loser = if r1.success() { &o2 } else { &o1 };
    let err = std::fs::read_to_string(loser.with_extension("err")).unwrap_or_default();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(state(&root, "twin")["status"], "created");
    ok(&husk(&root, &["delete", "--force", "twin"]), "delete twin");

    // Delete while the create is booting the VM.
    let o3 = dir.path.join("c3");
    let mut c3 = husk_spawn(&root, &["create", "-b", s(&b), "early"], &o3);
    let sandbox = husk_runtime::sandbox::sandbox_dir(&root.join("sandbox"), "early");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !sandbox.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(sandbox.exists(), "the create never started its sandbox");
    let del = husk(&root, &["delete", "--force", "early"]);
    let created = c3.wait().expect("wait");
    assert!(
        created.success(),
        "the create was torn down under itself: {}",
        std::fs::read_to_string(o3.with_extension("err")).unwrap_or_default()
    );
    ok(&del, "delete during create");
    assert!(!husk(&root, &["state", "early"]).status.success());

    // Pause while the container's process exits.
    let quick = bundle_with(&dir, "quick", default_spec(&["sleep", "1"]));
    ok(
        &husk(&root, &["create", "-b", s(&quick), "quick"]),
        "create",
    );
    ok(&husk(&root, &["start", "quick"]), "start");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let st = state(&root, "quick");
        if st["status"] == "stopped" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never stopped: {st}");
        if husk(&root, &["pause", "quick"]).status.success() {
            let _ = husk(&root, &["resume", "quick"]);
        }
    }
    let out = husk(&root, &["pause", "quick"]);
    assert!(!out.status.success(), "paused a stopped container");
    assert!(stderr(&out).contains("stopped"), "{}", stderr(&out));
    assert_eq!(state(&root, "quick")["status"], "stopped");
    ok(&husk(&root, &["delete", "quick"]), "delete quick");
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
    let lock_files: Vec<_> = std::fs::read_dir(root.join("containers"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(lock_files.is_empty(), "left in containers/: {lock_files:?}");
}

/// The cgroups of a process on the host, one "hierarchy:path" line each.
fn host_cgroups(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

#[test]
fn host_processes_are_placed_in_cgroups_path_and_removed_with_the_container() {
    let dir = TestDir::new("hostcg");
    let root = dir.state_root();
    let cg = format!("/husk-test-{}/hostcg", std::process::id());
    let mut spec = default_spec(&["sleep", "600"]);
    spec["linux"]["cgroupsPath"] = serde_json::json!(cg);
    spec["linux"]["resources"] = serde_json::json!({"cpu": {"shares": 512, "quota": 150000, "period": 100000, "cpus": "0", "mems": "0"}});
    let b = bundle_with(&dir, "b", spec);
    ok(
        &husk(&root, &["run", "-d", "-b", s(&b), "hostcg"]),
        "run -d",
    );
    // The container's CPU limits are mirrored on the host cgroup of the
    // sandbox (v1 cpu and cpuset controllers here), and `update` changes them.
    let hierarchies = husk_runtime::host_cgroup::hierarchies();
    let host_file = |controller_file: &str| host_cgroup_file(&cg, controller_file);
    if let Some(shares) = host_file("cpu.shares") {
        assert_eq!(shares, "512");
        assert_eq!(host_file("cpu.cfs_quota_us").as_deref(), Some("150000"));
        assert_eq!(host_file("cpu.cfs_period_us").as_deref(), Some("100000"));
    } else {
        let max = host_file("cpu.max").expect("neither v1 cpu.shares nor v2 cpu.max on the host");
        assert_eq!(max, "150000 100000");
    }
    assert_eq!(host_file("cpuset.cpus").as_deref(), Some("0"));
    // The sandbox's own bounds: the VM's RAM (the default 128 MiB, no limit
    // in the spec) plus the host overhead (256 MiB), and the pids maximum.
    let memory = host_file("memory.limit_in_bytes")
        .or_else(|| host_file("memory.max"))
        .expect("no memory controller on the host cgroup");
    assert_eq!(memory, ((128u64 + 256) << 20).to_string());
    assert_eq!(host_file("pids.max").as_deref(), Some("1024"));
    ok(
        &husk(
            &root,
            &[
                "update",
                "--cpu-quota",
                "50000",
                "--cpu-shares",
                "256",
                "hostcg",
            ],
        ),
        "update",
    );
    if host_file("cpu.shares").is_some() {
        assert_eq!(host_file("cpu.cfs_quota_us").as_deref(), Some("50000"));
        assert_eq!(host_file("cpu.shares").as_deref(), Some("256"));
    }
    for name in [
        "qemu-system",
        "__monitor",
        "virtiofsd",
        "vhost-device-vsock",
    ] {
        let pid = pid_of(&dir.path, name).unwrap_or_else(|| panic!("no {name} process"));
        let cgroups = host_cgroups(pid);
        assert!(
            cgroups.lines().any(|l| l.ends_with(&cg)),
            "{name} is not in {cg}: {cgroups}"
        );
    }
    assert!(!hierarchies.is_empty());
    ok(&husk(&root, &["delete", "-f", "hostcg"]), "delete");
    for h in hierarchies {
        let top = h.join(format!("husk-test-{}", std::process::id()));
        assert!(!top.exists(), "{} left behind", top.display());
    }
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn process_lives(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

#[test]
fn a_crashed_monitor_shows_stopped_and_delete_cleans_up() {
    let dir = TestDir::new("crash");
    let root = dir.state_root();
    let b = bundle_with(&dir, "b", default_spec(&["sleep", "600"]));
    ok(&husk(&root, &["run", "-d", "-b", s(&b), "crash"]), "run -d");
    let monitor = pid_of(&dir.path, "__monitor").expect("monitor pid");
    // SAFETY: kill(2) of the monitor process found above.
    unsafe { libc::kill(monitor, libc::SIGKILL) };
    // SIGKILL is delivered asynchronously: the crash has happened once the
    // process is a zombie or gone (its threads take a moment to exit).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while process_lives(monitor) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The VMM and the backends die with it; state must not hang on it.
    let started = std::time::Instant::now();
    let st = state(&root, "crash");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "state hung"
    );
    assert_eq!(st["status"], "stopped");
    ok(&husk(&root, &["delete", "crash"]), "delete after a crash");
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// A crashed monitor's host cgroup (the one `linux.cgroupsPath` names, as
/// podman and containerd give it) goes with the `delete` after the crash,
/// and the parent it made too; nothing of it waits for a monitor that is gone.
#[test]
fn a_crashed_monitors_host_cgroup_goes_with_delete() {
    let dir = TestDir::new("crash-cgroup");
    let root = dir.state_root();
    let parent = format!("husk-test-crash-{}", std::process::id());
    let mut spec = default_spec(&["sleep", "600"]);
    spec["linux"]["cgroupsPath"] = serde_json::json!(format!("/{parent}/crash"));
    let b = bundle_with(&dir, "b", spec);
    ok(
        &husk(&root, &["run", "-d", "-b", s(&b), "crashcg"]),
        "run -d",
    );
    let hierarchies = husk_runtime::host_cgroup::hierarchies();
    let made: Vec<_> = hierarchies
        .iter()
        .map(|h| h.join(&parent))
        .filter(|d| d.join("crash").is_dir())
        .collect();
    assert!(!made.is_empty(), "no host cgroup /{parent}/crash was made");
    let monitor = pid_of(&dir.path, "__monitor").expect("monitor pid");
    // SAFETY: kill(2) of the monitor process found above.
    unsafe { libc::kill(monitor, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while process_lives(monitor) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(state(&root, "crashcg")["status"], "stopped");
    ok(&husk(&root, &["delete", "crashcg"]), "delete after a crash");
    let left: Vec<_> = made.iter().filter(|d| d.exists()).collect();
    for d in &left {
        let _ = std::fs::remove_dir(d.join("crash"));
        let _ = std::fs::remove_dir(d);
    }
    assert!(left.is_empty(), "host cgroups left after delete: {left:?}");
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// A device backend's death while the guest runs on: no call into the VM
/// fails (the container only sleeps), so only the monitor's watch on the
/// helpers' pidfds can see it. The container ends, `husk run` names the
/// dead helper, and nothing is left.
#[test]
fn a_dead_backend_ends_the_container_and_run_names_it() {
    let dir = TestDir::new("backenddeath");
    let root = dir.state_root();
    let b = bundle_with(&dir, "b", default_spec(&["sleep", "600"]));
    let run = {
        let (root, b) = (root.clone(), b.clone());
        std::thread::spawn(move || husk(&root, &["run", "-b", s(&b), "bdeath"]))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let running = || {
        let out = husk(&root, &["state", "bdeath"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|v| v["status"] == "running")
    };
    while !running() {
        assert!(
            std::time::Instant::now() < deadline && !run.is_finished(),
            "the container did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let fs = pid_of(&dir.path, "virtiofsd").expect("virtiofsd pid");
    // SAFETY: kill(2) of the virtiofsd this test's container started.
    unsafe { libc::kill(fs, libc::SIGKILL) };
    let killed = std::time::Instant::now();
    while !run.is_finished() {
        if killed.elapsed() > std::time::Duration::from_secs(30) {
            let _ = husk(&root, &["delete", "-f", "bdeath"]);
            panic!("husk run did not end within 30s of its backend's death");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("husk run ended {:?} after virtiofsd died", killed.elapsed());
    let out = run.join().expect("husk run thread");
    assert!(
        !out.status.success(),
        "husk run succeeded: {}",
        stderr(&out)
    );
    let err = stderr(&out);
    eprintln!("husk run: {err}");
    assert!(
        err.contains("virtiofsd") && err.contains("killed by signal 9"),
        "the cause is not named: {err}"
    );
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

#[test]
fn the_memory_limit_sizes_the_vm_and_the_container_cgroup() {
    let dir = TestDir::new("sizing");
    let root = dir.state_root();
    let mut spec = default_spec(&[
        "sh",
        "-c",
        "grep MemTotal /proc/meminfo; cat /sys/fs/cgroup/memory.max",
    ]);
    spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": 256u64 << 20}});
    spec["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(serde_json::json!({
            "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]
        }));
    let b = bundle_with(&dir, "b", spec);
    let out = husk(&root, &["run", "-b", s(&b), "sizing"]);
    ok(&out, "run");
    let text = stdout(&out);
    let kib: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {text:?}"));
    // 256 MiB limit + the 64 MiB guest overhead, less what the kernel keeps.
    assert!(
        (256 << 10..(320 << 10) + 1).contains(&kib),
        "guest MemTotal {kib} KiB for a 256 MiB limit"
    );
    assert!(
        text.lines().any(|l| l.trim() == (256u64 << 20).to_string()),
        "container memory.max: {text}"
    );
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// `cpu.cpus` names guest CPUs: the VM gets enough vCPUs for all of them,
/// and the container's cgroup carries the cpuset.
#[test]
fn cpuset_cpus_sizes_the_vm() {
    let dir = TestDir::new("cpuset");
    let root = dir.state_root();
    let mut spec = default_spec(&[
        "sh",
        "-c",
        "grep -c ^processor /proc/cpuinfo; cat /sys/fs/cgroup/cpuset.cpus",
    ]);
    spec["linux"]["resources"] = serde_json::json!({"cpu": {"cpus": "1-2"}});
    spec["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(serde_json::json!({
            "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]
        }));
    let b = bundle_with(&dir, "b", spec.clone());
    let out = husk(&root, &["run", "-b", s(&b), "cpuset"]);
    ok(&out, "run");
    assert_eq!(stdout(&out), "3\n1-2\n");

    // A CPU list that cannot name guest CPUs is refused, naming the field.
    spec["linux"]["resources"] = serde_json::json!({"cpu": {"cpus": "2-1"}});
    let b = bundle_with(&dir, "bad", spec);
    let out = husk(&root, &["run", "-b", s(&b), "badcpuset"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("linux.resources.cpu.cpus \"2-1\""),
        "{}",
        stderr(&out)
    );
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}

/// `--log` with `--log-format json|text` gets runc-shaped entries (conmon
/// reads `msg` of the last json entry of a failed call); `--debug` adds the
/// monitor's and the command's debug entries.
#[test]
fn log_file_gets_runc_shaped_entries() {
    let dir = TestDir::new("log");
    let root = dir.state_root();
    let json_log = dir.path.join("json.log");
    let out = husk(
        &root,
        &[
            "--log",
            s(&json_log),
            "--log-format",
            "json",
            "kill",
            "nosuch",
            "KILL",
        ],
    );
    assert!(!out.status.success());
    let text = std::fs::read_to_string(&json_log).expect("json log");
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    assert_eq!(last["level"], "error", "{text}");
    assert!(
        last["msg"].as_str().is_some_and(|m| m.contains("nosuch")),
        "{text}"
    );
    assert!(
        last["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{text}"
    );

    let text_log = dir.path.join("text.log");
    let b = bundle_with(&dir, "b", default_spec(&["true"]));
    ok(
        &husk(
            &root,
            &[
                "--log",
                s(&text_log),
                "--debug",
                "run",
                "-b",
                s(&b),
                "logged",
            ],
        ),
        "run",
    );
    let out = husk(&root, &["--log", s(&text_log), "start", "logged"]);
    assert!(!out.status.success());
    let text = std::fs::read_to_string(&text_log).expect("text log");
    assert!(
        text.lines()
            .all(|l| l.starts_with("time=\"") && l.contains(" level=")),
        "{text}"
    );
    assert!(text.contains("level=debug msg="), "{text}");
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.contains("level=error") && l.contains("logged")),
        "{text}"
    );
    let out = husk(&root, &["--log-format", "yaml", "list"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--log-format \"yaml\""),
        "{}",
        stderr(&out)
    );
    assert_eq!(leftovers_settled(&dir.path, &root), Vec::<String>::new());
}
