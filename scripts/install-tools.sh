#!/usr/bin/env bash
# Installs the vhost-user device backends from the Rust package registry into
# the machine's cache (built once per machine and version):
#   $HUSK_CACHE/tools/<name>-<version>/bin/<name>
# husk finds them there without configuration.
set -euo pipefail
cache=${HUSK_CACHE:-/var/cache/husk}/tools
tools=("virtiofsd 1.14.0" "vhost-device-vsock 0.3.0")
for t in "${tools[@]}"; do
    read -r name version <<<"$t"
    dest="$cache/$name-$version"
    if [ -x "$dest/bin/$name" ]; then
        continue
    fi
    echo "install-tools: building $name $version (once per machine)"
    mkdir -p "$cache"
    rm -rf "$dest.tmp"
    cargo install --quiet --locked --root "$dest.tmp" "$name" --version "$version"
    rm -rf "$dest"
    mv "$dest.tmp" "$dest"
    rm -f "$dest"/.crates.toml "$dest"/.crates2.json
done
