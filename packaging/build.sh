#!/usr/bin/env bash
# Build the single-file stellarbase executable with PyInstaller and smoke-test it.
#
# Usage: packaging/build.sh          (from anywhere; needs the project venv in .venv/)
# Result: dist/stellarbase
# DISTPATH and WORKPATH (default dist and build/pyinstaller, relative to the repository root)
# put the binary and PyInstaller's work files elsewhere, e.g. two builds side by side whose
# bytes are compared (packaging/README.md, "Reproducible builds").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYINSTALLER=.venv/bin/pyinstaller
DISTPATH=${DISTPATH:-dist}
WORKPATH=${WORKPATH:-build/pyinstaller}
BINARY=$DISTPATH/stellarbase

if [[ ! -x "$PYINSTALLER" ]]; then
    echo "build.sh: $PYINSTALLER not found; create the venv and install '.[dev]' first" >&2
    exit 1
fi

# One build at a time per checkout: two concurrent runs share build/ and dist/, and
# --clean empties PyInstaller's binary cache under the other's feet. The cache is kept in
# this checkout (not ~/.cache/pyinstaller) so other checkouts on the host do not interfere.
mkdir -p build
exec 9>build/.build.lock
if ! flock -n 9; then
    echo "build.sh: another build of this checkout is running; waiting for it" >&2
    flock 9
fi
export PYINSTALLER_CONFIG_DIR="$PWD/build/pyinstaller-cache"

start=$(date +%s)
# PyInstaller collects module names in sets, so with a random hash seed the order of the
# entries of base_library.zip, and with it the binary's bytes, changes from build to build.
PYTHONHASHSEED=0 "$PYINSTALLER" --noconfirm --clean \
    --distpath "$DISTPATH" --workpath "$WORKPATH" packaging/stellarbase.spec
elapsed=$(( $(date +%s) - start ))

if [[ ! -x "$BINARY" ]]; then
    echo "build.sh: $BINARY was not produced" >&2
    exit 1
fi

size_bytes=$(stat -c %s "$BINARY")
echo "built $BINARY: $(numfmt --to=iec-i --suffix=B "$size_bytes") ($size_bytes bytes) in ${elapsed}s"

echo "smoke test: $BINARY version"
"$BINARY" version
echo "smoke test: $BINARY config schema"
"$BINARY" config schema >/dev/null
echo "smoke test: $BINARY config show"
"$BINARY" config show

echo "build.sh: OK"
