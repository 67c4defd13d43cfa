#!/usr/bin/env python3
"""husk benchmarks, side by side with their references in the same run.

Prints medians over N runs (default 10, HUSK_BENCH_RUNS) and ratios:
  1. boot to agent ready: husk (QEMU/TCG here) vs a bare qemu-system-x86_64
     booting the same kernel with a busybox /init that reports and powers off;
  2. `run` of busybox `true` (create, start, exit, delete): husk vs runc vs crun,
     and vs the bare boot;
  3. exec latency into a running container, stdout and stdin throughput:
     husk vs runc, and vs the raw vsock of the same VM (the agent's sink and
     source streams) in both directions;
  4. husk-vmm start-up to its first vCPU entry and its RSS before the guest
     touches RAM (Firecracker publishes ~12 ms and <= 5 MiB);
  5. containerd (issue 5), on a private containerd set up as the tests set it
     up: `ctr run --rm ... true` with the husk shim vs the runc shim, a CRI pod
     start to a running container with the `husk` vs the `runc` handler, and
     the PSS of one idle pod's host processes (the RuntimeClass overhead);
  6. networking (issue 14), in namespaces the bench makes and removes: TCP
     throughput both ways and 1-byte request/response latency from a
     container to a peer namespace (husk-net-bench, the same static tool
     everywhere), runc vs husk vs a bare QEMU of the same kernel on a tap
     joined with the same tc redirects; and husk create with vs without a
     network namespace path;
  7. the warm pool (issue 10): `husk run true`, `ctr run --rm true` and a CRI
     pod start with a sandbox claimed from `husk pool serve`, beside cold
     boots and runc in the same run, and the time from a claim to the pool
     full again (the refill).

Sections: `python3 bench/run.py [boot] [run] [exec] [vmm] [containerd] [network] [pool]`
(`make bench BENCH=containerd`); none named runs them all.
"""
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUSK = os.path.join(ROOT, "target/release/husk")
VMM = os.path.join(ROOT, "target/release/husk-vmm")
KERNEL = os.path.join(ROOT, "target/guest/vmlinux")
# husk's TCG settings (runtime/src/hypervisor/qemu.rs, TCG_ACCEL), which
# every bare QEMU reference here runs with too.
TCG_ACCEL = "tcg,tb-size=64"
SHIM = os.path.join(ROOT, "target/release/containerd-shim-husk-v2")
CRI = os.path.join(ROOT, "target/release/husk-cri")
VSOCK_BENCH = os.path.join(ROOT, "target/release/husk-vsock-bench")
RUNS = int(os.environ.get("HUSK_BENCH_RUNS", "10"))
WORK = tempfile.mkdtemp(prefix="husk-bench-")
RESULTS = {}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def report(name, unit, values, ref=None, ref_name=None):
    m = median(values)
    line = f"  {name:<44} median {m:9.1f} {unit}  (n={len(values)}, min {min(values):.1f}, max {max(values):.1f})"
    if ref is not None:
        line += f"   ratio vs {ref_name}: {m / ref:.2f}x"
    print(line, flush=True)
    RESULTS[name] = m
    return m


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def ensure_packages():
    missing = [p for p in ("runc", "crun") if shutil.which(p) is None]
    if missing:
        print(f"installing reference runtimes: {' '.join(missing)}", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def busybox_bundle(name, args):
    b = os.path.join(WORK, name)
    os.makedirs(b)
    sh([os.path.join(ROOT, "scripts/busybox-rootfs.sh"), os.path.join(b, "rootfs")])
    spec = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "bench",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}, {"type": "network"}]},
    }
    with open(os.path.join(b, "config.json"), "w") as f:
        json.dump(spec, f)
    return b


def bare_initramfs():
    stage = os.path.join(WORK, "bare-initramfs")
    os.makedirs(os.path.join(stage, "bin"))
    os.makedirs(os.path.join(stage, "dev"))
    shutil.copy("/bin/busybox", os.path.join(stage, "bin/busybox"))
    with open(os.path.join(stage, "init"), "w") as f:
        f.write("#!/bin/busybox sh\n/bin/busybox echo BARE-READY\n/bin/busybox reboot -f\n")
    os.chmod(os.path.join(stage, "init"), 0o755)
    os.mknod(os.path.join(stage, "dev/console"), 0o600 | 0o020000, os.makedev(5, 1))
    out = os.path.join(WORK, "bare-initramfs.img")
    sh(["sh", "-c", f"cd {stage} && find . | cpio -o -H newc --quiet | gzip -1 > {out}"])
    return out


def tsc_khz():
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return 2000000


def bare_boot_ms(initramfs):
    """Spawn of QEMU to the /init marker on the serial console, host clock:
    the same CPU model as husk under TCG (runtime/src/hypervisor/qemu.rs, TCG_CPU),
    the same machine type, memory and kernel as a husk sandbox, no devices."""
    cmd = ["qemu-system-x86_64", "-M", "microvm,acpi=off,x-option-roms=off", "-accel", TCG_ACCEL,
           "-cpu", "max,-erms,-fsrm", "-m", "128M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
           "-serial", "stdio", "-kernel", KERNEL, "-initrd", initramfs,
           # The kernel parameters husk's guests boot with (runtime/src/sandbox.rs).
           "-append", f"console=ttyS0 reboot=t panic=-1 quiet no_timer_check rcupdate.rcu_expedited=1 acpi=off tsc_early_khz={tsc_khz()} noapictimer"]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    ready = None
    for line in p.stdout:
        if b"BARE-READY" in line:
            ready = (time.monotonic() - t0) * 1000
            break
    p.wait()
    if ready is None:
        sys.exit("bench: the bare guest never printed its marker")
    return ready


def husk_check():
    out = sh([HUSK, "--root", os.path.join(WORK, "husk-root"), "check", "--format", "json"])
    return json.loads(out.stdout)["timings"]


def timed(cmd, **kw):
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    return (time.monotonic() - t0) * 1000


def crun_cmd(args):
    # crun 1.8 refuses hybrid cgroups unless the cgroup2 mount is out of sight.
    return ["unshare", "-m", "sh", "-c", "umount /sys/fs/cgroup/unified 2>/dev/null; exec crun " + " ".join(args)]


