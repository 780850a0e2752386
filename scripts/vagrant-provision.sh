#!/usr/bin/env bash
# Provision a Vagrant box of a supported distribution and run the end-to-end checks of a
# pilot install on it, with systemd as PID 1 and the distribution's own PostgreSQL and
# Redis (README.md, "Real hosts with Vagrant"). Runs as root in the VM; the source tree is
# the Vagrantfile's copy in /vagrant.
#
#   1. packages: PostgreSQL 14+ and Redis 7+ of the distribution (module streams on
#      Rocky 9, Redis's own repository on Ubuntu 22.04);
#   2. a release bundle: the shared dist/stellarbase-<version>-linux-<arch>.tar.gz when
#      this VM's glibc can run it, otherwise one built here (venv + PyInstaller, then
#      make_bundle.py with a throwaway key that STELLARBASE_RELEASE_PUBKEY trusts);
#   3. `install --bundle … --tier pilot`, then status, doctor, every service's /readyz, and
#      a second install that must report 0 changed.
#
# SB_BUILD=auto (default: the shared bundle when usable, else build here),
#   vm (always build here) or bundle (the shared bundle, or fail);
# STELLARBASE_RELEASE_PUBKEY: a PEM public key (a path in the VM) to trust for a shared
#   bundle signed with another key than the release key;
# SB_SELINUX=enforcing: leave SELinux enforcing on Rocky 9.
# `vagrant-provision.sh --detect` prints the distribution's name and does nothing else.
set -euo pipefail

SRC=${STELLARBASE_SRC:-/vagrant}
WORK=/var/tmp/stellarbase
OS_RELEASE=${OS_RELEASE:-/etc/os-release}
# Release bundles are built on Debian 12 (scripts/setup.sh), and the Python and host
# libraries inside the binary come from there: one measured needed glibc 2.35
# (packaging/README.md), a package update may raise that to Debian 12's own 2.36. Only
# boxes with at least that use a shared bundle.
BUNDLE_GLIBC=2.36
READYZ_PORTS=(8300 8310 8390) # the pilot tier's api, worker 1 and agent

say() { echo "vagrant-provision: $*"; }
die() {
    echo "vagrant-provision: FAIL: $*" >&2
    exit 1
}

detect_distro() {
    local release
    # shellcheck source=/dev/null  # os-release is the host's, not part of the tree
    release=$(. "$OS_RELEASE" && echo "${ID:-}:${VERSION_ID:-}")
    case "$release" in
        debian:12) echo debian12 ;;
        ubuntu:22.04) echo ubuntu2204 ;;
        ubuntu:24.04) echo ubuntu2404 ;;
        rocky:9* | almalinux:9* | rhel:9*) echo el9 ;;
        *) return 1 ;;
    esac
}

glibc_version() { getconf GNU_LIBC_VERSION | awk '{print $2}'; }

glibc_at_least() {
    [[ $(printf '%s\n' "$1" "$(glibc_version)" | sort -V | head -n 1) == "$1" ]]
}

# --- packages -----------------------------------------------------------------------------

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_packages_apt() {
    local distro=$1 pgvector versions
    apt-get update -qq
    apt_install ca-certificates curl openssl postgresql
    if [[ $distro == ubuntu2204 ]]; then
        # Ubuntu 22.04 ships Redis 6.0 and Python 3.10: Redis comes from its own repository,
        # and a build uses universe's python3.11.
        apt_install gpg
        curl -fsSL https://packages.redis.io/gpg |
            gpg --dearmor --yes -o /usr/share/keyrings/redis-archive-keyring.gpg
        echo "deb [signed-by=/usr/share/keyrings/redis-archive-keyring.gpg]" \
            "https://packages.redis.io/deb jammy main" >/etc/apt/sources.list.d/redis.list
        apt-get update -qq
        apt_install python3.11-venv python3.11-dev
    fi
    apt_install redis-server
    # pgvector where the distribution has it (Debian 12, Ubuntu 24.04); without it the
    # install goes on with semantic search off.
    versions=(/usr/lib/postgresql/*)
    pgvector="postgresql-$(printf '%s\n' "${versions[@]##*/}" | sort -V | tail -n 1)-pgvector"
    if apt-cache show "$pgvector" >/dev/null 2>&1; then apt_install "$pgvector"; fi
    # The installer runs its own servers (stellarbase-postgres, stellarbase-redis); the
    # distribution's default ones would only take memory.
    systemctl disable --now postgresql redis-server >/dev/null 2>&1 || true
}

