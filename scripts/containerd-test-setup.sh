#!/usr/bin/env bash
# Prepares a machine for husk's containerd tests (idempotent):
#   containerd-test-setup.sh <dir>
# - installs Debian's containerd (1.6) and the CNI plugins when missing;
# - writes <dir>/images.tar: an OCI image layout with two images built from
#   a busybox rootfs, no registry involved:
#     docker.io/library/husk-busybox:latest  (cmd: sh)
#     docker.io/library/husk-pause:latest    (sleeps forever: the CRI sandbox image)
set -euo pipefail
dir=${1:?usage: containerd-test-setup.sh <dir>}
here=$(cd "$(dirname "$0")" && pwd)

# Tests run this in parallel: one at a time (apt and the tarball).
mkdir -p "$dir"
exec 9>"$dir/.setup.lock"
flock 9

packages=(containerd containernetworking-plugins busybox-static)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "containerd-test-setup: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "containerd-test-setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's package enables a system containerd; the tests run their own.

mkdir -p "$dir"
if [ -s "$dir/images.tar" ]; then
    exit 0
fi
work=$(mktemp -d "$dir/image.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$here/busybox-rootfs.sh" "$work/rootfs"
layout=$work/layout
mkdir -p "$layout/blobs/sha256"
put() { # put <file> -> prints "sha256:<hex> <size>" and stores the blob
    local h s
    h=$(sha256sum "$1" | cut -d' ' -f1)
    s=$(stat -c %s "$1")
    cp "$1" "$layout/blobs/sha256/$h"
    echo "sha256:$h $s"
}
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/rootfs" -cf "$work/layer.tar" .
read -r layer layer_size < <(put "$work/layer.tar")
manifests=""
for img in "husk-busybox:[\"sh\"]:null" "husk-pause:null:[\"/bin/sh\",\"-c\",\"while :; do sleep 3600; done\"]"; do
    name=${img%%:*}; rest=${img#*:}; cmd=${rest%%:*}; entry=${rest#*:}
    cat > "$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":$cmd,"Entrypoint":$entry,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["$layer"]},"history":[{"created_by":"husk containerd-test-setup.sh"}]}
JSON
    read -r config config_size < <(put "$work/config.json")
    cat > "$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$config","size":$config_size},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"$layer","size":$layer_size}]}
JSON
    read -r manifest manifest_size < <(put "$work/manifest.json")
    [ -n "$manifests" ] && manifests="$manifests,"
    manifests="$manifests{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"$manifest\",\"size\":$manifest_size,\"platform\":{\"architecture\":\"amd64\",\"os\":\"linux\"},\"annotations\":{\"io.containerd.image.name\":\"docker.io/library/$name:latest\",\"org.opencontainers.image.ref.name\":\"latest\"}}"
done
echo '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"
echo "{\"schemaVersion\":2,\"manifests\":[$manifests]}" > "$layout/index.json"
tar -C "$layout" -cf "$work/images.tar" .
mv "$work/images.tar" "$dir/images.tar"
