//! The agent's launcher, in a real microVM: a container sitting in
//! `created` (its child parked before exec, waiting for `start`) holds
//! nothing that the rest of the guest needs. Other containers of the same
//! VM are created, started, exec'd into and end in their normal time, and
//! the agent (the guest's PID 1) keeps reaping meanwhile.

use husk_protocol::agent::{ExecProcessRequest, Stdio as StdioTokens};
use husk_runtime::sandbox::{NewContainer, Sandbox};
use husk_tests::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long any one step may take on this loaded machine (TCG guest, two
/// shared cores); an unloaded one does each in well under a second. A step
/// stalled behind the created container takes as long as it stays created
/// (`HELD`), so it cannot pass.
const STEP_BOUND: Duration = Duration::from_secs(10);

/// How long container A stays created.
const HELD: Duration = Duration::from_secs(30);

/// Runs `step`, failing the test if it errs or takes longer than
/// `STEP_BOUND`.
fn timed<T, E: std::fmt::Display>(what: &str, step: impl FnOnce() -> Result<T, E>) -> T {
    let started = Instant::now();
    let value = step().unwrap_or_else(|e| panic!("{what}: {e}"));
    let took = started.elapsed();
    assert!(
        took < STEP_BOUND,
        "{what} took {took:?} (bound {STEP_BOUND:?}) while another container was created"
    );
    eprintln!("{what}: {took:?}");
    value
}

fn new_container(
    sandbox: &Sandbox,
    dir: &TestDir,
    id: &str,
    spec: &serde_json::Value,
) -> NewContainer {
    let rootfs = dir.path.join(id).join("rootfs");
    busybox_rootfs(&rootfs);
    let rootfs_rel = sandbox
        .share_rootfs(id, &rootfs, None)
        .unwrap_or_else(|e| panic!("sharing the rootfs of {id}: {e}"));
    NewContainer {
        id: id.to_string(),
        spec_json: serde_json::to_vec(spec).unwrap_or_default(),
        rootfs_rel,
        shared_mounts: HashMap::new(),
        stdio: StdioTokens::default(),
        no_pivot: false,
        guest_network_namespace: false,
        bundle: dir.path.join(id),
    }
}

#[test]
fn a_created_container_stalls_nothing_else_in_its_vm() {
    let dir = TestDir::new("launcher-created");
    let mut sandbox = start_sandbox(&dir, "launcher-created");

    // A: created, then left unstarted for `HELD`.
    let a = new_container(&sandbox, &dir, "a", &default_spec(&["sh", "-c", "exit 7"]));
    timed("creating A", || sandbox.create_container(a));
    let a_created = Instant::now();

    // B: no pid namespace of its own, so an orphan of B is re-parented to
    // the guest's PID 1, the agent, which alone can reap it. Its init
    // orphans a `sleep 1` (the subshell that forked it exits at once) and
    // records its pid, then stays up long enough to be exec'd into.
    let mut b_spec = default_spec(&[
        "sh",
        "-c",
        "(sleep 1 & echo $! > /orphan.pid); exec sleep 8",
    ]);
    b_spec["linux"]["namespaces"] = serde_json::json!([
        {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
    ]);
    let b = new_container(&sandbox, &dir, "b", &b_spec);
    timed("creating B", || sandbox.create_container(b));
    timed("starting B", || sandbox.start_container("b"));
    let b_started = Instant::now();

    // The exec looks, from B's view of the guest's pids (B's /proc is the
    // guest's: no pid namespace), for the orphan: once it has exited it is
    // gone only if the agent reaped it; a zombie nobody reaps stays. Exit 0:
    // reaped; 3: still there (a zombie) after 6 s; 4: no pid was recorded.
    let check = serde_json::json!({
        "args": ["sh", "-c", "p=$(cat /orphan.pid); [ -n \"$p\" ] || exit 4; \
            for i in $(seq 60); do [ -e /proc/$p ] || exit 0; sleep 0.1; done; \
            cat /proc/$p/stat; exit 3"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        "terminal": false
    });
    // The orphan sleeps 1 s after B started; the exec's loop covers the rest.
    std::thread::sleep(Duration::from_secs(1));
    let req = ExecProcessRequest {
        container_id: "b".into(),
        exec_id: "reaped".into(),
        process_json: serde_json::to_vec(&check).unwrap_or_default(),
        stdio: Some(StdioTokens::default()).into(),
        ..Default::default()
    };
    timed("exec into B", || sandbox.agent().exec_process(&req));
    let exec_exit = timed("the exec in B ending", || {
        sandbox.wait_process("b", "reaped")
    });
    assert_eq!(
        exec_exit.exit_code, 0,
        "the orphan of B was not reaped by the agent while A sat in created \
         (3: a zombie stayed, 4: no pid recorded): {exec_exit:?}"
    );

    // B's init ends on its own (sleep 8) and is reported at once.
    let b_exit = sandbox
        .wait_process("b", "")
        .unwrap_or_else(|e| panic!("waiting for B: {e}"));
    let b_ran = b_started.elapsed();
    assert_eq!(b_exit.exit_code, 0, "B's exit: {b_exit:?}");
    assert!(
        b_ran < Duration::from_secs(8) + STEP_BOUND,
        "B (sleep 8) ended after {b_ran:?}"
    );
    timed("removing B", || {
        sandbox.agent().remove_container("b", false)
    });

    // A stayed created all along; now it starts and runs normally.
    let held = a_created.elapsed();
    if held < HELD {
        std::thread::sleep(HELD - held);
    }
    let a_pid = timed("starting A", || sandbox.start_container("a"));
    assert!(a_pid > 0, "A's pid {a_pid}");
    let a_exit = timed("A ending", || sandbox.wait_process("a", ""));
    assert_eq!(a_exit.exit_code, 7, "A's exit: {a_exit:?}");
    timed("removing A", || {
        sandbox.agent().remove_container("a", false)
    });

    for id in ["a", "b"] {
        sandbox
            .unshare_container(id)
            .unwrap_or_else(|e| panic!("unsharing {id}: {e}"));
    }
    sandbox.shutdown().expect("shutdown");
    assert_eq!(
        leftovers_settled(&dir.path, &dir.state_root()),
        Vec::<String>::new()
    );
}