def section_boot():
    print("\n== 1. boot to agent ready (issue 2; goal: husk adds at most 20% to the bare boot)")
    initramfs = bare_initramfs()
    bare, host, guest, total = [], [], [], []
    for _ in range(RUNS):
        bare.append(bare_boot_ms(initramfs))
        t = husk_check()
        host.append(t["vmm_spawn_to_agent_ms"])
        guest.append(t["kernel_boot_to_agent_ms"])
        total.append(t["total_start_ms"])
    b = report("bare QEMU: spawn to /init marker", "ms", bare)
    report("husk check: VMM spawn to agent answering", "ms", host, b, "bare boot")
    report("husk check: whole sandbox start (+backends)", "ms", total, b, "bare boot")
    report("husk guest clock: kernel start to agent", "ms", guest)
    return b


def read_phases(log):
    """The `phase <operation> <clock> <step> <ms> ms` lines `husk --debug`
    logs (runtime/src/phases.rs): {(operation, clock, step): ms}, summed
    when a step repeats."""
    steps = {}
    with open(log) as f:
        for line in f:
            i = line.find("phase ")
            if i < 0:
                continue
            text = line[i + len("phase "):].rstrip().rstrip('"')
            if not text.endswith(" ms"):
                continue
            head, ms = text[:-3].rsplit(" ", 1)
            op, clock, name = head.split(" ", 2)
            key = (op, clock, name)
            steps[key] = steps.get(key, 0.0) + float(ms)
    return steps


def phase_table(title, runs, order=("run", "create", "start", "exit", "delete", "exec")):
    """Prints the median of each step over `runs` (dicts from read_phases),
    the host's and the guest's clock side by side, and records them."""
    keys = []
    for r in runs:
        for k in r:
            if k not in keys:
                keys.append(k)
    keys.sort(key=lambda k: order.index(k[0]) if k[0] in order else len(order))
    print(f"  {title} (median of {len(runs)}; guest steps run inside the host step above them):")
    for op, clock, name in keys:
        vals = [r[(op, clock, name)] for r in runs if (op, clock, name) in r]
        m = median(vals)
        print(f"    {op:<7}{clock:<6}{name:<48}{m:9.2f} ms", flush=True)
        RESULTS[f"phase {title}: {op} {clock} {name.strip()}"] = m


def section_run(bare):
    print("\n== 2. run busybox `true`: create, start, exit, delete (issue 3)")
    b = busybox_bundle("true", ["true"])
    root = os.path.join(WORK, "run-root")
    husk_t, runc_t, crun_t, phases = [], [], [], []
    for i in range(RUNS):
        log = os.path.join(WORK, f"run-{i}.log")
        # --debug logs the phases; what it costs is in the figure.
        husk_t.append(timed([HUSK, "--root", root, "--debug", "--log", log, "run", "-b", b, f"h{i}"]))
        phases.append(read_phases(log))
        runc_t.append(timed(["runc", "--root", os.path.join(WORK, "runc-root"), "run", "-b", b, f"r{i}"]))
        crun_t.append(timed(crun_cmd(["--root", os.path.join(WORK, "crun-root"), "run", "-b", b, f"c{i}"])))
    r = report("runc run true", "ms", runc_t)
    report("crun run true", "ms", crun_t, r, "runc")
    h = report("husk run true", "ms", husk_t, r, "runc")
    vs_bare = f";  vs the bare boot: {h / bare:.2f}x" if bare else ""
    print(f"  {'husk run true vs crun':<44} ratio {h / median(crun_t):.2f}x{vs_bare}")
    phase_table("cold husk run true", phases)


