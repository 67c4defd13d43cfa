#!/bin/sh
# A CNI plugin for husk's containerd tests that configures nothing: a husk
# pod's network lives inside its VM, and the tests need no host network. It
# answers ADD with an eth0 and a documentation-range address (192.0.2.0/24,
# never routed) so the CRI plugin has the pod IP it insists on.
case "$CNI_COMMAND" in
ADD)
    cat >/dev/null
    printf '{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","sandbox":"%s"}],"ips":[{"version":"4","address":"192.0.2.10/24","interface":0}]}\n' "$CNI_NETNS"
    ;;
VERSION)
    echo '{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}'
    ;;
*)
    cat >/dev/null
    ;;
esac
exit 0