install_packages_dnf() {
    # Rocky 9's default PostgreSQL is 13 and its default Redis 6.2; the postgresql:16 (9.4+)
    # and redis:7 (9.3+) module streams give what the installer needs.
    dnf -y -q module reset postgresql redis
    dnf -y -q module enable postgresql:16 redis:7
    dnf -y -q install postgresql-server redis curl openssl tar gzip
    dnf -y -q install pgvector 2>/dev/null || say "no pgvector package: semantic search stays off"
}

install_packages() {
    case "$1" in
        el9) install_packages_dnf ;;
        *) install_packages_apt "$1" ;;
    esac
}

# The installer does not label its own PostgreSQL and Redis data directories and ports for
# SELinux yet, so the confined postgresql_t and redis_t domains may be denied them. The run
# goes on permissive (until the next boot) and counts the denials enforcing mode would make.
relax_selinux() {
    [[ ${SB_SELINUX:-} == enforcing ]] && return 0
    command -v getenforce >/dev/null && [[ $(getenforce) == Enforcing ]] || return 0
    setenforce 0
    say "SELinux permissive until the next boot (SB_SELINUX=enforcing keeps it on)"
}

report_selinux() {
    command -v ausearch >/dev/null || return 0
    local denials
    denials=$(ausearch -m avc -ts boot 2>/dev/null | grep -c '^type=AVC' || true)
    say "SELinux: $denials AVC denials since boot (see them with: ausearch -m avc -ts boot)"
}

# --- the bundle -----------------------------------------------------------------------------

shared_bundle() {
    local found=("$SRC"/dist/stellarbase-*-linux-"$(uname -m)".tar.gz)
    [[ -e ${found[0]} ]] || return 0
    printf '%s\n' "${found[@]}" | sort -V | tail -n 1
}

use_shared_bundle() {
    local shared=$1
    case "${SB_BUILD:-auto}" in
        vm) return 1 ;;
        bundle)
            [[ -n $shared ]] || die "SB_BUILD=bundle, but $SRC/dist has no bundle"
            glibc_at_least "$BUNDLE_GLIBC" ||
                say "glibc $(glibc_version) is older than Debian 12's ($BUNDLE_GLIBC)," \
                    "where bundles are built: the binary may not start" >&2
            ;;
        auto) [[ -n $shared ]] && glibc_at_least "$BUNDLE_GLIBC" ;;
        *) die "SB_BUILD=$SB_BUILD: expected auto, vm or bundle" ;;
    esac
}

# Build in a copy: the build writes .venv/, build/ and dist/, which must not reach the host's
# checkout when /vagrant is a mounted folder rather than a copy.
copy_source() {
    mkdir -p "$WORK/src"
    tar -C "$SRC" --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./.git -cf - . |
        tar -C "$WORK/src" -xf -
}

build_binary() {
    case "$1" in
        el9)
            dnf -y -q install python3.11 python3.11-devel binutils procps-ng util-linux
            [[ -x .venv/bin/python ]] || python3.11 -m venv .venv
            .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
            bash packaging/build.sh
            ;;
        ubuntu2204) PYTHON=python3.11 bash scripts/setup.sh ;;
        *) bash scripts/setup.sh ;;
    esac
}

