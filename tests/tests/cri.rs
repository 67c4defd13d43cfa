//! Kubernetes pods through containerd's CRI plugin with the `husk` runtime
//! handler: one VM per pod, the pod's containers sharing its network
//! namespace and a volume, everything gone after stop and remove.

use husk_tests::containerd::*;
use husk_tests::{stderr, stdout};
use std::time::{Duration, Instant};

fn ok(out: std::process::Output, what: &str, c: &Containerd) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\ncontainerd log:\n{}",
        stderr(&out),
        c.log_tail()
    );
    stdout(&out).trim().to_string()
}

fn wait_for_file(path: &std::path::Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never contained {needle:?}; it has: {text:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_pod_is_one_vm_whose_containers_share_loopback_and_a_volume() {
    let c = Containerd::start("cri-pod");
    let logs = c.dir.path.join("pod-logs");
    let vol = c.dir.path.join("volume");
    std::fs::create_dir_all(&logs).expect("log dir");
    std::fs::create_dir_all(&vol).expect("volume dir");
    let log_dir = format!("log-dir={}", logs.display());
    // The pod's cgroup parent, as kubelet gives one (cgroupfs layout).
    let parent = format!("/husk-test-cri-{}", std::process::id());
    let parent_arg = format!("cgroup-parent={parent}");
    let out = c.cri(&["version"]);
    assert!(
        stdout(&out).contains("containerd"),
        "CRI version: {} {}",
        stdout(&out),
        stderr(&out)
    );

    let pod = ok(
        c.cri(&[
            "runp",
            "name=web",
            "uid=uid-1",
            "ns=default",
            &log_dir,
            "handler=husk",
            &parent_arg,
        ]),
        "RunPodSandbox",
        &c,
    );
    assert_eq!(c.vm_pids().len(), 1, "the pod's VM");
    // The pod's host processes are in the pod's cgroup (what kubelet
    // accounts), bounded by the VM's memory plus the host overhead.
    let pod_cgroup = format!("{parent}/{pod}");
    let vm = c.vm_pids()[0];
    for pid in [vm, c.shim_pids()[0]] {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(
            cgroups.lines().any(|l| l.ends_with(&pod_cgroup)),
            "{pid} is not in {pod_cgroup}: {cgroups}"
        );
    }
    let vm_cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{vm}/cmdline")).unwrap_or_default())
            .split('\0')
            .map(str::to_string)
            .collect::<Vec<_>>();
    let vm_mib: u64 = vm_cmdline
        .iter()
        .position(|a| a == "-m" || a == "--memory-mib")
        .and_then(|i| vm_cmdline.get(i + 1))
        .and_then(|m| m.trim_end_matches('M').parse().ok())
        .expect("the VM's memory size");
    let hierarchies = husk_runtime::host_cgroup::hierarchies();
    let host_file = |file: &str| husk_tests::host_cgroup_file(&pod_cgroup, file);
    let limit = host_file("memory.limit_in_bytes")
        .or_else(|| host_file("memory.max"))
        .expect("no memory controller on the pod's cgroup");
    assert_eq!(limit, ((vm_mib + 256) << 20).to_string());
    assert_eq!(host_file("pids.max").as_deref(), Some("1024"));

    let pod_arg = format!("pod={pod}");
    let mount = format!("mount={}:/vol", vol.display());
    let common = [
        "name=web",
        "uid=uid-1",
        "ns=default",
        &log_dir,
        "image=docker.io/library/husk-busybox:latest",
        &mount,
    ];
    let create = |cname: &str, cmd: &str| {
        let mut args = vec!["create", &pod_arg];
        args.extend_from_slice(&common);
        let cname_arg = format!("cname={cname}");
        let log_arg = format!("log={cname}.log");
        args.push(&cname_arg);
        args.push(&log_arg);
        args.extend_from_slice(&["--", "sh", "-c", cmd]);
        ok(c.cri(&args), "CreateContainer", &c)
    };
    // The guest agent does not bring up `lo` in a new network namespace
    // yet, so the server does (once, for the whole pod: the namespace is
    // shared). The client can only reach it if both share the pod's netns.
    let server = create(
        "server",
        "ip link set lo up && echo hello-from-server > /vol/shared && \
         while :; do echo pong-over-loopback | nc -l -p 8080; done",
    );
    ok(c.cri(&["start", &server]), "StartContainer server", &c);
    let client = create(
        "client",
        "while [ ! -e /vol/shared ]; do sleep 0.2; done; cat /vol/shared; \
         nc 127.0.0.1 8080 </dev/null; echo client-wrote > /vol/from-client; sleep 1000",
    );
    ok(c.cri(&["start", &client]), "StartContainer client", &c);

    // The client's log (written by containerd from the shim's stdout) shows
    // what it read from the shared volume and over the pod's loopback.
    let client_log = logs.join("client.log");
    wait_for_file(&client_log, "hello-from-server", Duration::from_secs(30));
    wait_for_file(&client_log, "pong-over-loopback", Duration::from_secs(30));
    wait_for_file(
        &vol.join("from-client"),
        "client-wrote",
        Duration::from_secs(10),
    );
    assert_eq!(
        c.vm_pids().len(),
        1,
        "three containers (pause, server, client), one VM"
    );
    assert_eq!(c.shim_pids().len(), 1, "one shim serves the pod");

    // ExecSync in a pod container: output and exit code.
    let out = c.cri(&[
        "exec",
        &client,
        "--",
        "sh",
        "-c",
        "echo exec-in-pod; exit 5",
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "ExecSync exit code: {}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "exec-in-pod\n");

    // UpdateContainerResources reaches the container's guest cgroup.
    ok(
        c.cri(&["update", &client, "memory=52428800"]),
        "UpdateContainerResources",
        &c,
    );
    let out = std::process::Command::new("ctr")
        .arg("-a")
        .arg(&c.socket)
        .args(["-n", "k8s.io", "task", "metrics", &client])
        .output()
        .expect("ctr task metrics");
    let metrics = stdout(&out);
    assert!(
        metrics.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["memory.usage_limit", "52428800"]),
        "metrics after the update: {metrics}{}",
        stderr(&out)
    );

    for id in [&client, &server] {
        ok(c.cri(&["stop", id, "2"]), "StopContainer", &c);
        let status = ok(c.cri(&["status", id]), "ContainerStatus", &c);
        assert!(
            status.starts_with("CONTAINER_EXITED"),
            "status after stop: {status}"
        );
        ok(c.cri(&["rm", id]), "RemoveContainer", &c);
    }
    ok(c.cri(&["stopp", &pod]), "StopPodSandbox", &c);
    ok(c.cri(&["rmp", &pod]), "RemovePodSandbox", &c);
    // The pod's cgroup went with the pod (the parent is kubelet's: ours here).
    let deadline = Instant::now() + Duration::from_secs(10);
    while hierarchies
        .iter()
        .any(|h| h.join(pod_cgroup.trim_start_matches('/')).exists())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    for h in &hierarchies {
        let dir = h.join(pod_cgroup.trim_start_matches('/'));
        assert!(!dir.exists(), "{} left behind", dir.display());
        let _ = std::fs::remove_dir(h.join(parent.trim_start_matches('/')));
    }
    assert_eq!(
        c.leftovers_settled(),
        Vec::<String>::new(),
        "after the pod was removed; log:\n{}",
        c.log_tail()
    );
    assert!(c.vm_pids().is_empty(), "the VM went with the pod");
}

#[test]
fn two_pods_are_two_vms() {
    let c = Containerd::start("cri-two");
    let logs = c.dir.path.join("pod-logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let log_dir = format!("log-dir={}", logs.display());
    let a = ok(
        c.cri(&["runp", "name=a", "uid=uid-a", "ns=default", &log_dir]),
        "RunPodSandbox a",
        &c,
    );
    let b = ok(
        c.cri(&["runp", "name=b", "uid=uid-b", "ns=default", &log_dir]),
        "RunPodSandbox b",
        &c,
    );
    assert_eq!(c.vm_pids().len(), 2, "one VM per pod");
    assert_eq!(c.shim_pids().len(), 2, "one shim per pod");
    for pod in [&a, &b] {
        ok(c.cri(&["stopp", pod]), "StopPodSandbox", &c);
        ok(c.cri(&["rmp", pod]), "RemovePodSandbox", &c);
    }
    assert_eq!(
        c.leftovers_settled(),
        Vec::<String>::new(),
        "after the pods were removed; log:\n{}",
        c.log_tail()
    );
}