def section_exec_and_stdout():
    print("\n== 3. exec latency and stdout throughput (issue 3)")
    b = busybox_bundle("sleeper", ["sleep", "3600"])
    hroot = os.path.join(WORK, "exec-root")
    rroot = os.path.join(WORK, "runc-exec-root")
    subprocess.run([HUSK, "--root", hroot, "run", "-d", "-b", b, "ex"], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["runc", "--root", rroot, "run", "-d", "-b", b, "rex"], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        he, exec_phases = [], []
        for i in range(RUNS):
            log = os.path.join(WORK, f"exec-{i}.log")
            he.append(timed([HUSK, "--root", hroot, "--debug", "--log", log, "exec", "ex", "true"]))
            exec_phases.append(read_phases(log))
        re_ = [timed(["runc", "--root", rroot, "exec", "rex", "true"]) for _ in range(RUNS)]
        r = report("runc exec true", "ms", re_)
        h = report("husk exec true", "ms", he, r, "runc")
        phase_table("husk exec true", exec_phases)
        # The reference: fork+exec+wait of `true` in the same VM,
        # on the guest's clock (busybox `time` in the container), less the
        # loop's own cost (the same loop with the builtin `:`), per run;
        # and one RPC's round trip: the host's ExecProcess time less the
        # guest's steps inside it.
        loops = 200

        def guest_loop(body):
            p = subprocess.run([HUSK, "--root", hroot, "exec", "ex", "time", "-p", "sh", "-c",
                                f"i=0; while [ $i -lt {loops} ]; do {body}; i=$((i+1)); done"],
                               check=True, capture_output=True, text=True)
            for line in p.stderr.splitlines():
                if line.startswith("real"):
                    return float(line.split()[1]) * 1000 / loops
            sys.exit(f"bench: no time from the guest: {p.stderr!r}")
        fork_exec = [guest_loop("/bin/true") - guest_loop(":") for _ in range(max(3, RUNS // 3))]
        fe = report("guest: fork+exec+wait of /bin/true", "ms", fork_exec)
        rtt = [sum(v for (op, clock, _), v in p.items() if op == "exec" and clock == "host" and _ == "ExecProcess RPC")
               - sum(v for (op, clock, _), v in p.items() if op == "exec" and clock == "guest")
               for p in exec_phases]
        rpc = report("one RPC round trip (ExecProcess less guest)", "ms", rtt)
        goal = 2 * fe + rpc
        print(f"  {'husk exec true vs 2x fork+exec+wait + RPC':<44} {h:.1f} ms vs {goal:.1f} ms: "
              f"{h / goal:.2f}x the goal's budget", flush=True)
        size = 256 << 20
        n = max(3, RUNS // 3)

        def throughput(cmd):
            t0 = time.monotonic()
            p = subprocess.run(cmd, check=True, capture_output=True)
            dt = time.monotonic() - t0
            # Checked, not only counted: the stream carries /dev/zero.
            assert len(p.stdout) == size and p.stdout.count(0) == size, len(p.stdout)
            return size / dt / (1 << 20)
        cat = ["dd", "if=/dev/zero", "bs=1M", f"count={size >> 20}", "status=none"]
        ht = [throughput([HUSK, "--root", hroot, "exec", "ex", *cat]) for _ in range(n)]
        rt = [throughput(["runc", "--root", rroot, "exec", "rex", *cat]) for _ in range(n)]
        r = report("runc exec: 256 MiB of stdout", "MiB/s", rt)
        report("husk exec: 256 MiB of stdout", "MiB/s", ht, r, "runc")

        # stdin: 256 MiB of random bytes into dd reading whole 1 MiB blocks
        # (a checksum or `wc` in an emulated guest measures its CPU, not the
        # stream); "256+0 records in" proves no byte was lost or added.
        data = os.urandom(size)

        def stdin_throughput(cmd):
            t0 = time.monotonic()
            p = subprocess.run(cmd, check=True, capture_output=True, input=data)
            dt = time.monotonic() - t0
            assert f"{size >> 20}+0 records in".encode() in p.stderr, p.stderr
            return size / dt / (1 << 20)
        sink = ["dd", "of=/dev/null", "bs=1M", "iflag=fullblock"]
        hi = [stdin_throughput([HUSK, "--root", hroot, "exec", "ex", *sink]) for _ in range(n)]
        ri = [stdin_throughput(["runc", "--root", rroot, "exec", "rex", *sink]) for _ in range(n)]
        r = report("runc exec: 256 MiB of stdin", "MiB/s", ri)
        report("husk exec: 256 MiB of stdin", "MiB/s", hi, r, "runc")

        # The raw vsock of the same VM in the same run: the agent's sink and
        # source streams, the same connections stdio takes, without a process.
        uds = os.path.join(hroot, "sandbox", "ex", "vsock.sock")

        def raw(direction):
            p = subprocess.run([VSOCK_BENCH, uds, direction, str(size)], check=True, capture_output=True, text=True)
            return float(p.stdout)
        raw_from = report("raw vsock guest->host (source stream)", "MiB/s", [raw("from-guest") for _ in range(n)])
        raw_to = report("raw vsock host->guest (sink stream)", "MiB/s", [raw("to-guest") for _ in range(n)])
        report("husk exec stdout vs raw vsock guest->host", "MiB/s", ht, raw_from, "raw vsock")
        report("husk exec stdin vs raw vsock host->guest", "MiB/s", hi, raw_to, "raw vsock")

        # Checksummed, both directions, with bytes that are not all alike: a
        # random file of the bundle's rootfs (virtiofs) out through `cat`'s
        # stdout, and random bytes in through stdin into a file the host then
        # reads back from the same rootfs. Not timed (virtiofs is in the way).
        check = 64 << 20
        blob = os.urandom(check)
        with open(os.path.join(b, "rootfs", "bench-out.bin"), "wb") as f:
            f.write(blob)
        out = subprocess.run([HUSK, "--root", hroot, "exec", "ex", "cat", "/bench-out.bin"],
                             check=True, capture_output=True).stdout
        assert hashlib.sha256(out).digest() == hashlib.sha256(blob).digest(), \
            f"stdout: {len(out)} bytes back of {check}, sha256 differs"
        subprocess.run([HUSK, "--root", hroot, "exec", "ex", "sh", "-c", "cat > /bench-in.bin"],
                       check=True, capture_output=True, input=blob)
        with open(os.path.join(b, "rootfs", "bench-in.bin"), "rb") as f:
            back = f.read()
        assert hashlib.sha256(back).digest() == hashlib.sha256(blob).digest(), \
            f"stdin: {len(back)} bytes arrived of {check}, sha256 differs"
        print(f"  stdout and stdin: {check >> 20} MiB of random bytes each way, sha256 equal", flush=True)
    finally:
        subprocess.run([HUSK, "--root", hroot, "delete", "-f", "ex"], capture_output=True)
        subprocess.run(["runc", "--root", rroot, "delete", "-f", "rex"], capture_output=True)


def section_vmm():
    print("\n== 4. husk-vmm start-up (issue 6; Firecracker publishes ~12 ms to VMM ready, <= 5 MiB overhead)")
    if not os.path.exists(VMM):
        print("  husk-vmm not built")
        return
    startup, rss, own = [], [], []
    for _ in range(RUNS):
        p = subprocess.Popen([VMM, "--kernel", KERNEL, "--memory-mib", "128", "--console", "/dev/null"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = None
        try:
            for l in p.stderr:
                if "metrics" in l:
                    line = l
                    break
        finally:
            p.kill()
            p.wait()
        if line:
            fields = dict(kv.split("=") for kv in line.split() if "=" in kv)
            startup.append(int(fields["startup_us"]) / 1000)
            rss.append(int(fields["rss_kib"]) / 1024)
            own.append(int(fields["vmm_kib"]) / 1024)
    if startup:
        report("husk-vmm: process start to first KVM_RUN", "ms", startup, 12.0, "Firecracker's 12 ms")
        report("husk-vmm: own memory (RSS less guest RAM)", "MiB", own, 5.0, "Firecracker's 5 MiB")
        report("husk-vmm: RSS incl. loaded kernel+initrd", "MiB", rss)

CTR_NS = "bench"
CTR_IMAGE = "docker.io/library/husk-busybox:latest"


def pids_with(marker):
    """Live processes whose command line contains `marker`."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmdline = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            state = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(d))
    return found


def descendants(root):
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def smaps_rollup(pid):
    """PSS, RSS and private (USS) memory of a process in kB, or None."""
    fields = {}
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    except OSError:
        return None
    if "Pss" not in fields:
        return None
    return {"pss": fields["Pss"], "rss": fields.get("Rss", 0),
            "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def proc_name(pid):
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).replace(" (deleted)", "")
    except OSError:
        return "?"


class Containerd:
    """A private containerd set up as tests/src/containerd.rs does it: the
    same scripts (containerd-test-setup.sh for the packages and the image
    tarball, containerd-test-config.sh for the configuration), the husk shim
    first on its PATH."""

    def __init__(self):
        cache = os.path.join(ROOT, "target/containerd-test")
        sh([os.path.join(ROOT, "scripts/containerd-test-setup.sh"), cache])
        self.dir = os.path.join(WORK, "containerd")
        os.makedirs(self.dir)
        sh([os.path.join(ROOT, "scripts/containerd-test-config.sh"), self.dir])
        self.socket = os.path.join(self.dir, "containerd.sock")
        self.husk_root = os.path.join(self.dir, "husk")
        env = {**os.environ, "PATH": f"{os.path.dirname(SHIM)}:{os.environ.get('PATH', '')}",
               "HUSK_SHIM_ROOT": self.husk_root}
        self.log = open(os.path.join(self.dir, "containerd.log"), "w")
        self.proc = subprocess.Popen(["containerd", "--config", os.path.join(self.dir, "config.toml")],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while subprocess.run(self.ctr("version"), capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit(f"bench: containerd did not come up; see {self.log.name}")
            time.sleep(0.1)
        for ns in (CTR_NS, "k8s.io"):
            sh(["ctr", "-a", self.socket, "-n", ns, "images", "import", os.path.join(cache, "images.tar")])

    def ctr(self, *args):
        return ["ctr", "-a", self.socket, "-n", CTR_NS, *args]

    def cri(self, *args):
        p = subprocess.run([CRI, self.socket, *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"husk-cri {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout.strip()

    def shim_pid(self, binary):
        pids = [p for p in pids_with(self.socket) if binary in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")]
        return pids[0] if len(pids) == 1 else None

    def stop(self):
        # Shims first (a husk shim takes its VM with it), then containerd.
        for pid in pids_with(self.socket):
            if pid != self.proc.pid:
                subprocess.run(["kill", "-9", str(pid)], capture_output=True)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        time.sleep(0.3)


def cri_pod(c, handler, name, cmd):
    """RunPodSandbox + CreateContainer + StartContainer, then ContainerStatus
    until the container runs. Returns (ms, pod id)."""
    logs = os.path.join(c.dir, "pod-logs", name)
    os.makedirs(logs, exist_ok=True)
    meta = [f"name={name}", f"uid=uid-{name}", "ns=bench", f"log-dir={logs}"]
    t0 = time.monotonic()
    pod = c.cri("runp", *meta, f"handler={handler}")
    cid = c.cri("create", f"pod={pod}", *meta, "cname=app", f"image={CTR_IMAGE}", "log=app.log", "--", *cmd)
    c.cri("start", cid)
    deadline = time.monotonic() + 60
    while c.cri("status", cid).split()[0] != "CONTAINER_RUNNING":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{handler} pod {name}: container {cid} never ran")
        time.sleep(0.005)
    return (time.monotonic() - t0) * 1000, pod


def remove_pod(c, pod):
    c.cri("stopp", pod)
    c.cri("rmp", pod)


def pod_memory(c, binary, marker=None, samples=5):
    """Memory of a pod's host processes: its shim and everything below it,
    and any other process naming `marker` (husk: the VMs' directory). Per
    process, the median of `samples` readings a second apart of PSS, RSS and
    USS. PSS splits a shared page among the processes that map it, also
    other pods' (and other users' QEMUs): USS <= PSS <= RSS bound it."""
    shim = c.shim_pid(binary)
    if shim is None:
        raise RuntimeError(f"no single {binary} for the pod")
    readings = {}
    for _ in range(samples):
        pids = set(descendants(shim)) | set(pids_with(marker) if marker else [])
        for pid in pids:
            m = smaps_rollup(pid)
            if m is not None:
                readings.setdefault(pid, []).append(m)
        time.sleep(1)
    return {pid: (proc_name(pid), {k: median([m[k] for m in ms]) for k in ("pss", "rss", "uss")})
            for pid, ms in sorted(readings.items())}


def section_containerd():
    print("\n== 5. containerd (issue 5): the husk shim vs runc's on the same private containerd")
    for f in (SHIM, CRI):
        if not os.path.exists(f):
            sys.exit(f"bench: {f} is missing: run make build")
    c = Containerd()
    try:
        husk_t, runc_t = [], []
        for i in range(RUNS):
            for runtime, ts, name in (("io.containerd.husk.v2", husk_t, f"h{i}"), ("io.containerd.runc.v2", runc_t, f"r{i}")):
                ts.append(timed(c.ctr("run", "--rm", "--runtime", runtime, CTR_IMAGE, name, "true"),
                                stdin=subprocess.DEVNULL))
        r = report("ctr run --rm true: runc shim", "ms", runc_t)
        report("ctr run --rm true: husk shim", "ms", husk_t, r, "runc")

        husk_p, runc_p = [], []
        for i in range(RUNS):
            for handler, ts in (("husk", husk_p), ("runc", runc_p)):
                ms, pod = cri_pod(c, handler, f"{handler}-{i}", ["sleep", "3600"])
                ts.append(ms)
                remove_pod(c, pod)
        r = report("CRI pod start to running: runc handler", "ms", runc_p)
        report("CRI pod start to running: husk handler", "ms", husk_p, r, "runc")

        # One idle pod each: the pause container and an idle busybox.
        print("  memory of one idle pod's host processes (/proc/PID/smaps_rollup, median of 5 readings), kB:")
        print(f"    {'':<6}{'process':<28}{'pid':<9}{'PSS':>9}{'RSS':>10}{'USS':>10}")
        totals = {}
        for handler, binary, marker in (("runc", "containerd-shim-runc-v2", None),
                                        ("husk", "containerd-shim-husk-v2", c.husk_root)):
            _, pod = cri_pod(c, handler, f"{handler}-idle", ["sleep", "3600"])
            time.sleep(5)  # let the guest settle
            try:
                procs = pod_memory(c, binary, marker)
            finally:
                remove_pod(c, pod)
            for pid, (name, m) in procs.items():
                print(f"    {handler + ':':<6}{name:<28}{pid:<9}{m['pss']:9,.0f}{m['rss']:10,.0f}{m['uss']:10,.0f}",
                      flush=True)
                RESULTS[f"{handler} pod PSS kB: {name} (pid {pid})"] = m["pss"]
            total = {k: sum(m[k] for _, m in procs.values()) for k in ("pss", "rss", "uss")}
            totals[handler] = total["pss"]
            print(f"    {handler + ':':<6}{'total':<37}{total['pss']:9,.0f}{total['rss']:10,.0f}{total['uss']:10,.0f}"
                  f"   (PSS {total['pss'] / 1024:.1f} MiB)", flush=True)
            for k, v in total.items():
                RESULTS[f"{handler} pod {k.upper()} total kB"] = v
        print(f"  {'husk pod PSS vs runc pod':<44} ratio {totals['husk'] / totals['runc']:.1f}x")
    finally:
        c.stop()

NET_BENCH = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/husk-net-bench")
NET_PORT = 5201
NET_STREAM_BYTES = 256 << 20
NET_RR_COUNT = 2000
# The peer namespace's bridge, and each client's address on it.
NET_PEER_ADDR = "10.77.0.1"
NET_CLIENTS = {"runc": "10.77.0.2", "husk": "10.77.0.3", "bare": "10.77.0.4", "create": "10.77.0.5"}
NET_MEASURES = (("stream-send", NET_STREAM_BYTES), ("stream-recv", NET_STREAM_BYTES), ("rr", NET_RR_COUNT))
NET_LABELS = {"stream-send": f"TCP guest->peer {NET_STREAM_BYTES >> 20} MiB",
              "stream-recv": f"TCP peer->guest {NET_STREAM_BYTES >> 20} MiB",
              "rr": f"TCP 1-byte req/resp x{NET_RR_COUNT}"}
NET_UNITS = {"stream-send": "MiB/s", "stream-recv": "MiB/s", "rr": "us"}
# The bare guest's tap (not `tap*_husk`: husk's own clean-up never takes it).
BARE_TAP = "tapbare0"
# Opens a tap in the current network namespace as runtime/src/network/tap.rs
# opens husk's (TUNSETIFF, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), keeps it
# across exec and execs the command with "{TAPFD}" replaced by its number:
# QEMU gets `-netdev tap,fd=` as husk's does.
TAP_EXEC = r"""
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", sys.argv[1].encode(), 0x0002 | 0x1000 | 0x4000))
os.set_inheritable(fd, True)
args = [a.replace("{TAPFD}", str(fd)) for a in sys.argv[2:]]
os.execvp(args[0], args)
"""


class NetTopology:
    """Namespaces the bench makes and removes: a peer namespace with a bridge
    (NET_PEER_ADDR/24) and the server, and one client namespace per runtime
    with an `eth0` veth whose other end is on the bridge. Nothing is routed
    anywhere else; `close` removes every namespace (and so every veth, tap
    and filter in them) and ends the server."""

    def __init__(self):
        self.prefix = f"husk-bench-net-{os.getpid()}"
        self.peer = f"{self.prefix}-peer"
        self.made = []
        self.server = None
        try:
            self._netns_add(self.peer)
            self.ip(self.peer, "link add br0 type bridge")
            self.ip(self.peer, f"addr add {NET_PEER_ADDR}/24 dev br0")
            self.ip(self.peer, "link set br0 up")
            for n, (name, addr) in enumerate(NET_CLIENTS.items()):
                ns = self.client(name)
                self._netns_add(ns)
                self.ip(ns, f"link add eth0 type veth peer name v{name} netns {self.peer}")
                self.ip(ns, f"link set eth0 address 02:48:55:53:4e:{n + 2:02x}")
                self.ip(ns, f"addr add {addr}/24 dev eth0")
                self.ip(ns, "link set eth0 up")
                self.ip(self.peer, f"link set v{name} master br0 up")
            self.server = subprocess.Popen(["nsenter", f"--net={self.path(self.peer)}", NET_BENCH, "server",
                                            str(NET_PORT)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            # Host side first: runc's namespace reaches the server.
            deadline = time.monotonic() + 10
            while subprocess.run(["nsenter", f"--net={self.path(self.client('runc'))}", NET_BENCH, "rr",
                                  f"{NET_PEER_ADDR}:{NET_PORT}", "1"], capture_output=True).returncode != 0:
                if time.monotonic() > deadline or self.server.poll() is not None:
                    raise RuntimeError("the peer's husk-net-bench server is not reachable from the client namespace")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def client(self, name):
        return f"{self.prefix}-{name}"

    @staticmethod
    def path(ns):
        return f"/run/netns/{ns}"

    def _netns_add(self, ns):
        sh(["ip", "netns", "add", ns])
        self.made.append(ns)
        self.ip(ns, "link set lo up")

    @staticmethod
    def ip(ns, args):
        p = subprocess.run(["ip", "-n", ns, *args.split()], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"ip -n {ns} {args}: {p.stderr.strip()}")
        return p.stdout

    @staticmethod
    def tc(ns, args):
        p = subprocess.run(["tc", "-n", ns, *args.split()], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"tc -n {ns} {args}: {p.stderr.strip()}")

    def close(self):
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made = []


def net_bundle(name, netns_path):
    """The busybox sleeper with husk-net-bench at /, in the network namespace
    at `netns_path` (None: a new one, loopback only)."""
    b = busybox_bundle(name, ["sleep", "3600"])
    shutil.copy(NET_BENCH, os.path.join(b, "rootfs/husk-net-bench"))
    cfg = os.path.join(b, "config.json")
    with open(cfg) as f:
        spec = json.load(f)
    if netns_path:
        for ns in spec["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = netns_path
    with open(cfg, "w") as f:
        json.dump(spec, f)
    return b


def net_figure(cmd, what):
    p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"{what}: exit {p.returncode}: {p.stderr.strip()}")
    return float(p.stdout.strip())


def bare_net_initramfs(addr):
    """busybox and husk-net-bench; /init gives eth0 the bare client's address
    and runs each measure against the peer twice: as /init's child (the
    floor), then from a cgroup two levels down with every controller the
    kernel has enabled, as husk's agent places a container (`/husk/<id>`;
    agent/src/init.rs, agent/src/cgroup/mod.rs); then once more there with
    the TCP buffer ceilings the agent sets at boot (agent/src/tcp_buffers.rs).
    It prints `NETBENCH <where> <mode> <figure>` on the console and powers off."""
    stage = os.path.join(WORK, "bare-net-initramfs")
    for d in ("bin", "dev", "proc", "sys"):
        os.makedirs(os.path.join(stage, d))
    shutil.copy("/bin/busybox", os.path.join(stage, "bin/busybox"))
    shutil.copy(NET_BENCH, os.path.join(stage, "husk-net-bench"))

    def runs(where):
        return "".join(f"echo \"NETBENCH {where} {mode} $(/husk-net-bench {mode} {NET_PEER_ADDR}:{NET_PORT} {count})\"\n"
                       for mode, count in NET_MEASURES)
    with open(os.path.join(stage, "init"), "w") as f:
        f.write("#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n"
                "mount -t proc proc /proc\nmount -t sysfs sysfs /sys\n"
                f"ip link set lo up\nip link set eth0 up\nip addr add {addr}/24 dev eth0\n"
                f"{runs('plain')}"
                "mount -t cgroup2 cgroup2 /sys/fs/cgroup\n"
                "mkdir -p /sys/fs/cgroup/husk/bench\n"
                "for d in /sys/fs/cgroup /sys/fs/cgroup/husk; do\n"
                "  for c in $(cat /sys/fs/cgroup/cgroup.controllers); do echo +$c > $d/cgroup.subtree_control; done\n"
                "done\necho $$ > /sys/fs/cgroup/husk/bench/cgroup.procs\n"
                f"{runs('cgroup')}"
                f"echo '4096 131072 {6 << 20}' > /proc/sys/net/ipv4/tcp_rmem\n"
                f"echo '4096 16384 {4 << 20}' > /proc/sys/net/ipv4/tcp_wmem\n"
                f"{runs('ceilings')}echo NETBENCH-DONE\nreboot -f\n")
    os.chmod(os.path.join(stage, "init"), 0o755)
    os.mknod(os.path.join(stage, "dev/console"), 0o600 | 0o020000, os.makedev(5, 1))
    out = os.path.join(WORK, "bare-net-initramfs.img")
    sh(["sh", "-c", f"cd {stage} && find . | cpio -o -H newc --quiet | gzip -1 > {out}"])
    return out


def wire_bare_tap(topo, ns):
    """The bare guest's tap in `ns`, joined to eth0 as runtime/src/network/
    wire.rs joins husk's (eth0's MTU, up; an ingress qdisc on each and a
    match-all u32 filter at husk's priority 0xc0de redirecting to the other's
    egress with mirred), here with ip and tc. Persistent until the namespace
    goes, so the filters exist before QEMU opens it."""
    mtu = json.loads(topo.ip(ns, "-j link show eth0"))[0]["mtu"]
    topo.ip(ns, f"tuntap add dev {BARE_TAP} mode tap vnet_hdr")
    topo.ip(ns, f"link set {BARE_TAP} mtu {mtu} up")
    for dev, to in (("eth0", BARE_TAP), (BARE_TAP, "eth0")):
        topo.tc(ns, f"qdisc add dev {dev} ingress")
        topo.tc(ns, f"filter add dev {dev} parent ffff: protocol all prio {0xc0de} u32 match u32 0 0 "
                    f"action mirred egress redirect dev {to}")


def bare_net_run(topo, ns, initramfs, mac):
    """One boot of the bare QEMU (bare_boot_ms's CPU, machine, memory,
    kernel and cmdline; husk's modern virtio-mmio and its `-netdev tap,fd=,
    vhost=off` + `virtio-net-device`): {(where, mode): figure} from its
    console."""
    cmd = ["nsenter", f"--net={topo.path(ns)}", "python3", "-c", TAP_EXEC, BARE_TAP,
           "qemu-system-x86_64", "-M", "microvm,acpi=off,x-option-roms=off", "-accel", TCG_ACCEL,
           "-cpu", "max,-erms,-fsrm", "-m", "128M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
           "-no-reboot", "-serial", "stdio", "-kernel", KERNEL, "-initrd", initramfs,
           "-append", f"console=ttyS0 reboot=t panic=-1 quiet no_timer_check tsc=reliable acpi=off tsc_early_khz={tsc_khz()} noapictimer",
           "-global", "virtio-mmio.force-legacy=false",
           "-netdev", "tap,id=net0,fd={TAPFD},vhost=off", "-device", f"virtio-net-device,netdev=net0,mac={mac}"]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise RuntimeError("the bare network guest did not finish in 600 s")
    console = out.decode(errors="replace")
    figures = {}
    for line in console.splitlines():
        parts = line.strip().split()
        if len(parts) == 4 and parts[0] == "NETBENCH":
            try:
                figures[(parts[1], parts[2])] = float(parts[3])
            except ValueError:
                pass
    if "NETBENCH-DONE" not in console or len(figures) != 3 * len(NET_MEASURES):
        raise RuntimeError(f"the bare network guest did not report every figure; console:\n{console[-3000:]}")
    return figures


def section_network():
    print("\n== 6. networking (issue 14): a container to a peer namespace over a veth and a bridge, "
          "runc vs husk vs a bare QEMU on a tc-redirected tap (goal: husk within 10% of the bare QEMU)")
    print(f"  husk-net-bench in each; medians of {max(5, RUNS // 2)} interleaved rounds; "
          "MiB/s: more is better, us: less is better")
    for tool in ("nsenter", "tc", "ip"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is needed for the network section")
    topo = NetTopology()
    hroot = os.path.join(WORK, "net-root")
    rroot = os.path.join(WORK, "runc-net-root")
    croot = os.path.join(WORK, "net-create-root")
    started = []
    try:
        peer = f"{NET_PEER_ADDR}:{NET_PORT}"
        rb = net_bundle("net-runc", topo.path(topo.client("runc")))
        hb = net_bundle("net-husk", topo.path(topo.client("husk")))
        subprocess.run(["runc", "--root", rroot, "run", "-d", "-b", rb, "rnet"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(["runc", "--root", rroot, "delete", "-f", "rnet"])
        started.append([HUSK, "--root", hroot, "delete", "-f", "hnet"])
        subprocess.run([HUSK, "--root", hroot, "run", "-d", "-b", hb, "hnet"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bare_ns = topo.client("bare")
        wire_bare_tap(topo, bare_ns)
        bare_mac = json.loads(topo.ip(bare_ns, "-j link show eth0"))[0]["address"]
        initramfs = bare_net_initramfs(NET_CLIENTS["bare"])
        figures = {impl: {mode: [] for mode, _ in NET_MEASURES} for impl in ("runc", "husk", "plain", "cgroup", "ceilings")}
        # Rounds interleave the three, so a busy host weighs on each alike;
        # at least 5: a shared host makes single transfers vary by 2x.
        for _ in range(max(5, RUNS // 2)):
            for mode, count in NET_MEASURES:
                figures["runc"][mode].append(net_figure(
                    ["runc", "--root", rroot, "exec", "rnet", "/husk-net-bench", mode, peer, str(count)], f"runc {mode}"))
                figures["husk"][mode].append(net_figure(
                    [HUSK, "--root", hroot, "exec", "hnet", "/husk-net-bench", mode, peer, str(count)], f"husk {mode}"))
            for (where, mode), v in bare_net_run(topo, bare_ns, initramfs, bare_mac).items():
                figures[where][mode].append(v)
        for cmd in reversed(started):
            subprocess.run(cmd, capture_output=True)
        started = []
        for mode, _ in NET_MEASURES:
            label, unit = NET_LABELS[mode], NET_UNITS[mode]
            r = report(f"runc: {label}", unit, figures["runc"][mode])
            b = report(f"bare QEMU: {label}", unit, figures["plain"][mode], r, "runc")
            c = report(f"bare QEMU+cgroup: {label}", unit, figures["cgroup"][mode], r, "runc")
            t = report(f"bare QEMU+cgroup+ceilings: {label}", unit, figures["ceilings"][mode], r, "runc")
            h = report(f"husk: {label}", unit, figures["husk"][mode], r, "runc")
            # Throughput: husk / bare; latency: bare / husk: in both, below
            # 1 is slower than the bare QEMU's figure. "+cgroup" is the bare
            # guest's tool in a cgroup with every controller, as the agent
            # runs a container: what that alone costs under TCG; "+ceilings"
            # adds the agent's TCP buffer ceilings: the bare guest set up as
            # husk's is, for context (the goal is against the plain one).
            for name, v, goal in (("husk", h, " (goal >= 0.90)"), ("bare QEMU+cgroup", c, ""),
                                  ("bare QEMU+cgroup+ceilings", t, "")):
                share = v / b if unit == "MiB/s" else b / v
                print(f"  {name + ' vs bare QEMU' + goal:<44} {share:.2f} of the bare QEMU's figure", flush=True)
                RESULTS[f"{name} share of bare QEMU: {label}"] = share

        # The network adds about 4% to a create whose own spread on this
        # machine is +-20%: the medians need more pairs than the other rows
        # to tell a 4% from a 6% (a pair takes about 1.5 s).
        pairs = max(3 * RUNS, 30)
        print(f"  husk create + delete -f of the busybox sleeper, {pairs} times alternately without and with a "
              "network namespace path (goal: create <= 1.05x):", flush=True)
        with_net = net_bundle("net-create-with", topo.path(topo.client("create")))
        without = net_bundle("net-create-without", None)
        times = {"with": [], "without": [], "with-delete": [], "without-delete": []}
        phases = {"with": [], "without": []}
        for i in range(pairs):
            for kind, b in (("without", without), ("with", with_net)):
                cid = f"c{kind}{i}"
                log = os.path.join(WORK, f"net-create-{kind}-{i}.log")
                started.append([HUSK, "--root", croot, "delete", "-f", cid])
                # --debug logs the phases (both kinds alike).
                times[kind].append(net_timed([HUSK, "--root", croot, "--debug", "--log", log, "create", "-b", b, cid]))
                times[f"{kind}-delete"].append(net_timed([HUSK, "--root", croot, "delete", "-f", cid]))
                started.pop()
                phases[kind].append(read_phases(log))
        w = report("husk create, no network namespace path", "ms", times["without"])
        report("husk create, a namespace with a veth", "ms", times["with"], w, "no network")
        # Each with-network create less the create just before it: what the
        # machine's slower and faster stretches do to both cancels out.
        paired = median([a - b for a, b in zip(times["with"], times["without"])])
        print(f"  {'paired: with network less the create before it':<44} median {paired:+9.1f} ms"
              f"  ({paired / w * 100:+.1f}% of the median create without)", flush=True)
        RESULTS["create with network less without, paired median ms"] = paired
        w = report("husk delete -f, no network namespace path", "ms", times["without-delete"])
        report("husk delete -f, a namespace with a veth", "ms", times["with-delete"], w, "no network")
        # Where the difference is: the steps of create whose medians differ.
        steps = {k for runs in phases.values() for r in runs for k in r}
        diffs = []
        for key in steps:
            med = {kind: median([r.get(key, 0.0) for r in phases[kind]]) for kind in phases}
            diffs.append((med["with"] - med["without"], key, med))
        print("  create steps, median with network less without (|difference| >= 1 ms):")
        for d, (op, clock, name), med in sorted(diffs, key=lambda x: -abs(x[0])):
            if abs(d) >= 1.0:
                print(f"    {op:<7}{clock:<6}{name:<48}{d:+9.1f} ms  ({med['without']:.1f} -> {med['with']:.1f})",
                      flush=True)
                RESULTS[f"create with network less without: {op} {clock} {name.strip()}"] = d
    finally:
        for cmd in reversed(started):
            subprocess.run(cmd, capture_output=True)
        topo.close()


def net_timed(cmd):
    """`timed`, with the command's stdio off pipes: `husk create` leaves a
    monitor behind that would hold a pipe open."""
    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err).returncode
        ms = (time.monotonic() - t0) * 1000
        if rc != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)}: exit {rc}: {err.read().decode(errors='replace').strip()}")
    return ms


class Pool:
    """A warm pool (docs/pool.md) for the bench: `husk pool serve` on a
    configuration of its own (HUSK_CONFIG), one class, the size of a spec
    without limits (1 vCPU, 128 MiB). Clients claim from it when their own
    configuration lists the class (`client_env(True)`), and cold-boot
    otherwise: both in the same run."""

    def __init__(self, size):
        self.dir = os.path.join(WORK, "pool")
        os.makedirs(self.dir)
        self.size = size
        self.pool_dir = os.path.join(self.dir, "pool")
        self.config = os.path.join(self.dir, "serve.toml")
        self.with_pool = os.path.join(self.dir, "with-pool.toml")
        self.without = os.path.join(self.dir, "without-pool.toml")
        for path, classes in ((self.config, True), (self.with_pool, True), (self.without, False)):
            with open(path, "w") as f:
                f.write(f'pool_dir = "{self.pool_dir}"\n')
                if classes:
                    f.write(f"[[pool]]\nvcpus = 1\nmemory_mib = 128\npool_size = {size}\n")
        # What the containerd shims read: switched between the two above.
        self.client = os.path.join(self.dir, "client.toml")
        self.use(True)
        self.log = open(os.path.join(self.dir, "serve.log"), "w")
        self.proc = subprocess.Popen([HUSK, "pool", "serve"], stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "HUSK_CONFIG": self.config})
        status = json.loads(sh([HUSK, "pool", "status", "--format", "json"],
                               env={**os.environ, "HUSK_CONFIG": self.config}).stdout)
        self.idle_dir = os.path.join(self.pool_dir, status["classes"][0]["class"], "idle")
        self.wait_full()

    def use(self, pool):
        shutil.copy(self.with_pool if pool else self.without, self.client)

    def env(self, pool):
        return {**os.environ, "HUSK_CONFIG": self.with_pool if pool else self.without}

    def idle(self):
        try:
            return len(os.listdir(self.idle_dir))
        except OSError:
            return 0

    def wait_full(self, timeout=120):
        """Waits until every pooled sandbox is idle; returns when (monotonic)."""
        deadline = time.monotonic() + timeout
        while self.idle() < self.size:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit(f"bench: the pool did not fill; see {self.log.name}")
            time.sleep(0.005)
        return time.monotonic()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def section_pool(bare):
    print("\n== 6. the warm pool (issue 10): claimed sandboxes vs cold boots vs runc, and the refill")
    pool = Pool(int(os.environ.get("HUSK_BENCH_POOL_SIZE", "1")))
    try:
        b = busybox_bundle("pool-true", ["true"])
        root = os.path.join(WORK, "pool-root")
        warm, cold, runc_t, refill, warm_phases, cold_phases = [], [], [], [], [], []
        for i in range(RUNS):
            pool.wait_full()
            t0 = time.monotonic()
            log = os.path.join(WORK, f"pool-w{i}.log")
            warm.append(timed([HUSK, "--root", root, "--debug", "--log", log, "run", "-b", b, f"w{i}"],
                              env=pool.env(True)))
            warm_phases.append(read_phases(log))
            refill.append((pool.wait_full() - t0) * 1000)
            log = os.path.join(WORK, f"pool-c{i}.log")
            cold.append(timed([HUSK, "--root", root, "--debug", "--log", log, "run", "-b", b, f"c{i}"],
                              env=pool.env(False)))
            cold_phases.append(read_phases(log))
            runc_t.append(timed(["runc", "--root", os.path.join(WORK, "runc-root"), "run", "-b", b, f"r{i}"]))
        r = report("runc run true", "ms", runc_t)
        c = report("husk run true: cold boot", "ms", cold, r, "runc")
        w = report("husk run true: from the pool", "ms", warm, r, "runc")
        print(f"  {'husk run true from the pool vs cold':<44} ratio {w / c:.2f}x"
              + (f";  vs the bare boot: {w / bare:.2f}x" if bare else ""))
        report("refill: claim to a replacement idle", "ms", refill)
        phase_table("husk run true from the pool (warm create)", warm_phases)
        phase_table("husk run true, cold, same run", cold_phases)

        os.environ["HUSK_CONFIG"] = pool.client
        ctrd = Containerd()
        try:
            warm, cold, runc_t = [], [], []
            for i in range(RUNS):
                pool.use(True)
                pool.wait_full()
                warm.append(timed(ctrd.ctr("run", "--rm", "--runtime", "io.containerd.husk.v2", CTR_IMAGE, f"w{i}", "true"),
                                  stdin=subprocess.DEVNULL))
                pool.use(False)
                cold.append(timed(ctrd.ctr("run", "--rm", "--runtime", "io.containerd.husk.v2", CTR_IMAGE, f"c{i}", "true"),
                                  stdin=subprocess.DEVNULL))
                runc_t.append(timed(ctrd.ctr("run", "--rm", "--runtime", "io.containerd.runc.v2", CTR_IMAGE, f"r{i}", "true"),
                                    stdin=subprocess.DEVNULL))
            r = report("ctr run --rm true: runc shim", "ms", runc_t)
            c = report("ctr run --rm true: husk shim, cold", "ms", cold, r, "runc")
            w = report("ctr run --rm true: husk shim, pool", "ms", warm, r, "runc")
            print(f"  {'ctr run --rm true from the pool vs cold':<44} ratio {w / c:.2f}x")

            warm, cold, runc_t = [], [], []
            for i in range(RUNS):
                for handler, ts, name, use in (("husk", warm, f"w-{i}", True), ("husk", cold, f"c-{i}", False),
                                               ("runc", runc_t, f"r-{i}", None)):
                    if use is not None:
                        pool.use(use)
                    if use:
                        pool.wait_full()
                    ms, pod = cri_pod(ctrd, handler, name, ["sleep", "3600"])
                    ts.append(ms)
                    remove_pod(ctrd, pod)
            r = report("CRI pod start to running: runc", "ms", runc_t)
            c = report("CRI pod start to running: husk, cold", "ms", cold, r, "runc")
            w = report("CRI pod start to running: husk, pool", "ms", warm, r, "runc")
            print(f"  {'CRI pod start from the pool vs cold':<44} ratio {w / c:.2f}x")
        finally:
            ctrd.stop()
            del os.environ["HUSK_CONFIG"]
    finally:
        pool.stop()


SECTIONS = ("boot", "run", "exec", "vmm", "containerd", "network", "pool")


def main():
    wanted = sys.argv[1:] or list(SECTIONS)
    unknown = [w for w in wanted if w not in SECTIONS]
    if unknown:
        sys.exit(f"bench: unknown section {' '.join(unknown)}; sections: {' '.join(SECTIONS)}")
    for f in (HUSK, KERNEL) + ((VSOCK_BENCH,) if "exec" in wanted else ()) + ((NET_BENCH,) if "network" in wanted else ()):
        if not os.path.exists(f):
            sys.exit(f"bench: {f} is missing: run make build")
    ensure_packages()
    print(f"husk benchmarks: {RUNS} runs each, QEMU with TCG where KVM cannot run guests; {time.strftime('%Y-%m-%d %H:%M')}")
    try:
        bare = section_boot() if "boot" in wanted else None
        if "run" in wanted:
            section_run(bare)
        if "exec" in wanted:
            section_exec_and_stdout()
        if "vmm" in wanted:
            section_vmm()
        if "containerd" in wanted:
            section_containerd()
        if "network" in wanted:
            section_network()
        if "pool" in wanted:
            section_pool(bare)
    finally:
        subprocess.run(["sh", "-c", f"grep -o '{WORK}[^ ]*' /proc/self/mountinfo | sort -r | xargs -r umount -l"],
                       capture_output=True)
        shutil.rmtree(WORK, ignore_errors=True)
    # A partial run does not overwrite the results of a whole one.
    suffix = "" if set(wanted) == set(SECTIONS) else "-" + "-".join(wanted)
    with open(os.path.join(ROOT, f"target/bench-results{suffix}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
