#!/usr/bin/env bash
# Installs the Debian packages husk needs to build and run, when missing.
set -euo pipefail
packages=(
    qemu-system-x86 linux-source-6.1 busybox-static cpio file
    build-essential flex bison bc libelf-dev libssl-dev
    libseccomp-dev libcap-ng-dev pkg-config
    # tests/tests/guest_network.rs copies these into a container's rootfs.
    iptables nftables iproute2
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
