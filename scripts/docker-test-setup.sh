#!/usr/bin/env bash
# Installs Docker (Debian's docker.io) for the Docker integration test
# (idempotent). The test runs its own dockerd inside a network namespace it
# makes; no system daemon is started here.
set -euo pipefail
if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    exec 9>/var/lock/husk-docker-setup.lock
    flock 9
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
