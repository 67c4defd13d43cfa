#!/usr/bin/env bash
# Builds the husk guest kernel (an uncompressed vmlinux with a PVH entry point)
# from Debian's linux-source-6.1 and the fragment husk.config.
#
# The result is cached on the machine under $HUSK_CACHE/kernel/<key>/ where
# <key> hashes the fragment, this script and the source package version, so a
# machine builds each configuration once. The vmlinux is then copied to
# $OUT (default target/guest/vmlinux).
#
#   build.sh [OUT]
#
# OUT and HUSK_CACHE may be relative: they are resolved against the caller's
# directory before anything changes directory. HUSK_KERNEL_TARBALL names
# another source tarball (the tests give a small stand-in, with stand-in
# `make` and `dpkg-query` first on PATH).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
script="$here/$(basename "$0")"
fragment="$here/husk.config"

# Absolute from the caller's directory: the build itself runs elsewhere.
absolute() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$PWD" "$1" ;; esac; }
cache_root=$(absolute "${HUSK_CACHE:-/var/cache/husk}")
out=$(absolute "${1:-$here/../target/guest/vmlinux}")
tarball=$(absolute "${HUSK_KERNEL_TARBALL:-/usr/src/linux-source-6.1.tar.xz}")

die() { echo "guest-kernel: $*" >&2; exit 1; }

[ -f "$tarball" ] || die "missing $tarball (apt-get install linux-source-6.1)"
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null) \
    || die "linux-source-6.1 is not installed"
key=$( { cat "$fragment" "$script"; echo "$src_version"; } | sha256sum | cut -c1-16)
cache="$cache_root/kernel/$key"

build() { # the unpacked source tree: everything here runs inside it
    make -s KCONFIG_ALLCONFIG="$fragment" allnoconfig
    # Every option the fragment names must have kept its value: a silently
    # dropped dependency would otherwise only show as a guest that cannot boot.
    local missing=0 line opt
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) grep -qxF "$line" .config || { echo "guest-kernel: not in .config: $line" >&2; missing=1; } ;;
            "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}
                if grep -q "^$opt=" .config; then echo "guest-kernel: should be off: $opt" >&2; missing=1; fi ;;
        esac
    done < "$fragment"
    [ "$missing" = 0 ] || die "the fragment did not survive into .config (see above)"
    make -s -j"$(nproc)" vmlinux
    mkdir -p "$cache.tmp"
    cp vmlinux "$cache.tmp/vmlinux"
    cp .config "$cache.tmp/config"
}

if [ ! -f "$cache/vmlinux" ]; then
    echo "guest-kernel: building $key (linux-source $src_version); takes a few minutes once per machine"
    work=$(mktemp -d "${TMPDIR:-/tmp}/husk-kernel.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    tar -C "$work" -xf "$tarball"
    rm -rf "$cache.tmp"
    # A subshell: the `cd` ends with the build, so nothing after it can
    # resolve a path inside the tree the trap deletes.
    (cd "$work/linux-source-6.1" && build)
    rm -rf "$cache"
    mv "$cache.tmp" "$cache"
fi

mkdir -p "$(dirname "$out")"
cp "$cache/vmlinux" "$out.tmp" && mv "$out.tmp" "$out"
echo "guest-kernel: $out ($key)"
