"""A pilot on one bare host: local PostgreSQL and Redis from the distribution's packages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stellarbase import migrate
from stellarbase.envfile import read_env_file
from stellarbase.errors import ExitCode
from tests.filetree import Entry, file_states
from tests.fixtures_systemd import SandboxRoot, on_both_roots
from tests.integration.conftest import copy_binary, free_port_block, ready, wait_for
from tests.systemd_sandbox import SystemdSandbox

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

APP_UNITS = ["stellarbase-agent.service", "stellarbase-api.service", "stellarbase-worker@1.service"]
LOCAL_UNITS = ["stellarbase-postgres.service", "stellarbase-redis.service"]


def _ports() -> list[str]:
    base = free_port_block(8)
    return [
        f"--set=api.port={base}",
        f"--set=agent.port={base + 1}",
        f"--set=worker.port={base + 2}",
        f"--set=local.postgres.port={base + 4}",
        f"--set=local.redis.port={base + 5}",
    ]


def _sb(sandbox: SystemdSandbox, binary: Path, *args: str) -> tuple[int, str, str]:
    out = sandbox.run([str(binary), *args], check=False, timeout=240)
    return out.returncode, out.stdout, out.stderr


def _installed_files(sandbox: SystemdSandbox) -> dict[str, Entry]:
    """Config, units, releases and state as they lie on disk."""
    tops = ["/etc/stellarbase", "/etc/systemd/system", "/opt/stellarbase"]
    return file_states(*map(sandbox.path, [*tops, "/var/lib/stellarbase/state.json"]))


@on_both_roots
def test_pilot_with_no_config_runs_its_own_postgres_and_redis(
    systemd_sandbox: SystemdSandbox, binary: Path, sandbox_root: SandboxRoot
) -> None:
    sandbox = systemd_sandbox
    sb = copy_binary(sandbox, binary)
    ports = _ports()
    code, out, err = _sb(sandbox, sb, "install", "--tier", "pilot", *ports, "-o", "json")
    assert code == 0, out + err
    result = json.loads(out)["data"]
    for unit in [*LOCAL_UNITS, *APP_UNITS]:
        assert sandbox.systemctl("is-active", unit, check=False).stdout.strip() == "active", unit
    for url in result["endpoints"].values():
        body = json.loads(sandbox.run(["curl", "-s", f"{url}/readyz"]).stdout)
        checks = {c["name"]: c["status"] for c in body["checks"]}
        # The agent's /readyz adds the host's own checks (collection, unit:…, readyz:…).
        assert {n: s for n, s in checks.items() if n in ("postgres", "redis", "s3")} == {
            "postgres": "pass",
            "redis": "pass",
        }
        assert set(checks.values()) == {"pass"}

    # data under /var/lib/stellarbase, passwords only in the secrets files
    pg_version = sandbox.path("/var/lib/stellarbase/postgres/PG_VERSION").read_text().strip()
    assert pg_version == sandbox_root.postgres
    assert sandbox.path("/var/lib/stellarbase/redis/appendonlydir").is_dir()
    secrets = read_env_file(sandbox.path("/etc/stellarbase/secrets.env"))
    passwords = [secrets["STELLARBASE_POSTGRES__PASSWORD"], secrets["STELLARBASE_REDIS__PASSWORD"]]
    admin = read_env_file(sandbox.path("/etc/stellarbase/postgres-admin.env"))
    passwords.append(admin["STELLARBASE_LOCAL_POSTGRES_ADMIN_PASSWORD"])
    assert oct(sandbox.path("/etc/stellarbase/postgres-admin.env").stat().st_mode)[-3:] == "600"
    elsewhere = sandbox.run(
        [
            "sh",
            "-c",
            "cat /etc/systemd/system/stellarbase* /etc/stellarbase/stellarbase.yaml "
            "/etc/stellarbase/services/*.json /var/lib/stellarbase/state.json; "
            "ps -eo args; journalctl --no-pager -o cat",
        ],
    ).stdout
    for password in passwords:
        assert password not in elsewhere
    redis_port = ports[4].split("=")[-1]
    cli = ["redis-cli", "-p", redis_port, "--no-auth-warning", "-a", passwords[1]]
    policy = sandbox.run([*cli, "CONFIG", "GET", "maxmemory-policy"]).stdout.split()
    assert policy == ["maxmemory-policy", "noeviction"]
    assert sandbox.run([*cli, "CONFIG", "GET", "appendonly"]).stdout.split()[-1] == "yes"
    assert "NOAUTH" in sandbox.run(["redis-cli", "-p", redis_port, "PING"]).stdout

    # semantic search needs pgvector (Debian 13's root has it, Debian 12 lacks it): status
    # says which, and with it the extension really is in the database and answers
    code, out, _ = _sb(sandbox, sb, "status", "-o", "json")
    assert json.loads(out)["data"]["features"]["vector"] is sandbox_root.pgvector
    code, out, _ = _sb(sandbox, sb, "status")
    assert ("semantic search: off" in out) is not sandbox_root.pgvector, out

    def app_sql(query: str) -> str:
        argv = ["psql", "-h", "127.0.0.1", "-p", ports[3].split("=")[-1], "-U", "stellarbase"]
        out = sandbox.run([*argv, "-tAc", query], env={"PGPASSWORD": passwords[0]})
        return out.stdout.strip()

    vector = app_sql("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    if sandbox_root.pgvector:
        assert vector.startswith("0.8"), vector
        assert app_sql("SELECT '[1,2,3]'::vector <-> '[1,2,5]'::vector") == "2"
    else:
        assert vector == ""

    # a re-run changes nothing
    pids = {u: sandbox.main_pid(u) for u in [*LOCAL_UNITS, *APP_UNITS]}
    code, out, err = _sb(sandbox, sb, "install", "--tier", "pilot", *ports, "-o", "json")
    assert code == 0 and json.loads(out)["data"]["changed"] == 0, out + err
    assert {u: sandbox.main_pid(u) for u in pids} == pids

    # restarting PostgreSQL: the services stay up and their readiness recovers
    sandbox.systemctl("restart", "stellarbase-postgres.service")
    wait_for(
        "readiness after a PostgreSQL restart",
        lambda: all(ready(url) for url in result["endpoints"].values()),
    )
    assert {u: sandbox.main_pid(u) for u in APP_UNITS} == {u: pids[u] for u in APP_UNITS}

    # a migration that fails halfway: nothing of it remains, the services keep running
    shipped = sandbox.path("/root/migrations")
    shipped.mkdir()
    for sql in sorted(Path(migrate.BUILTIN_DIR).glob("*.sql")):
        (shipped / sql.name).write_bytes(sql.read_bytes())
    (shipped / "9001_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT no_such_function();\n"
    )
    api_port = int(ports[0].split("=")[-1])
    moved = [f"--set=api.port={api_port + 6}", *ports[1:]]  # the API would restart
    files_before = _installed_files(sandbox)
    out = sandbox.run(
        [str(sb), "install", "--tier", "pilot", *moved],
        check=False,
        env={"STELLARBASE_MIGRATIONS_DIR": "/root/migrations"},
        timeout=240,
    )
    assert out.returncode == ExitCode.MIGRATION, out.stdout + out.stderr
    assert "9001_broken" in out.stderr
    # nothing had restarted yet, so the config and units on disk are put back as well
    assert "paths this run changed are as they were" in out.stderr
    assert _installed_files(sandbox) == files_before
    assert {u: sandbox.main_pid(u) for u in APP_UNITS} == {u: pids[u] for u in APP_UNITS}
    assert all(ready(url) for url in result["endpoints"].values())
    psql = sandbox.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            ports[3].split("=")[-1],
            "-U",
            "stellarbase",
            "-tAc",
            "SELECT to_regclass('half_done') IS NULL, max(version) FROM stellarbase_migrations",
        ],
        env={"PGPASSWORD": passwords[0]},
    )
    assert psql.stdout.strip() == "t|2"
    code, out, err = _sb(sandbox, sb, "install", "--tier", "pilot", *ports)  # back as it was
    assert code == 0, out + err

    # every operation left an audit row
    code, out, err = _sb(sandbox, sb, "audit", "-o", "json")
    assert code == 0, err
    rows = json.loads(out)["data"]
    actions = [(r["action"], r["outcome"]) for r in rows["rows"]]
    assert actions.count(("install", "success")) == 3
    assert ("install", "failure") in actions

    # uninstall --purge removes the local data too
    code, out, err = _sb(sandbox, sb, "uninstall", "--purge", "--yes")
    assert code == 0, err
    assert not sandbox.path("/var/lib/stellarbase").exists()
    assert sandbox.run(["pgrep", "-u", "stellarbase"], check=False).stdout == ""


def test_missing_postgres_names_the_package_and_changes_nothing(
    systemd_sandbox: SystemdSandbox, binary: Path
) -> None:
    sandbox = systemd_sandbox
    sb = copy_binary(sandbox, binary)
    # Hide the server binaries inside the sandbox only (the overlay keeps the host intact).
    sandbox.run(["mount", "-t", "tmpfs", "none", "/usr/lib/postgresql"])
    before = sandbox.run(["find", "/etc", "/opt", "/var/lib"]).stdout
    code, out, err = _sb(sandbox, sb, "install", "--tier", "pilot")
    assert code == ExitCode.HOST, out + err
    assert "apt-get install postgresql" in err
    assert sandbox.run(["find", "/etc", "/opt", "/var/lib"]).stdout == before
