"""A converged pilot whose local PostgreSQL and Redis hold data, in a real systemd.

A refused install (a dependency switched to external, another tier, an invalid value) must
leave the data, the files, the units and their processes exactly as they were, and say so
at once. `--retire-local` stops the local servers and keeps their data, which a later
local install adopts again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from stellarbase.envfile import read_env_file
from stellarbase.errors import ExitCode
from tests.filetree import Entry, file_states
from tests.integration.conftest import copy_binary, ready
from tests.integration.test_local_pilot import APP_UNITS, LOCAL_UNITS, _ports
from tests.systemd_sandbox import SystemdSandbox

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

UNITS = [*LOCAL_UNITS, *APP_UNITS, "stellarbase.target", "stellarbase-supervise.socket"]
CANARY_ROWS = 1000
# A refusal is decided before the first change: the binary's start-up plus the checks.
REFUSAL_SECONDS = 3.0


def _option(ports: list[str], key: str) -> int:
    return int(next(p for p in ports if p.startswith(f"--set={key}=")).split("=")[-1])


def _psql(sandbox: SystemdSandbox, port: int, password: str, sql: str) -> str:
    argv = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "stellarbase", "-d", "stellarbase"]
    out = sandbox.run([*argv, "-tAc", sql], env={"PGPASSWORD": password})
    return out.stdout.strip()


def _redis(sandbox: SystemdSandbox, port: int, password: str, *args: str) -> str:
    cli = ["redis-cli", "-p", str(port), "--no-auth-warning", "-a", password]
    return sandbox.run([*cli, *args]).stdout.strip()


def _host_state(sandbox: SystemdSandbox) -> dict[str, Any]:
    """Files (config, units, releases, state), what lies in the data dir, unit states."""
    tops = ["/etc/stellarbase", "/etc/systemd/system", "/opt/stellarbase"]
    files: dict[str, Entry] = file_states(
        *map(sandbox.path, [*tops, "/var/lib/stellarbase/state.json"])
    )
    show = sandbox.systemctl(
        "show", "--property=Id,ActiveState,SubState,MainPID,LoadState", *UNITS
    ).stdout
    data = sorted(p.name for p in sandbox.path("/var/lib/stellarbase").iterdir())
    return {"files": files, "units": show, "data": data}


def test_refused_installs_keep_the_data_and_retire_local_leaves_it_on_disk(
    systemd_sandbox: SystemdSandbox, binary: Path, site_deps: dict[str, Any]
) -> None:
    sandbox = systemd_sandbox
    sb = copy_binary(sandbox, binary)
    ports = _ports()
    pg_port, redis_port = _option(ports, "local.postgres.port"), _option(ports, "local.redis.port")

    def install(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, float]:
        start = time.monotonic()
        out = sandbox.run([str(sb), "install", *args], check=False, env=env, timeout=300)
        return out.returncode, out.stdout + out.stderr, time.monotonic() - start

    code, out, _ = install("--tier", "pilot", *ports)
    assert code == 0, out
    secrets = read_env_file(sandbox.path("/etc/stellarbase/secrets.env"))
    pg_password = secrets["STELLARBASE_POSTGRES__PASSWORD"]
    redis_password = secrets["STELLARBASE_REDIS__PASSWORD"]
    _psql(
        sandbox,
        pg_port,
        pg_password,
        f"CREATE TABLE canary AS SELECT n FROM generate_series(1, {CANARY_ROWS}) n",
    )
    assert _redis(sandbox, redis_port, redis_password, "SET", "canary", "kept") == "OK"
    before = _host_state(sandbox)

    external = [
        "--set=dependencies.mode=external",
        f"--set=postgres.url={site_deps['postgres']['url']}",
        f"--set=redis.url={site_deps['redis']['url']}",
    ]
    external_env = {
        "STELLARBASE_POSTGRES__PASSWORD": site_deps["postgres"]["password"],
        "STELLARBASE_REDIS__PASSWORD": site_deps["redis"]["password"],
    }
    refused: list[tuple[list[str], dict[str, str] | None, str]] = [
        # item 1 of the report: external without a URL used to delete the cluster
        (["--tier", "pilot", "--set=dependencies.mode=external", *ports], None, "postgres.url"),
        (["--tier", "department", *ports], None, "postgres.url"),
        # with URLs, but the local data has not been moved
        (["--tier", "pilot", *ports, *external], external_env, "--retire-local"),
        (
            ["--tier", "pilot", *ports, external[0].replace("mode", "redis"), external[2]],
            {"STELLARBASE_REDIS__PASSWORD": external_env["STELLARBASE_REDIS__PASSWORD"]},
            "--retire-local",
        ),
        # item 2: a schedule systemd cannot parse used to restart PostgreSQL first
        (
            [
                "--tier",
                "pilot",
                *ports,
                "--set=backup.repository=file:///srv/sb-backups",
                "--set=backup.schedule=every tuesday-ish",
            ],
            None,
            "backup.schedule",
        ),
        (["--tier", "pilot", *ports, "--set=api.limits.memory_max=512"], None, "memory_max"),
    ]
    timings = []
    for args, env, needle in refused:
        code, out, took = install(*args, env=env)
        timings.append(took)
        assert code == ExitCode.CONFIG, (args, out)
        lines = out.strip().splitlines()
        assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), out
        assert needle in out, out
        assert took < REFUSAL_SECONDS, (args, took)
        assert _host_state(sandbox) == before, args
    print("refused installs took " + ", ".join(f"{t:.2f}s" for t in timings))
    assert _psql(sandbox, pg_port, pg_password, "SELECT count(*) FROM canary") == str(CANARY_ROWS)
    assert not sandbox.path("/srv/sb-backups").exists()

    # the way forward: the data moved (here: nowhere, it is a test), then --retire-local
    code, out, _ = install("--tier", "pilot", *ports, *external, "--retire-local", "-o", "json",
                           env=external_env)  # fmt: skip
    assert code == 0, out
    result = json.loads(out)["data"]
    for unit in LOCAL_UNITS:
        assert sandbox.systemctl("is-active", unit, check=False).stdout.strip() == "inactive"
        assert not sandbox.path(f"/etc/systemd/system/{unit}").exists()
    assert all(ready(url) for url in result["endpoints"].values())
    for data in ("postgres/PG_VERSION", "redis/appendonlydir"):
        assert sandbox.path(f"/var/lib/stellarbase/{data}").exists(), data
    assert sandbox.path("/etc/stellarbase/postgres-admin.env").is_file()

    # back to local: the cluster and the Redis data left on disk are adopted, not replaced
    code, out, _ = install("--tier", "pilot", *ports)
    assert code == 0, out
    secrets = read_env_file(sandbox.path("/etc/stellarbase/secrets.env"))
    pg_password = secrets["STELLARBASE_POSTGRES__PASSWORD"]
    assert _psql(sandbox, pg_port, pg_password, "SELECT count(*) FROM canary") == str(CANARY_ROWS)
    redis_password = secrets["STELLARBASE_REDIS__PASSWORD"]
    assert _redis(sandbox, redis_port, redis_password, "GET", "canary") == "kept"
