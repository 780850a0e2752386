"""Schema migrations against a real PostgreSQL: each test gets a database of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from stellarbase.errors import ExitCode, StellarError
from stellarbase.migrate import (
    BUILTIN_DIR,
    LOCK_KEY,
    applied_schema,
    load_migrations,
    migrate_up,
    migration_status,
)
from tests import servers
from tests.cli import run_cli

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [m.version for m in load_migrations()]


@pytest.fixture
def db_url(postgres_server: servers.PostgresServer) -> str:
    return servers.create_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    """A copy of the shipped migrations that a test may edit."""
    return Path(shutil.copytree(BUILTIN_DIR, tmp_path / "migrations"))


def _query(server: servers.PostgresServer, url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, password=server.password, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def _applied(server: servers.PostgresServer, url: str) -> list[int]:
    rows = _query(server, url, "SELECT version FROM stellarbase_migrations ORDER BY version")
    return [r[0] for r in rows]


def _tables(server: servers.PostgresServer, url: str) -> set[str]:
    rows = _query(server, url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r[0] for r in rows}


def _cli_env(server: servers.PostgresServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLARBASE_")}
    return {**env, "STELLARBASE_POSTGRES__PASSWORD": server.password}


def _site_file(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "site.yaml"
    site = {"tier": "pilot", "dependencies": {"mode": "external"}, "postgres": {"url": url}}
    path.write_text(yaml.safe_dump(site))
    return path


def test_fresh_database_gets_every_migration_once(
    postgres_server: servers.PostgresServer, db_url: str
) -> None:
    pw = postgres_server.password
    applied = migrate_up(db_url, pw)

    assert [m.version for m in applied] == SHIPPED == [1, 2]
    assert _applied(postgres_server, db_url) == SHIPPED
    assert {"config", "documents", "jobs", "audit_log"} <= _tables(postgres_server, db_url)
    states = migration_status(db_url, pw)
    assert [(s.version, s.state) for s in states] == [(1, "applied"), (2, "applied")]
    assert all(s.applied_at is not None and s.checksum_matches for s in states)
    assert migrate_up(db_url, pw) == []
    assert _applied(postgres_server, db_url) == SHIPPED


def test_schema_keeps_its_promises(postgres_server: servers.PostgresServer, db_url: str) -> None:
    migrate_up(db_url, postgres_server.password)
    with psycopg.connect(db_url, password=postgres_server.password, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO documents (bucket, object_key, size_bytes) VALUES ('b', 'k', 1) "
            "RETURNING id, metadata"
        ).fetchone()
        assert row is not None and isinstance(row[0], uuid.UUID) and row[1] == {}
        conn.execute("INSERT INTO jobs (kind) VALUES ('ingest')")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO jobs (kind, state) VALUES ('ingest', 'exploded')")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO audit_log (actor, host, action, outcome, correlation_id) "
                "VALUES ('a', 'h', 'x', 'maybe', 'c')"
            )


def test_status_of_an_empty_database_creates_nothing(
    postgres_server: servers.PostgresServer, db_url: str
) -> None:
    states = migration_status(db_url, postgres_server.password)

    assert [(s.version, s.state, s.applied_at) for s in states] == [
        (1, "pending", None),
        (2, "pending", None),
    ]
    assert _tables(postgres_server, db_url) == set()


def test_to_stops_at_a_version_and_never_goes_back(
    postgres_server: servers.PostgresServer, db_url: str
) -> None:
    pw = postgres_server.password
    assert [m.version for m in migrate_up(db_url, pw, to=1)] == [1]
    assert "audit_log" not in _tables(postgres_server, db_url)
    assert [s.state for s in migration_status(db_url, pw)] == ["applied", "pending"]

    assert [m.version for m in migrate_up(db_url, pw, to=2)] == [2]
    with pytest.raises(StellarError) as err:
        migrate_up(db_url, pw, to=1)
    assert err.value.code == ExitCode.MIGRATION
    assert "already at version 2" in err.value.message
    with pytest.raises(StellarError) as err:
        migrate_up(db_url, pw, to=7)
    assert err.value.code == ExitCode.USAGE


def test_changed_migration_is_refused_before_anything_runs(
    postgres_server: servers.PostgresServer, db_url: str, migrations: Path
) -> None:
    pw = postgres_server.password
    migrate_up(db_url, pw, directory=migrations)
    core = migrations / "0001_core.sql"
    core.write_text(core.read_text() + "\nCREATE TABLE sneaky (id int);\n")
    (migrations / "0003_more.sql").write_text("CREATE TABLE more (id int);\n")

    with pytest.raises(StellarError) as err:
        migrate_up(db_url, pw, directory=migrations)

    assert err.value.code == ExitCode.MIGRATION
    assert "0001_core.sql" in err.value.message
    assert "restore the shipped file" in err.value.hint
    assert {"sneaky", "more"}.isdisjoint(_tables(postgres_server, db_url))
    assert _applied(postgres_server, db_url) == [1, 2]
    states = migration_status(db_url, pw, directory=migrations)
    assert [s.state for s in states] == ["changed", "applied", "pending"]


def test_failing_migration_leaves_nothing_of_itself(
    postgres_server: servers.PostgresServer, db_url: str, migrations: Path
) -> None:
    (migrations / "0003_half_done.sql").write_text(
        "CREATE TABLE half_done (id int);\n"
        "INSERT INTO half_done VALUES (1);\n"
        "SELECT no_such_function();\n"
    )

    with pytest.raises(StellarError) as err:
        migrate_up(db_url, postgres_server.password, directory=migrations)

    assert err.value.code == ExitCode.MIGRATION
    assert "0003_half_done.sql" in err.value.message
    assert "no_such_function" in err.value.message
    assert "\n" not in err.value.message
    assert "half_done" not in _tables(postgres_server, db_url)
    assert _applied(postgres_server, db_url) == [1, 2]


def test_database_newer_than_the_binary_runs_while_compatible(
    postgres_server: servers.PostgresServer, db_url: str, migrations: Path
) -> None:
    pw = postgres_server.password
    (migrations / "0003_future.sql").write_text("CREATE TABLE future (id int);\n")
    migrate_up(db_url, pw, directory=migrations)

    # additive: the release before (shipping 1 and 2) still runs, and applies nothing
    assert migrate_up(db_url, pw) == []
    assert [s.state for s in migration_status(db_url, pw)] == ["applied", "applied", "unknown"]
    assert applied_schema(db_url, pw) == (3, 0)

    (migrations / "0004_breaking.sql").write_text(
        "-- compatible-from: 4\nALTER TABLE future RENAME COLUMN id TO key;\n"
    )
    migrate_up(db_url, pw, directory=migrations)
    assert applied_schema(db_url, pw) == (4, 4)
    with pytest.raises(StellarError) as err:
        migrate_up(db_url, pw)
    assert err.value.code == ExitCode.MIGRATION
    assert "0004_breaking" in err.value.message
    assert "schema 4 or newer; this one ships up to 2" in err.value.message
    assert "schema never goes back" in err.value.hint


def test_compatible_from_above_its_own_version_is_refused(migrations: Path) -> None:
    (migrations / "0003_odd.sql").write_text("-- compatible-from: 5\nSELECT 1;\n")
    with pytest.raises(StellarError) as err:
        load_migrations(migrations)
    assert "compatible-from 5 lies above its own version 3" in err.value.message


def test_migration_slipped_in_below_the_newest_is_refused(
    postgres_server: servers.PostgresServer, db_url: str, migrations: Path
) -> None:
    pw = postgres_server.password
    (migrations / "0003_later.sql").write_text("CREATE TABLE later (id int);\n")
    migrate_up(db_url, pw, directory=migrations)
    # As if 0002 had been added to the files after 0003 was applied.
    _query(postgres_server, db_url, "DELETE FROM stellarbase_migrations WHERE version = 2")
    _query(postgres_server, db_url, "DROP TABLE audit_log")

    with pytest.raises(StellarError) as err:
        migrate_up(db_url, pw, directory=migrations)

    assert "0002_audit_log.sql is not applied but the later version 3 is" in err.value.message
    assert "audit_log" not in _tables(postgres_server, db_url)


@pytest.mark.parametrize("name", ["1_core.sql", "0001-core.sql", "0000_zero.sql", "0001_Core.sql"])
def test_bad_file_names_are_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("SELECT 1;\n")
    with pytest.raises(StellarError) as err:
        load_migrations(tmp_path)
    assert err.value.code == ExitCode.MIGRATION
    assert name in err.value.message


def test_duplicate_versions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;\n")
    (tmp_path / "0001_b.sql").write_text("SELECT 1;\n")
    with pytest.raises(StellarError, match=r"0001_b\.sql: version 1 is taken by 0001_a\.sql"):
        load_migrations(tmp_path)


def test_lock_wait_is_bounded(postgres_server: servers.PostgresServer, db_url: str) -> None:
    with psycopg.connect(db_url, password=postgres_server.password, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        start = time.monotonic()
        with pytest.raises(StellarError) as err:
            migrate_up(db_url, postgres_server.password, lock_wait=1)
        waited = time.monotonic() - start

        assert err.value.code == ExitCode.MIGRATION
        assert f"server PID {holder.info.backend_pid}" in err.value.message
        assert 1 <= waited < 10
        assert _tables(postgres_server, db_url) == set()


def test_unreachable_server_is_a_dependency_error(dead_port: int) -> None:
    with pytest.raises(StellarError) as err:
        migrate_up(f"postgresql://stellarbase@127.0.0.1:{dead_port}/x", "pw", connect_timeout=2)
    assert err.value.code == ExitCode.DEPENDENCY
    assert f"127.0.0.1:{dead_port}/x" in err.value.message


def test_two_hosts_migrating_at_once_apply_each_migration_once(
    postgres_server: servers.PostgresServer, db_url: str, tmp_path: Path
) -> None:
    site = _site_file(tmp_path, db_url)
    argv = [sys.executable, "-m", "stellarbase", "migrate", "up", "--config", str(site)]
    env = _cli_env(postgres_server)
    with psycopg.connect(db_url, password=postgres_server.password, autocommit=True) as gate:
        # Both runs queue on the lock the test holds, so they race for it the moment it goes.
        gate.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        procs = [
            subprocess.Popen(
                [*argv, "-o", "json"],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                row = gate.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'stellarbase migrate'"
                ).fetchone()
                if row and row[0] == 2:
                    break
                assert all(p.poll() is None for p in procs), "a run ended before the race"
                time.sleep(0.05)
            else:
                pytest.fail("the two runs never both waited for the lock")
        finally:
            gate.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        outputs = [p.communicate(timeout=120) for p in procs]

    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out + err
    applied = sorted(json.loads(out)["data"]["applied"] for out, _ in outputs)
    assert applied == [[], [1, 2]]
    rows = _query(
        postgres_server,
        db_url,
        "SELECT version, count(*) FROM stellarbase_migrations GROUP BY version ORDER BY version",
    )
    assert rows == [(1, 1), (2, 1)]


def test_cli_migrate_up_and_status(
    postgres_server: servers.PostgresServer, db_url: str, tmp_path: Path
) -> None:
    site = str(_site_file(tmp_path, db_url))
    env = _cli_env(postgres_server)

    def sb(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(env, *args)

    first = sb("migrate", "up", "--config", site, "--to", "1")
    assert first.returncode == 0, first.stderr
    assert "migration 0001_core.sql: applied" in first.stdout
    assert "database at version 1" in first.stdout

    status = sb("migrate", "status", "--config", site, "-o", "json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)["data"]
    assert data["version"] == 1 and data["pending"] == [2]
    assert [m["state"] for m in data["migrations"]] == ["applied", "pending"]

    second = sb("migrate", "up", "--config", site)
    assert second.returncode == 0, second.stderr
    assert "0002_audit_log.sql: applied" in second.stdout

    again = sb("migrate", "up", "--config", site)
    assert again.returncode == 0 and "nothing to apply" in again.stdout, again.stderr

    back = sb("migrate", "up", "--config", site, "--to", "1", "-o", "json")
    assert back.returncode == ExitCode.MIGRATION == 8, back.stderr
    assert "already at version 2" in json.loads(back.stdout)["data"]["error"]
    assert "hint: migrations only go forward" in back.stderr

    text = sb("migrate", "status", "--config", site)
    assert text.returncode == 0, text.stderr
    assert "0002     audit_log" in text.stdout and "0 pending" in text.stdout
