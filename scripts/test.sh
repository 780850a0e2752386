#!/usr/bin/env bash
# The whole test suite: unit, integration (real PostgreSQL, Redis, S3) and the real-systemd
# tests of the built binary, plus ruff and mypy. Needs root (it boots a throwaway systemd).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pytest "$@"
