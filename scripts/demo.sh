#!/usr/bin/env bash
# The demo: check the machine, then run a real container in a microVM and
# show that it sees the guest's kernel, not the host's.
set -euo pipefail
cd "$(dirname "$0")/.."
husk=target/release/husk
demo=target/demo
rm -rf "$demo"
mkdir -p "$demo/bundle"
scripts/busybox-rootfs.sh "$demo/bundle/rootfs"
cat > "$demo/bundle/config.json" <<'JSON'
{
  "ociVersion": "1.0.2",
  "process": {
    "args": ["sh", "-c", "echo \"inside the container: $(uname -srm), hostname $(hostname)\"; echo \"memory seen: $(grep MemTotal /proc/meminfo)\"; ls /"],
    "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
    "cwd": "/",
    "user": {"uid": 0, "gid": 0}
  },
  "root": {"path": "rootfs"},
  "hostname": "husk-demo",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
  ],
  "linux": {
    "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}, {"type": "network"}]
  }
}
JSON
echo "== husk check"
"$husk" check
echo
echo "== host kernel: $(uname -srm)"
echo "== husk run demo (busybox bundle in $demo/bundle)"
"$husk" run --bundle "$demo/bundle" husk-demo
