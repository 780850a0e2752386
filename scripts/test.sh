#!/usr/bin/env bash
# The whole test suite: unit, integration (real PostgreSQL, Redis, S3) and the real-systemd
# tests of the built binary, plus ruff and mypy. Needs root (it boots a throwaway systemd).
# The systemd tests boot the host (Debian 12) and a Debian 13 root, which is built here from
# Debian's archive when it is not cached yet (scripts/test-root.sh; about a minute, once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Not STELLARBASE_*: the binary and its subprocesses read every such variable as site config.
SB_TEST_DEBIAN13_ROOT=$(bash scripts/test-root.sh)
export SB_TEST_DEBIAN13_ROOT
exec .venv/bin/pytest "$@"
