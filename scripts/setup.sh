#!/usr/bin/env bash
# Set up a Debian 12 machine to build and test stellarbase: system packages, a venv with
# the pinned Python dependencies, and the one-file binary in dist/stellarbase.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(postgresql redis-server python3-venv python3-dev binutils procps util-linux curl
    prometheus  # for promtool: tests/test_observability.py checks the alert rules and a scrape
    ruby  # tests/unit/test_vagrantfile.py checks and evaluates the Vagrantfile
    debootstrap)  # scripts/test-root.sh: the Debian 13 root the systemd tests also boot
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps apt from starting the distribution's postgresql/redis/prometheus: the
    # tests start their own servers on free ports.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'

if [[ "${SKIP_BUILD:-}" != 1 ]]; then
    bash packaging/build.sh
fi
