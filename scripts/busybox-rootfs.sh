#!/usr/bin/env bash
# Makes a minimal busybox root file system from Debian's busybox-static:
#   busybox-rootfs.sh <dir>
set -euo pipefail
dir=$1
bb=/bin/busybox
[ -x "$bb" ] || { echo "busybox-rootfs: $bb missing (apt-get install busybox-static)" >&2; exit 1; }
mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,run}
cp "$bb" "$dir/bin/busybox"
for applet in $("$bb" --list-full); do
    [ -e "$dir/$applet" ] || ln -s /bin/busybox "$dir/$applet"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$dir/etc/passwd"
echo "root:x:0:" > "$dir/etc/group"
