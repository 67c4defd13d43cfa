#!/usr/bin/env bash
# Writes the configuration of a private containerd for husk's tests and
# benchmarks (tests/src/containerd.rs, bench/run.py):
#   containerd-test-config.sh <dir>
# <dir>/config.toml: root, state, socket (<dir>/containerd.sock) and opt
# under <dir>; the CRI plugin with the husk pause image, the runtime
# handlers `husk` (io.containerd.husk.v2, the default) and `runc`
# (io.containerd.runc.v2, the reference), and CNI from <dir>/cni.
# containerd must then run with the husk shim's directory first on PATH.
set -euo pipefail
dir=${1:?usage: containerd-test-config.sh <dir>}
here=$(cd "$(dirname "$0")" && pwd)
dir=$(cd "$dir" && pwd)

# A pod's network lives in its VM; the CRI plugin still sets up a host-side
# pod netns through CNI and wants an IP back. The test plugin configures
# nothing on the host (containerd-test-cni.sh). CRI always adds the
# loopback network too (Debian's CNI plugins).
mkdir -p "$dir/cni" "$dir/cni-bin"
ln -sfn "$here/containerd-test-cni.sh" "$dir/cni-bin/husk-test-net"
ln -sfn /usr/lib/cni/loopback "$dir/cni-bin/loopback"
cat > "$dir/cni/10-husk-test.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "husk-test", "plugins": [{"type": "husk-test-net"}]}
JSON
# CRI gives a pod's sandbox container oom_score_adj -998; lowering it needs
# CAP_SYS_RESOURCE, which some build machines (containers) lack, and runc
# then fails the pod. Without it, let containerd clamp the value instead.
restrict_oom=false
if ! sh -c 'echo -999 > /proc/self/oom_score_adj' 2>/dev/null; then
    restrict_oom=true
fi
cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
[grpc]
  address = "$dir/containerd.sock"
[debug]
  level = "debug"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/library/husk-pause:latest"
  enable_selinux = false
  restrict_oom_score_adj = $restrict_oom
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "husk"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
      runtime_type = "io.containerd.husk.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni-bin"
    conf_dir = "$dir/cni"
TOML
