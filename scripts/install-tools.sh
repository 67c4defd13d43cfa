#!/usr/bin/env bash
# Installs the vhost-user device backends from the Rust package registry into
# the machine's cache (built once per machine and version):
#   $HUSK_CACHE/tools/<name>-<version>/bin/<name>
# husk finds them there without configuration (it reads HUSK_CACHE too).
# HUSK_CACHE may be relative; it is resolved against the caller's directory.
set -euo pipefail
cache_root=${HUSK_CACHE:-/var/cache/husk}
case "$cache_root" in /*) ;; *) cache_root="$PWD/$cache_root" ;; esac
cache=$cache_root/tools
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
    [ -x "$dest.tmp/bin/$name" ] || { echo "install-tools: cargo install left no $dest.tmp/bin/$name" >&2; exit 1; }
    rm -rf "$dest"
    mv "$dest.tmp" "$dest"
    rm -f "$dest"/.crates.toml "$dest"/.crates2.json
done
