//! The containerd shim v2 (`containerd-shim-husk-v2`) against a real
//! containerd 1.6 (Debian's) started by each test on a private root, with
//! real microVMs: `ctr run` / exit codes / exec / kill / pause / metrics,
//! events, faults (a killed shim, a killed VM) and bad input.

use husk_tests::containerd::*;
use husk_tests::{stderr, stdout};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn run_args<'a>(id: &'a str, extra: &[&'a str], cmd: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--runtime", RUNTIME];
    args.extend_from_slice(extra);
    args.push(IMAGE);
    args.push(id);
    args.extend_from_slice(cmd);
    args
}

/// `ctr events`, recorded to a file while the test runs.
struct Events {
    child: Child,
    path: std::path::PathBuf,
}

impl Events {
    fn watch(c: &Containerd) -> Events {
        let path = c.dir.path.join("events.txt");
        let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{e}"));
        let child = c
            .ctr_cmd(&["events"])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("ctr events: {e}"));
        std::thread::sleep(Duration::from_millis(300));
        Events { child, path }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }

    /// Waits up to `timeout` for an event line with `topic` mentioning `needle`.
    fn wait_for(&self, topic: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            if let Some(line) = text
                .lines()
                .find(|l| l.contains(&format!(" {topic} ")) && l.contains(needle))
            {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {topic} event for {needle} within {timeout:?}; events:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn task_status(c: &Containerd, id: &str) -> String {
    let out = c.ctr(&["task", "ls"]);
    stdout(&out)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("")
        .to_string()
}

fn wait_status(c: &Containerd, id: &str, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let s = task_status(c, id);
        if s == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} is {s:?}, not {want} after {timeout:?}; containerd log:\n{}",
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn remove(c: &Containerd, id: &str) {
    let _ = c.ctr(&["task", "rm", "-f", id]);
    let out = c.ctr(&["containers", "rm", id]);
    assert!(
        out.status.success(),
        "ctr containers rm {id}: {}",
        stderr(&out)
    );
}

fn assert_clean(c: &Containerd) {
    assert_eq!(
        c.leftovers_settled(),
        Vec::<String>::new(),
        "husk left things behind; containerd log:\n{}",
        c.log_tail()
    );
}

#[test]
fn ctr_run_prints_output_and_passes_exit_codes() {
    let c = Containerd::start("ctr-run");
    let events = Events::watch(&c);
    let out = c.ctr(&run_args("hello", &["--rm"], &["echo", "hi"]));
    assert!(
        out.status.success(),
        "ctr run failed: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    assert_eq!(stdout(&out), "hi\n");
    let out = c.ctr(&run_args(
        "seven",
        &["--rm"],
        &["sh", "-c", "echo to-stderr >&2; exit 7"],
    ));
    assert_eq!(
        out.status.code(),
        Some(7),
        "exit code of sh -c 'exit 7': {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("to-stderr"),
        "stderr: {}",
        stderr(&out)
    );
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        events.wait_for(topic, "seven", Duration::from_secs(5));
    }
    let exit = events.wait_for("/tasks/exit", "seven", Duration::from_secs(1));
    assert!(exit.contains("\"exit_status\":7"), "exit event: {exit}");
    // ctr deletes the task as soon as Wait returns: the shim's TaskExit
    // still comes first.
    let text = events.text();
    let at = |topic: &str| {
        text.lines()
            .position(|l| l.contains(&format!(" {topic} ")) && l.contains("seven"))
    };
    assert!(
        at("/tasks/exit") < at("/tasks/delete"),
        "TaskExit before TaskDelete:\n{text}"
    );
    assert_clean(&c);
}

#[test]
fn ctr_exec_with_and_without_a_terminal() {
    let c = Containerd::start("ctr-exec");
    let events = Events::watch(&c);
    let out = c.ctr(&run_args("box", &["-d"], &["sleep", "1000"]));
    assert!(
        out.status.success(),
        "ctr run -d: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    wait_status(&c, "box", "RUNNING", Duration::from_secs(10));

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "plain",
        "box",
        "sh",
        "-c",
        "echo exec-out; echo exec-err >&2; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "exec exit code; stderr: {}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "exec-out\n");
    assert_eq!(stderr(&out).trim(), "exec-err");
    events.wait_for("/tasks/exec-added", "plain", Duration::from_secs(5));
    events.wait_for("/tasks/exec-started", "plain", Duration::from_secs(5));

    // -t needs a terminal on ctr's side: script(1) gives it one.
    let cmd = format!(
        "ctr -a {} -n {NAMESPACE} task exec -t --exec-id tty box sh -c '[ -t 0 ] && [ -t 1 ] && echo on-a-tty; exit 4'",
        c.socket.display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script(1)");
    assert_eq!(
        out.status.code(),
        Some(4),
        "exec -t exit code; output: {:?}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("on-a-tty"),
        "exec -t output: {:?}",
        stdout(&out)
    );

    // A terminal for the container's own process too (ctr run -t).
    let cmd = format!(
        "ctr -a {} -n {NAMESPACE} run --rm -t --runtime {RUNTIME} {IMAGE} ttyrun sh -c '[ -t 0 ] && [ -t 1 ] && echo run-on-a-tty; exit 6'",
        c.socket.display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script(1)");
    assert_eq!(
        out.status.code(),
        Some(6),
        "run -t exit code; output: {:?}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("run-on-a-tty"),
        "run -t output: {:?}",
        stdout(&out)
    );

    let out = c.ctr(&["task", "kill", "-s", "SIGKILL", "box"]);
    assert!(out.status.success(), "kill: {}", stderr(&out));
    wait_status(&c, "box", "STOPPED", Duration::from_secs(10));
    remove(&c, "box");
    assert_clean(&c);
}

#[test]
fn ctr_kill_pause_and_resume() {
    let c = Containerd::start("ctr-kill");
    let events = Events::watch(&c);
    let out = c.ctr(&run_args(
        "k",
        &["-d"],
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 42' TERM; while :; do sleep 0.1; done",
        ],
    ));
    assert!(
        out.status.success(),
        "ctr run -d: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    wait_status(&c, "k", "RUNNING", Duration::from_secs(10));

    let out = c.ctr(&["task", "pause", "k"]);
    assert!(out.status.success(), "pause: {}", stderr(&out));
    assert_eq!(task_status(&c, "k"), "PAUSED");
    events.wait_for("/tasks/paused", "k", Duration::from_secs(5));
    let out = c.ctr(&["task", "resume", "k"]);
    assert!(out.status.success(), "resume: {}", stderr(&out));
    assert_eq!(task_status(&c, "k"), "RUNNING");
    events.wait_for("/tasks/resumed", "k", Duration::from_secs(5));

    // Once the loop's first `sleep` shows, the shell has set its trap (a
    // slow guest under load may not have got that far yet): then kill.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = c.ctr(&["task", "ps", "k"]);
        assert!(out.status.success(), "ps: {}", stderr(&out));
        // A header, the shell and its sleep.
        if stdout(&out).lines().count() >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task ps never listed the shell and its sleep: {}",
            stdout(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = c.ctr(&["task", "kill", "-s", "SIGTERM", "k"]);
    assert!(out.status.success(), "kill: {}", stderr(&out));
    wait_status(&c, "k", "STOPPED", Duration::from_secs(10));
    let exit = events.wait_for("/tasks/exit", "\"k\"", Duration::from_secs(5));
    assert!(
        exit.contains("\"exit_status\":42"),
        "the trap's exit status: {exit}"
    );

    // kill --all reaches every process of the container.
    let out = c.ctr(&run_args(
        "all",
        &["-d"],
        &["sh", "-c", "sleep 1000 & sleep 1000"],
    ));
    assert!(out.status.success(), "ctr run -d: {}", stderr(&out));
    wait_status(&c, "all", "RUNNING", Duration::from_secs(10));
    let out = c.ctr(&["task", "kill", "-a", "-s", "SIGKILL", "all"]);
    assert!(out.status.success(), "kill -a: {}", stderr(&out));
    wait_status(&c, "all", "STOPPED", Duration::from_secs(10));
    remove(&c, "k");
    remove(&c, "all");
    assert_clean(&c);
}

#[test]
fn ctr_task_metrics_show_the_guest_cgroup() {
    let c = Containerd::start("ctr-metrics");
    let out = c.ctr(&run_args(
        "m",
        &["-d", "--memory-limit", "67108864"],
        &[
            "sh",
            "-c",
            "head -c 8000000 /dev/urandom > /dev/shm/x; sleep 1000 & sleep 1000 & wait",
        ],
    ));
    assert!(
        out.status.success(),
        "ctr run -d: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    wait_status(&c, "m", "RUNNING", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let out = c.ctr(&["task", "metrics", "m"]);
        assert!(out.status.success(), "metrics: {}", stderr(&out));
        let text = stdout(&out);
        let value = |k: &str| {
            text.lines()
                .find(|l| l.split_whitespace().next() == Some(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        if value("pids.current") == Some(3) && value("memory.usage").unwrap_or(0) > 8_000_000 {
            break (value("cpu.usage_usec"), value("memory.usage_limit"), text);
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the guest's 3 processes and 8 MB: {text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(metrics.0.unwrap_or(0) > 0, "cpu.usage_usec: {}", metrics.2);
    assert_eq!(
        metrics.1,
        Some(67108864),
        "memory.usage_limit is the container's limit: {}",
        metrics.2
    );
    remove(&c, "m");
    assert_clean(&c);
}

#[test]
fn killing_the_shim_reports_the_exit_and_delete_cleans_up() {
    let c = Containerd::start("ctr-shimkill");
    // An empty cgroup of this name that an older husk left would be taken
    // over, not created, by the shim (and so not removed by it).
    for h in husk_runtime::host_cgroup::hierarchies() {
        let _ = std::fs::remove_dir(h.join(format!("{NAMESPACE}/victim")));
    }
    let out = c.ctr(&run_args("victim", &["-d"], &["sleep", "1000"]));
    assert!(
        out.status.success(),
        "ctr run -d: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    wait_status(&c, "victim", "RUNNING", Duration::from_secs(10));
    let shims = c.shim_pids();
    assert_eq!(shims.len(), 1, "one shim: {shims:?}");
    assert_eq!(c.vm_pids().len(), 1, "one VM");
    // The task's host cgroup (ctr's cgroupsPath, /<namespace>/<id>), which
    // holds the shim and the VM's helpers.
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", shims[0])).unwrap_or_default();
    let task_cgroup = cgroups
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .find(|p| p.ends_with("/victim"))
        .unwrap_or_else(|| panic!("the shim is not in the task's cgroup: {cgroups}"))
        .to_string();
    let hierarchies = husk_runtime::host_cgroup::hierarchies();
    let cgroup_dirs: Vec<_> = hierarchies
        .iter()
        .map(|h| h.join(task_cgroup.trim_start_matches('/')))
        .filter(|d| d.is_dir())
        .collect();
    assert!(!cgroup_dirs.is_empty(), "no host cgroup {task_cgroup}");
    // SAFETY: kill(2) of the shim this test's containerd started.
    unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) };
    // containerd notices, runs `containerd-shim-husk-v2 delete` and drops the task.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = task_status(&c, "victim");
        if status.is_empty() || status == "STOPPED" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "task still {status} after the shim died; log:\n{}",
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    remove(&c, "victim");
    assert!(c.vm_pids().is_empty(), "the VM died with its shim");
    assert_clean(&c);
    // `shim delete` removed the task's host cgroup too.
    for dir in &cgroup_dirs {
        assert!(
            !dir.exists(),
            "{} left behind; containerd log:\n{}",
            dir.display(),
            c.log_tail()
        );
    }
}

#[test]
fn killing_the_vm_publishes_the_task_exit() {
    let c = Containerd::start("ctr-vmkill");
    let events = Events::watch(&c);
    // Attached to ctr's stdio, so the shim has output streams to drain.
    let mut attached = c
        .ctr_cmd(&run_args(
            "doomed",
            &[],
            &["sh", "-c", "echo started; sleep 1000"],
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr run");
    wait_status(&c, "doomed", "RUNNING", Duration::from_secs(30));
    let vms = c.vm_pids();
    assert_eq!(vms.len(), 1, "one VM: {vms:?}");
    // SAFETY: kill(2) of the VMM this test's shim started.
    unsafe { libc::kill(vms[0] as i32, libc::SIGKILL) };
    let exit = events.wait_for("/tasks/exit", "doomed", Duration::from_secs(10));
    assert!(exit.contains("\"exit_status\":137"), "exit event: {exit}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = attached.try_wait().expect("ctr run") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "ctr run did not return after the VM died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(137), "ctr run's exit status");
    // ctr run deleted the task after its exit; the container remains.
    assert_eq!(task_status(&c, "doomed"), "");
    remove(&c, "doomed");
    assert_clean(&c);
}

#[test]
fn bad_input_gives_clear_errors_and_leaks_nothing() {
    let c = Containerd::start("ctr-bad");
    // A husk config with an unknown key, named by the runtime options.
    let bad = c.dir.path.join("bad.toml");
    std::fs::write(&bad, "hypervisr = \"qemu\"\n").unwrap_or_else(|e| panic!("{e}"));
    let bad_s = bad.display().to_string();
    let out = c.ctr(&run_args(
        "badopt",
        &["--rm", "--runtime-config-path", &bad_s],
        &["true"],
    ));
    assert!(!out.status.success(), "a bad runtime config must fail");
    assert!(
        stderr(&out).contains("hypervisr"),
        "the error names the unknown option: {}",
        stderr(&out)
    );
    let _ = c.ctr(&["containers", "rm", "badopt"]);

    // A runtime config file that does not exist.
    let out = c.ctr(&run_args(
        "nocfg",
        &["--rm", "--runtime-config-path", "/nonexistent/husk.toml"],
        &["true"],
    ));
    assert!(!out.status.success(), "a missing runtime config must fail");
    assert!(
        stderr(&out).contains("/nonexistent/husk.toml"),
        "the error names the file: {}",
        stderr(&out)
    );
    let _ = c.ctr(&["containers", "rm", "nocfg"]);

    // A command that does not exist in the image.
    let out = c.ctr(&run_args("nocmd", &["--rm"], &["/no/such/program"]));
    assert!(!out.status.success(), "a missing executable must fail");
    assert!(
        stderr(&out).contains("/no/such/program"),
        "the error names the program: {}",
        stderr(&out)
    );
    let _ = c.ctr(&["containers", "rm", "nocmd"]);

    // The same id twice: containerd refuses the second, the first runs on.
    let out = c.ctr(&run_args("twice", &["-d"], &["sleep", "1000"]));
    assert!(out.status.success(), "ctr run -d: {}", stderr(&out));
    let out = c.ctr(&run_args("twice", &["-d"], &["sleep", "1000"]));
    assert!(
        !out.status.success(),
        "a second container with the same id must fail"
    );
    assert!(
        stderr(&out).contains("already exists"),
        "error: {}",
        stderr(&out)
    );
    assert_eq!(task_status(&c, "twice"), "RUNNING");
    remove(&c, "twice");

    // The shim binary itself: a delete for a bundle that does not exist.
    let out = Command::new(shim_bin())
        .args([
            "-namespace",
            NAMESPACE,
            "-id",
            "ghost",
            "-bundle",
            "/nonexistent/bundle",
            "delete",
        ])
        .output()
        .expect("running the shim");
    assert!(
        out.status.success(),
        "delete of a missing bundle is a no-op: {}",
        stderr(&out)
    );
    let out = Command::new(shim_bin())
        .args(["-namespace", NAMESPACE, "-id", "ghost", "frobnicate"])
        .output()
        .expect("running the shim");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown action"), "{}", stderr(&out));
    assert_clean(&c);
}

#[test]
fn the_shim_refuses_a_missing_bundle_and_a_duplicate_create() {
    // The shim's task API directly (containerd itself refuses duplicate ids
    // before they reach a shim): start a shim as containerd would, then
    // call Create through `husk-cri shim`.
    let c = Containerd::start("shim-direct");
    let bundle = c.dir.path.join("bundle");
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    husk_tests::write_bundle(&bundle, &husk_tests::default_spec(&["sleep", "1000"]));
    let ttrpc = format!("{}.ttrpc", c.socket.display());
    let out = Command::new(shim_bin())
        .args(["-namespace", NAMESPACE, "-id", "direct", "-address"])
        .arg(&c.socket)
        .args(["-publish-binary", "/bin/true", "start"])
        .current_dir(&bundle)
        .env("TTRPC_ADDRESS", &ttrpc)
        .env("HUSK_SHIM_ROOT", &c.husk_root)
        .output()
        .expect("shim start");
    assert!(out.status.success(), "shim start: {}", stderr(&out));
    let address = stdout(&out).trim().to_string();
    assert!(
        address.starts_with("unix://"),
        "start prints the shim's address: {address:?}"
    );
    let shim = |args: &[&str]| {
        Command::new(cri_bin())
            .arg("shim")
            .arg(&address)
            .args(args)
            .output()
            .expect("husk-cri shim")
    };
    let bundle_s = bundle.display().to_string();

    let out = shim(&["create", "direct", "/nonexistent/bundle"]);
    assert!(
        !out.status.success(),
        "Create with a missing bundle must fail"
    );
    assert!(
        stderr(&out).contains("/nonexistent/bundle") && stderr(&out).contains("does not exist"),
        "{}",
        stderr(&out)
    );
    assert!(c.vm_pids().is_empty(), "no VM for a failed Create");

    let out = shim(&["create", "direct", &bundle_s]);
    assert!(out.status.success(), "Create: {}", stderr(&out));
    assert_eq!(c.vm_pids().len(), 1);
    let out = shim(&["create", "direct", &bundle_s]);
    assert!(
        !out.status.success(),
        "a second Create with the same id must fail"
    );
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert_eq!(c.vm_pids().len(), 1, "the second Create made no VM");

    let out = shim(&["start", "direct"]);
    assert!(out.status.success(), "Start: {}", stderr(&out));
    let out = shim(&["kill", "direct"]);
    assert!(out.status.success(), "Kill: {}", stderr(&out));
    let out = shim(&["wait", "direct"]);
    assert_eq!(stdout(&out).trim(), "137", "Wait: {}", stderr(&out));
    let out = shim(&["delete", "direct"]);
    assert!(out.status.success(), "Delete: {}", stderr(&out));
    let _ = shim(&["shutdown"]);
    assert_clean(&c);
}

#[test]
fn an_oom_kill_is_reported() {
    let c = Containerd::start("ctr-oom");
    let events = Events::watch(&c);
    // 32 MiB limit; the shell holds 100 MB in a variable.
    let out = c.ctr(&run_args(
        "oom",
        &["--rm", "--memory-limit", "33554432"],
        &[
            "sh",
            "-c",
            "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo ${#x}",
        ],
    ));
    assert_eq!(
        out.status.code(),
        Some(137),
        "the OOM-killed pipeline's status: {}\n{}",
        stderr(&out),
        stdout(&out)
    );
    events.wait_for("/tasks/oom", "oom", Duration::from_secs(5));
    assert_clean(&c);
}

/// The pid column of `ctr task ls` for `id`.
fn task_pid(c: &Containerd, id: &str) -> String {
    let out = c.ctr(&["task", "ls"]);
    stdout(&out)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_task_survives_a_containerd_restart() {
    let mut c = Containerd::start("ctr-restart");
    // The trap gives the exit a status of its own, so the test sees that
    // the status, not just "stopped", crosses the restart.
    let out = c.ctr(&run_args(
        "survivor",
        &["-d"],
        &["sh", "-c", "trap 'exit 42' TERM; sleep 1000 & wait"],
    ));
    assert!(
        out.status.success(),
        "ctr run -d: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    wait_status(&c, "survivor", "RUNNING", Duration::from_secs(10));
    let pid = task_pid(&c, "survivor");
    let shims = c.shim_pids();
    let vms = c.vm_pids();
    assert_eq!(shims.len(), 1, "one shim: {shims:?}");
    assert_eq!(vms.len(), 1, "one VM: {vms:?}");

    c.restart();
    // Subscribed to the new containerd: what the shim publishes from now on
    // must reach it.
    let events = Events::watch(&c);
    assert_eq!(task_status(&c, "survivor"), "RUNNING", "after the restart");
    assert_eq!(task_pid(&c, "survivor"), pid, "the same task pid");
    assert_eq!(c.shim_pids(), shims, "the same shim");
    assert_eq!(c.vm_pids(), vms, "the same VM");

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        "survivor",
        "sh",
        "-c",
        "echo exec-after-restart",
    ]);
    assert!(
        out.status.success(),
        "exec after the restart: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    assert_eq!(stdout(&out), "exec-after-restart\n");
    events.wait_for("/tasks/exec-started", "after", Duration::from_secs(5));

    let out = c.ctr(&["task", "kill", "-s", "SIGTERM", "survivor"]);
    assert!(out.status.success(), "kill: {}", stderr(&out));
    // The TaskExit event the shim publishes reaches the new containerd ...
    let exit = events.wait_for(
        "/tasks/exit",
        "\"id\":\"survivor\"",
        Duration::from_secs(10),
    );
    assert!(exit.contains("\"exit_status\":42"), "exit event: {exit}");
    // ... and so does the stopped state with its status.
    wait_status(&c, "survivor", "STOPPED", Duration::from_secs(10));

    // `ctr task delete` reports the status the shim's Delete returns.
    let out = c.ctr(&["task", "delete", "survivor"]);
    assert!(out.status.success(), "task delete: {}", stderr(&out));
    assert!(
        stderr(&out).contains("exit code 42"),
        "task delete reports the status: {}",
        stderr(&out)
    );
    events.wait_for("/tasks/delete", "survivor", Duration::from_secs(5));
    let out = c.ctr(&["containers", "rm", "survivor"]);
    assert!(out.status.success(), "containers rm: {}", stderr(&out));
    assert_clean(&c);
}

/// SIGCONTs a stopped VMM when dropped, so a failed assertion leaves no
/// stopped process behind for the teardown to wait on.
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the VMM this test stopped.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// A stalled guest (its VMM stopped from the host) holds only the requests
/// that ask it something, each until its timeout, never the shim: an exec
/// and a `task ps` fail with an error, while `task ls` (the task's state,
/// which the shim knows without the guest) answers at once throughout.
/// Once the VMM runs again, the task takes an exec again, and the teardown
/// leaves nothing.
#[test]
fn a_stalled_guest_fails_its_own_requests_and_holds_no_lock() {
    let c = Containerd::start("ctr-stall");
    let out = c.ctr(&run_args("stall", &["-d"], &["sleep", "1000"]));
    assert!(
        out.status.success(),
        "ctr run -d: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    wait_status(&c, "stall", "RUNNING", Duration::from_secs(10));
    let exec = |exec_id: &str, word: &str| {
        c.ctr_cmd(&["task", "exec", "--exec-id", exec_id, "stall", "echo", word])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ctr task exec")
    };
    let out = exec("before", "before").wait_with_output().expect("exec");
    assert_eq!(
        stdout(&out),
        "before\n",
        "exec before the stall: {}",
        stderr(&out)
    );

    let vms = c.vm_pids();
    assert_eq!(vms.len(), 1, "one VM: {vms:?}");
    // SAFETY: kill(2) of the VMM this test's shim started.
    unsafe { libc::kill(vms[0] as i32, libc::SIGSTOP) };
    let stopped = Stopped(vms[0]);
    let t0 = Instant::now();
    let stalled_exec = exec("stalled", "never");
    let ps = c
        .ctr_cmd(&["task", "ps", "stall"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr task ps");
    std::thread::sleep(Duration::from_secs(2));
    // Both are in the shim, waiting on the guest; the task's state is not.
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(task_status(&c, "stall"), "RUNNING");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "task ls took {:?} while the guest was stalled",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every call into the guest has a timeout (30 s for an RPC, 5 s for a
    // stream's CONNECT): each fails with an error, well within a minute.
    let out = stalled_exec.wait_with_output().expect("exec");
    assert!(
        !out.status.success() && !stderr(&out).trim().is_empty(),
        "exec in a stalled guest: {:?} {} {}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    assert!(!stdout(&out).contains("never"), "{}", stdout(&out));
    eprintln!("exec in the stalled guest: {}", stderr(&out).trim());
    let out = ps.wait_with_output().expect("ps");
    let waited = t0.elapsed();
    eprintln!(
        "task ps in the stalled guest after {waited:?}: {}",
        stderr(&out).trim()
    );
    assert!(
        !out.status.success() && !stderr(&out).trim().is_empty(),
        "task ps in a stalled guest: {:?} {} {}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    assert!(
        waited < Duration::from_secs(60),
        "the guest's requests took {waited:?} to fail"
    );
    let t = Instant::now();
    assert_eq!(
        task_status(&c, "stall"),
        "RUNNING",
        "after the failed requests; log:\n{}",
        c.log_tail()
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // The guest runs again: so does the task.
    // (An abandoned CONNECT used to cost the vsock backend its worker
    // thread when the guest's late answer came: see park_unanswered.)
    drop(stopped);
    let out = c.ctr(&["task", "ps", "stall"]);
    assert!(
        out.status.success(),
        "task ps after the stall: {}",
        stderr(&out)
    );
    let out = exec("after", "after").wait_with_output().expect("exec");
    assert_eq!(
        stdout(&out),
        "after\n",
        "exec after the stall: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    let out = c.ctr(&["task", "kill", "-s", "SIGKILL", "stall"]);
    assert!(out.status.success(), "kill: {}", stderr(&out));
    wait_status(&c, "stall", "STOPPED", Duration::from_secs(10));
    remove(&c, "stall");
    assert_clean(&c);
}

/// A guest that never answers again can still be torn down: SIGKILL of
/// the task, which the guest cannot be told, stops its VM from the host;
/// the task is reported exited (137) and its deletion leaves nothing.
#[test]
fn a_hung_guest_is_torn_down_by_sigkill() {
    let c = Containerd::start("ctr-hung");
    let out = c.ctr(&run_args("hung", &["-d"], &["sleep", "1000"]));
    assert!(
        out.status.success(),
        "ctr run -d: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    wait_status(&c, "hung", "RUNNING", Duration::from_secs(10));
    let vms = c.vm_pids();
    assert_eq!(vms.len(), 1, "one VM: {vms:?}");
    // SAFETY: kill(2) of the VMM this test's shim started.
    unsafe { libc::kill(vms[0] as i32, libc::SIGSTOP) };
    let _stopped = Stopped(vms[0]);
    let t0 = Instant::now();
    let out = c.ctr(&["task", "kill", "-s", "SIGKILL", "hung"]);
    assert!(
        out.status.success(),
        "kill of a hung guest's task: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    wait_status(&c, "hung", "STOPPED", Duration::from_secs(10));
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the teardown took {:?}",
        t0.elapsed()
    );
    let out = c.ctr(&["task", "ls"]);
    let line = stdout(&out);
    assert!(line.contains("hung"), "{line}");
    assert!(c.vm_pids().is_empty(), "the VM was stopped");
    let out = c.ctr(&["task", "delete", "hung"]);
    assert!(out.status.success(), "task delete: {}", stderr(&out));
    remove(&c, "hung");
    assert_clean(&c);
}

/// OCI `ro` and `rro` on a volume with a tmpfs mounted below it on the
/// host, as runc gives them: `ro` makes the volume read-only and leaves
/// the tmpfs writable; `rro` makes both read-only. (containerd 1.6's CRI
/// never asks for `rro`, so this goes through `ctr run --mount`.)
#[test]
fn ro_volumes_keep_writable_submounts_and_rro_volumes_do_not() {
    let c = Containerd::start("ctr-rro");
    let vol = c.dir.path.join("volume");
    let sub = vol.join("tmpfs");
    std::fs::create_dir_all(&sub).expect("volume dir");
    let sub_path = sub.display().to_string();
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "husk-test", &sub_path])
        .output()
        .expect("mount");
    assert!(mount.status.success(), "mount tmpfs: {}", stderr(&mount));
    let ro = format!("type=bind,src={},dst=/ro,options=rbind:ro", vol.display());
    let rro = format!(
        "type=bind,src={},dst=/rro,options=rbind:ro:rro",
        vol.display()
    );
    let script = "for f in /ro/file /ro/tmpfs/file /rro/file /rro/tmpfs/file; do \
                  if touch $f 2>/dev/null; then echo $f writable; else echo $f read-only; fi; done";
    let out = c.ctr(&run_args(
        "rro",
        &["--rm", "--mount", &ro, "--mount", &rro],
        &["sh", "-c", script],
    ));
    let umount = Command::new("umount")
        .arg(&sub_path)
        .output()
        .expect("umount");
    assert!(
        out.status.success(),
        "ctr run: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        [
            "/ro/file read-only",
            "/ro/tmpfs/file writable",
            "/rro/file read-only",
            "/rro/tmpfs/file read-only",
        ]
    );
    assert_clean(&c);
    // Nothing of husk's kept the host's tmpfs busy.
    assert!(umount.status.success(), "umount: {}", stderr(&umount));
    std::fs::remove_dir(&sub).expect("the tmpfs mount point is removable");
}

/// `ctr run --rm --config` of a whole runtime spec: `spec` with its rootfs
/// at an absolute path (ctr then uses no image and no snapshot).
fn ctr_run_spec(c: &Containerd, id: &str, mut spec: serde_json::Value) -> std::process::Output {
    let rootfs = c.dir.path.join(format!("{id}-rootfs"));
    husk_tests::busybox_rootfs(&rootfs);
    spec["root"] = serde_json::json!({"path": rootfs, "readonly": false});
    let path = c.dir.path.join(format!("{id}.json"));
    std::fs::write(&path, spec.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let config = path.display().to_string();
    c.ctr(&["run", "--runtime", RUNTIME, "--rm", "--config", &config, id])
}

/// The host hooks run under containerd as under the CLI (one supervisor):
/// createRuntime and prestart at create, poststart after start, poststop
/// after delete, in that order, each with the state on stdin; a failing
/// createRuntime hook fails the create and leaves nothing.
#[test]
fn host_hooks_run_in_order_with_the_state_on_stdin() {
    let c = Containerd::start("ctr-hooks");
    let log = c.dir.path.join("hooks.log");
    let hook = |name: &str| serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo {name} $(cat) >> {}", log.display())], "timeout": 10});
    let mut spec = husk_tests::default_spec(&["true"]);
    spec["hooks"] = serde_json::json!({
        "createRuntime": [hook("createRuntime")],
        "prestart": [hook("prestart")],
        "poststart": [hook("poststart")],
        "poststop": [hook("poststop")],
    });
    let out = ctr_run_spec(&c, "hooked", spec);
    assert!(
        out.status.success(),
        "ctr run --config: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let order: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default())
        .collect();
    assert_eq!(
        order,
        ["createRuntime", "prestart", "poststart", "poststop"],
        "{text}"
    );
    for (line, status) in text
        .lines()
        .zip(["created", "created", "running", "stopped"])
    {
        let json = line.split_once(' ').map(|x| x.1).unwrap_or_default();
        let st: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(st["id"], "hooked", "{line}");
        assert_eq!(st["status"], status, "{line}");
        assert!(st["pid"].as_i64().unwrap_or(0) > 0, "{line}");
        assert!(
            st["bundle"]
                .as_str()
                .unwrap_or_default()
                .ends_with("/hooked"),
            "{line}"
        );
    }

    let mut spec = husk_tests::default_spec(&["true"]);
    spec["hooks"] = serde_json::json!({"createRuntime": [{"path": "/bin/false"}]});
    let out = ctr_run_spec(&c, "badhook", spec);
    assert!(
        !out.status.success(),
        "a failing createRuntime hook must fail create"
    );
    assert!(
        stderr(&out).contains("createRuntime hook"),
        "{}",
        stderr(&out)
    );
    let _ = c.ctr(&["containers", "rm", "badhook"]);
    assert_clean(&c);
}

/// `linux.resources.cpu.cpus` sizes the VM under containerd as under the
/// CLI: "2-3" needs four vCPUs, and the container's cpuset is applied.
#[test]
fn cpu_cpus_sizes_the_vm() {
    let c = Containerd::start("ctr-cpuset");
    let mut spec = husk_tests::default_spec(&[
        "sh",
        "-c",
        "echo nproc=$(grep -c ^processor /proc/cpuinfo) cpuset=$(cat /sys/fs/cgroup/cpuset.cpus.effective)",
    ]);
    spec["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(serde_json::json!({"destination": "/sys/fs/cgroup", "type": "cgroup2", "source": "cgroup2"}));
    spec["linux"]["resources"] = serde_json::json!({"cpu": {"cpus": "2-3"}});
    let out = ctr_run_spec(&c, "cpuset", spec);
    assert!(
        out.status.success(),
        "ctr run with cpu.cpus 2-3: {}\n{}",
        stderr(&out),
        c.log_tail()
    );
    assert_eq!(
        stdout(&out).trim(),
        "nproc=4 cpuset=2-3",
        "{}",
        stderr(&out)
    );
    assert_clean(&c);
}
