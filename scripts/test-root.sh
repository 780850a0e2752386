#!/usr/bin/env bash
# Build (once) a Debian 13 "trixie" root for the systemd tests to boot as the sandbox's lower
# layer, and print its path. The root is cached under $STELLARBASE_TEST_ROOTS (default
# /var/cache/stellarbase-test-roots), keyed by the suite and the package list below, so a
# changed list builds a new root and an unchanged one is reused.
set -euo pipefail

SUITE=trixie
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=(systemd systemd-sysv dbus procps iproute2 ca-certificates
    postgresql-17 postgresql-17-pgvector postgresql-client-17 redis-server valkey-server)
CACHE=${STELLARBASE_TEST_ROOTS:-/var/cache/stellarbase-test-roots}

key=$(printf '%s\n' "$SUITE" "${PACKAGES[@]}" | sha256sum | cut -c1-12)
root="$CACHE/$SUITE-$key"
if [[ -f "$root/.complete" ]]; then
    echo "$root"
    exit 0
fi
command -v debootstrap >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
mkdir -p "$CACHE"
tmp=$(mktemp -d "$CACHE/.build-$SUITE-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
include=$(IFS=,; echo "${PACKAGES[*]}")
# policy-rc.d: the packages' maintainer scripts must not start their servers in the chroot.
debootstrap --variant=minbase --include="$include" "$SUITE" "$tmp/root" "$MIRROR" \
    >"$tmp/debootstrap.log" 2>&1 || { tail -n 30 "$tmp/debootstrap.log" >&2; exit 1; }
# The distribution's own clusters and servers stay off: the tests start what they need.
rm -rf "$tmp/root/etc/postgresql"/* "$tmp/root/var/lib/postgresql"/*
touch "$tmp/root/.complete"
mv "$tmp/root" "$root"
echo "$root"
