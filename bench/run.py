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
     the PSS of one idle pod's host processes (the RuntimeClass overhead).

  6. the warm pool (issue 10): `husk run true`, `ctr run --rm true` and a CRI
     pod start with a sandbox claimed from `husk pool serve`, beside cold
     boots and runc in the same run, and the time from a claim to the pool
     full again (the refill).

Sections: `python3 bench/run.py [boot] [run] [exec] [vmm] [containerd] [pool]`
(`make bench BENCH=containerd`); none named runs them all.
"""
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
    cmd = ["qemu-system-x86_64", "-M", "microvm,acpi=off,x-option-roms=off", "-accel", "tcg,tb-size=16",
           "-cpu", "max,-erms,-fsrm", "-m", "128M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
           "-serial", "stdio", "-kernel", KERNEL, "-initrd", initramfs,
           "-append", f"console=ttyS0 reboot=t panic=-1 quiet acpi=off tsc_early_khz={tsc_khz()}"]
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


def section_run(bare):
    print("\n== 2. run busybox `true`: create, start, exit, delete (issue 3)")
    b = busybox_bundle("true", ["true"])
    root = os.path.join(WORK, "run-root")
    husk_t, runc_t, crun_t = [], [], []
    for i in range(RUNS):
        husk_t.append(timed([HUSK, "--root", root, "run", "-b", b, f"h{i}"]))
        runc_t.append(timed(["runc", "--root", os.path.join(WORK, "runc-root"), "run", "-b", b, f"r{i}"]))
        crun_t.append(timed(crun_cmd(["--root", os.path.join(WORK, "crun-root"), "run", "-b", b, f"c{i}"])))
    r = report("runc run true", "ms", runc_t)
    report("crun run true", "ms", crun_t, r, "runc")
    h = report("husk run true", "ms", husk_t, r, "runc")
    vs_bare = f";  vs the bare boot: {h / bare:.2f}x" if bare else ""
    print(f"  {'husk run true vs crun':<44} ratio {h / median(crun_t):.2f}x{vs_bare}")


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
        he = [timed([HUSK, "--root", hroot, "exec", "ex", "true"]) for _ in range(RUNS)]
        re_ = [timed(["runc", "--root", rroot, "exec", "rex", "true"]) for _ in range(RUNS)]
        r = report("runc exec true", "ms", re_)
        report("husk exec true", "ms", he, r, "runc")
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
        warm, cold, runc_t, refill = [], [], [], []
        for i in range(RUNS):
            pool.wait_full()
            t0 = time.monotonic()
            warm.append(timed([HUSK, "--root", root, "run", "-b", b, f"w{i}"], env=pool.env(True)))
            refill.append((pool.wait_full() - t0) * 1000)
            cold.append(timed([HUSK, "--root", root, "run", "-b", b, f"c{i}"], env=pool.env(False)))
            runc_t.append(timed(["runc", "--root", os.path.join(WORK, "runc-root"), "run", "-b", b, f"r{i}"]))
        r = report("runc run true", "ms", runc_t)
        c = report("husk run true: cold boot", "ms", cold, r, "runc")
        w = report("husk run true: from the pool", "ms", warm, r, "runc")
        print(f"  {'husk run true from the pool vs cold':<44} ratio {w / c:.2f}x"
              + (f";  vs the bare boot: {w / bare:.2f}x" if bare else ""))
        report("refill: claim to a replacement idle", "ms", refill)

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


SECTIONS = ("boot", "run", "exec", "vmm", "containerd", "pool")


def main():
    wanted = sys.argv[1:] or list(SECTIONS)
    unknown = [w for w in wanted if w not in SECTIONS]
    if unknown:
        sys.exit(f"bench: unknown section {' '.join(unknown)}; sections: {' '.join(SECTIONS)}")
    for f in (HUSK, KERNEL) + ((VSOCK_BENCH,) if "exec" in wanted else ()):
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
