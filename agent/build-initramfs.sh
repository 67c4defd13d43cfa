#!/usr/bin/env bash
# Packs husk-agent as /init of an uncompressed newc cpio: the agent is the only
# program in the guest's initramfs. Containers bring their own userland
# through the shared directory.
#   build-initramfs.sh <husk-agent binary> <output initramfs>
set -euo pipefail
agent=$1
out=$2
die() { echo "build-initramfs: $*" >&2; exit 1; }
[ -x "$agent" ] || die "agent binary $agent not found"
# A dynamically linked agent would die in the guest with a bare "not found".
if file "$agent" 2>/dev/null | grep -q "dynamically linked"; then
    die "$agent is dynamically linked; build it with -C target-feature=+crt-static"
fi
command -v cpio >/dev/null || die "cpio is not installed (apt-get install cpio)"
stage=$(mktemp -d "${TMPDIR:-/tmp}/husk-initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
# mktemp makes the stage 0700, which would become the guest's / : a
# container set up as the root of a user namespace (not the guest's root)
# walks the agent's paths (/proc, the shared directory) before pivot_root.
chmod 0755 "$stage"
mkdir -p "$stage"/{dev,proc,sys,run,tmp}
install -m 0755 "$agent" "$stage/init"
# The kernel opens /dev/console for init's stdio before anything is mounted.
mknod -m 600 "$stage/dev/console" c 5 1
mkdir -p "$(dirname "$out")"
# Uncompressed: gunzip of the agent costs the guest ~100 ms under TCG,
# more than reading 4 MB more from the page cache costs the host.
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) > "$out.tmp"
mv "$out.tmp" "$out"
echo "build-initramfs: $out ($(stat -c %s "$out") bytes)"
