#!/usr/bin/env python3
"""husk benchmarks, side by side with their references in the same run.

Prints medians over N runs (default 10, HUSK_BENCH_RUNS) and ratios:
  1. boot to agent ready: husk (QEMU/TCG here) vs a bare qemu-system-x86_64
     booting the same kernel with a busybox /init that reports and powers off;
  2. `run` of busybox `true` (create, start, exit, delete): husk vs runc vs crun,
     and vs the bare boot;
  3. exec latency into a running container and stdout throughput: husk vs runc;
  4. husk-vmm start-up to its first vCPU entry and its RSS before the guest
     touches RAM (Firecracker publishes ~12 ms and <= 5 MiB).
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
    the same machine type, memory and kernel as a husk sandbox, no devices."""
    cmd = ["qemu-system-x86_64", "-M", "microvm,acpi=off,x-option-roms=off", "-accel", "tcg,tb-size=16",
           "-cpu", "max", "-m", "128M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
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
    print(f"  {'husk run true vs crun':<44} ratio {h / median(crun_t):.2f}x;  vs the bare boot: {h / bare:.2f}x")


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
        def throughput(cmd):
            t0 = time.monotonic()
            p = subprocess.run(cmd, check=True, capture_output=True)
            dt = time.monotonic() - t0
            assert len(p.stdout) == size, len(p.stdout)
            return size / dt / (1 << 20)
        cat = ["dd", "if=/dev/zero", "bs=1M", f"count={size >> 20}", "status=none"]
        ht = [throughput([HUSK, "--root", hroot, "exec", "ex", *cat]) for _ in range(max(3, RUNS // 3))]
        rt = [throughput(["runc", "--root", rroot, "exec", "rex", *cat]) for _ in range(max(3, RUNS // 3))]
        r = report("runc exec: 256 MiB of stdout", "MiB/s", rt)
        report("husk exec: 256 MiB of stdout", "MiB/s", ht, r, "runc")
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


def main():
    for f in (HUSK, KERNEL):
        if not os.path.exists(f):
            sys.exit(f"bench: {f} is missing: run make build")
    ensure_packages()
    print(f"husk benchmarks: {RUNS} runs each, QEMU with TCG where KVM cannot run guests; {time.strftime('%Y-%m-%d %H:%M')}")
    try:
        bare = section_boot()
        section_run(bare)
        section_exec_and_stdout()
        section_vmm()
    finally:
        subprocess.run(["sh", "-c", f"grep -o '{WORK}[^ ]*' /proc/self/mountinfo | sort -r | xargs -r umount -l"],
                       capture_output=True)
        shutil.rmtree(WORK, ignore_errors=True)
    with open(os.path.join(ROOT, "target/bench-results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