# A bundle of this VM's own binary, signed with a key made here and trusted for this run only.
build_bundle() {
    local distro=$1
    say "building the binary and a bundle in the VM (glibc $(glibc_version))"
    copy_source
    (cd "$WORK/src" && build_binary "$distro")
    openssl genpkey -algorithm ed25519 -out "$WORK/signing.pem"
    openssl pkey -in "$WORK/signing.pem" -pubout -out "$WORK/release.pem"
    rm -rf "$WORK/bundle"
    STELLARBASE_SIGNING_KEY=$WORK/signing.pem \
        "$WORK/src/.venv/bin/python" "$WORK/src/packaging/make_bundle.py" \
        --binary "$WORK/src/dist/stellarbase" --out "$WORK/bundle"
    export STELLARBASE_RELEASE_PUBKEY=$WORK/release.pem
}

# --- install and check ----------------------------------------------------------------------

wait_ready() {
    local url="http://127.0.0.1:$1/readyz"
    for _ in $(seq 60); do
        if curl -fsS -o /dev/null "$url" 2>/dev/null; then
            say "$url: 200"
            return 0
        fi
        sleep 1
    done
    curl -sS "$url" >&2 || true
    die "$url did not answer 200 within 60 s"
}

install_and_check() {
    local bundle=$1 dir out rc=0
    local installed=/opt/stellarbase/current/stellarbase
    rm -rf "$WORK/unpacked" && mkdir -p "$WORK/unpacked"
    tar -xf "$bundle" -C "$WORK/unpacked"
    dir=$(echo "$WORK"/unpacked/stellarbase-*)
    (cd "$dir" && sha256sum --quiet -c SHA256SUMS) || die "$bundle: a file fails its digest"

    say "install --bundle $bundle --tier pilot"
    "$dir/stellarbase" install --bundle "$bundle" --tier pilot || {
        rc=$?
        if ((rc == 12)); then
            say "a bundle signed with another key than the release key needs" \
                "STELLARBASE_RELEASE_PUBKEY; SB_BUILD=vm builds one here" >&2
        fi
        die "install exited $rc"
    }
    "$installed" status
    "$installed" doctor || rc=$?
    ((rc == 0 || rc == 10)) || die "doctor exited $rc: a check failed"
    for port in "${READYZ_PORTS[@]}"; do wait_ready "$port"; done

    say "install again: it must change nothing"
    out=$("$dir/stellarbase" install --bundle "$bundle" --tier pilot 2>&1) ||
        die "the second install exited $?: $out"
    echo "$out"
    grep -q '^0 changed' <<<"$out" || die "the second install changed something"
}

main() {
    local distro shared bundle
    if [[ ${1:-} == --detect ]]; then
        detect_distro || die "unsupported distribution in $OS_RELEASE"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "run as root (Vagrant's shell provisioner does)"
    distro=$(detect_distro) || die "unsupported distribution in $OS_RELEASE"
    say "$distro, glibc $(glibc_version)"
    mkdir -p "$WORK"
    if [[ -n ${STELLARBASE_RELEASE_PUBKEY:-} ]]; then
        # As root, stellarbase trusts a key file of root's own only; the synced folder is not.
        install -o root -g root -m 644 "$STELLARBASE_RELEASE_PUBKEY" "$WORK/trusted-release.pem"
        export STELLARBASE_RELEASE_PUBKEY=$WORK/trusted-release.pem
    fi
    install_packages "$distro"
    if [[ $distro == el9 ]]; then relax_selinux; fi

    shared=$(shared_bundle)
    if use_shared_bundle "$shared"; then
        bundle=$shared
    else
        build_bundle "$distro"
        bundle=$(echo "$WORK"/bundle/stellarbase-*.tar.gz)
    fi
    install_and_check "$bundle"
    if [[ $distro == el9 ]]; then report_selinux; fi
    say "OK: $distro"
}

# Sourced, as tests/unit/test_vagrantfile.py does, the script only defines its functions.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
