#!/usr/bin/env bash
# Installs podman and conmon for the podman integration test (idempotent).
set -euo pipefail
need=()
for p in podman conmon; do
    command -v "$p" >/dev/null || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    exec 9>/var/lock/husk-podman-setup.lock
    flock 9
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends podman conmon >/dev/null
fi
