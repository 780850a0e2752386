#!/usr/bin/env bash
# Exercise the built binary on the code paths that import libraries lazily, which the build's
# smoke test (version, config) does not reach:
#   - `run api` with PostgreSQL, Redis and S3 pointed at a closed port: /healthz is 200,
#     /readyz is 503 with three failed checks whose messages are connection errors (not
#     ImportError or missing botocore data), /metrics is Prometheus text, and SIGTERM stops
#     it with exit status 0;
#   - `install --root DIR` (offline: no dependencies configured) twice; the second run
#     reports `0 changed`.
#
# Usage: packaging/verify.sh [BINARY]      (default dist/stellarbase; needs curl, python3)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BINARY=$(realpath "${1:-dist/stellarbase}")

work=$(mktemp -d)
pid=""
cleanup() {
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "verify.sh: FAIL: $*" >&2; exit 1; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/api.json" <<EOF
{"service": "api", "bind": "127.0.0.1", "port": $port, "log_level": "info",
 "check_timeout_seconds": 2,
 "postgres": {"url": "postgresql://u@127.0.0.1:1/d", "password": null},
 "redis": {"url": "redis://127.0.0.1:1/0", "password": null},
 "s3": {"endpoint": "http://127.0.0.1:1", "bucket": "bucket-x", "region": "us-east-1",
        "addressing": "path", "checksums": "when_required", "access_key": null,
        "secret_key": null}}
EOF

# --- run api ------------------------------------------------------------------------------
# S3 credentials come from the environment, as the units get them from secrets.env, so that
# botocore gets as far as opening a connection (without any it stops at "Unable to locate
# credentials").
STELLARBASE_S3__ACCESS_KEY=verify STELLARBASE_S3__SECRET_KEY=verify AWS_EC2_METADATA_DISABLED=true \
    "$BINARY" run api --settings "$work/api.json" >"$work/api.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/api.log" >&2; fail "run api exited early"; }
    sleep 0.1
done

code=$(curl -sS -o "$work/healthz" -w '%{http_code}' "http://127.0.0.1:$port/healthz")
[[ "$code" == 200 ]] || fail "/healthz answered $code"
echo "/healthz: $code $(cat "$work/healthz")"

t0=$(date +%s.%N)
code=$(curl -sS -o "$work/readyz" -w '%{http_code}' "http://127.0.0.1:$port/readyz")
t1=$(date +%s.%N)
echo "/readyz: $code in $(python3 -c "print(f'{$t1 - $t0:.3f}s')")"
[[ "$code" == 503 ]] || fail "/readyz answered $code, expected 503"
python3 - "$work/readyz" <<'EOF'
import json, sys
body = json.load(open(sys.argv[1]))
print(json.dumps(body, indent=2))
checks = {c["name"]: c for c in body["checks"]}
assert set(checks) == {"postgres", "redis", "s3"}, f"checks: {sorted(checks)}"
bad = ("ImportError", "ModuleNotFoundError", "No module named", "UnknownServiceError",
       "DataNotFoundError", "Unable to load data", "unexpected error")
for name, c in checks.items():
    assert c["status"] == "fail", f"{name} did not fail: {c}"
    assert not any(b in c["message"] for b in bad), f"{name}: packaging problem: {c['message']}"
expect = {"postgres": "connection refused", "redis": "connection refused",
          "s3": "could not connect to the endpoint url"}
for name, word in expect.items():
    msg = checks[name]["message"].lower()
    assert word in msg, f"{name}: not a connection error: {checks[name]['message']}"
EOF

code=$(curl -sS -o "$work/metrics" -w '%{http_code}' "http://127.0.0.1:$port/metrics")
[[ "$code" == 200 ]] || fail "/metrics answered $code"
grep -q '^# TYPE stellarbase_build_info gauge' "$work/metrics" || fail "/metrics: no build_info"
grep -q '^stellarbase_dependency_up{dependency="s3"} 0.0' "$work/metrics" \
    || fail "/metrics: no dependency_up for s3"
echo "/metrics: $code, $(grep -c '^stellarbase_' "$work/metrics") stellarbase_ samples"

t0=$(date +%s.%N)
kill -TERM "$pid"
rc=0
for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
kill -0 "$pid" 2>/dev/null && fail "run api still running 5s after SIGTERM"
wait "$pid" || rc=$?
t1=$(date +%s.%N)
pid=""
echo "SIGTERM: exit status $rc after $(python3 -c "print(f'{$t1 - $t0:.3f}s')")"
[[ "$rc" == 0 ]] || { cat "$work/api.log" >&2; fail "run api exited $rc on SIGTERM"; }
if grep -E 'Traceback|ImportError|ModuleNotFoundError' "$work/api.log"; then
    fail "run api logged an import problem"
fi

# --- install into a test root ---------------------------------------------------------------
root="$work/root"
mkdir -p "$root"
host_paths=(/etc/stellarbase /var/lib/stellarbase /opt/stellarbase /etc/sysusers.d/stellarbase.conf
            /etc/systemd/system/stellarbase.target /etc/systemd/system/stellarbase-api.service)
host_before=$(ls -ld "${host_paths[@]}" 2>&1; grep -c '^stellarbase:' /etc/passwd || true)
"$BINARY" install --root "$root" --binary "$BINARY" >"$work/install1.log" 2>&1 \
    || { cat "$work/install1.log" >&2; fail "first install failed"; }
tail -n 1 "$work/install1.log"
"$BINARY" install --root "$root" --binary "$BINARY" >"$work/install2.log" 2>&1 \
    || { cat "$work/install2.log" >&2; fail "second install failed"; }
tail -n 1 "$work/install2.log"
grep -q '^0 changed' "$work/install2.log" || fail "second install changed something"
echo "install wrote $(find "$root" -mindepth 1 | wc -l) paths under the test root"
host_after=$(ls -ld "${host_paths[@]}" 2>&1; grep -c '^stellarbase:' /etc/passwd || true)
[[ "$host_before" == "$host_after" ]] || fail "install --root changed the host itself"

echo "verify.sh: OK"
