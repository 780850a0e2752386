#!/usr/bin/env bash
# Build (once) a Debian 13 "trixie" root for the systemd tests to boot as the sandbox's lower
# layer, and print its path. The root is cached under $STELLARBASE_TEST_ROOTS (default
# /var/cache/stellarbase-test-roots), keyed by the suite and the package list below, so a
# changed list builds a new root and an unchanged one is reused. Needs root, debootstrap
# (installed here when missing) and Debian's archive ($DEBIAN_MIRROR); about a minute and
# 700 MB. Older roots of other package lists stay: a checkout of another branch may use them.
set -euo pipefail

SUITE=trixie
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# curl, psql and redis-cli: the tests probe and query from inside the sandbox.
PACKAGES=(systemd systemd-sysv dbus procps iproute2 ca-certificates curl
    postgresql-17 postgresql-17-pgvector postgresql-client-17 redis-server valkey-server)
CACHE=${STELLARBASE_TEST_ROOTS:-/var/cache/stellarbase-test-roots}

key=$(printf '%s\n' "$SUITE" "${PACKAGES[@]}" | sha256sum | cut -c1-12)
root="$CACHE/$SUITE-$key"
if [[ -f "$root/.complete" ]]; then
    echo "$root"
    exit 0
fi
mkdir -p "$CACHE"
# Two test runs may both find the root missing: one builds it, the other waits for it.
exec 9>"$CACHE/.$SUITE-$key.lock"
flock 9
if [[ -f "$root/.complete" ]]; then
    echo "$root"
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "test-root: installing debootstrap" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq debootstrap >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
    }
}
echo "test-root: building the $SUITE root in $root (about a minute)" >&2
rm -rf "$root"  # without .complete it is no root this script finished
tmp=$(mktemp -d "$CACHE/.build-$SUITE-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
include=$(IFS=,; echo "${PACKAGES[*]}")
# While it installs, debootstrap puts a policy-rc.d (exit 101) and a stub start-stop-daemon in
# the chroot, so the packages' maintainer scripts start no server there.
debootstrap --variant=minbase --include="$include" "$SUITE" "$tmp/root" "$MIRROR" \
    >"$tmp/debootstrap.log" 2>&1 || { tail -n 30 "$tmp/debootstrap.log" >&2; exit 1; }
# The distribution's own clusters and servers stay off: the tests start what they need.
rm -rf "$tmp/root/etc/postgresql"/* "$tmp/root/var/lib/postgresql"/*
touch "$tmp/root/.complete"
mv "$tmp/root" "$root"
echo "$root"
