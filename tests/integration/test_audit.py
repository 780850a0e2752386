"""The audit log against a real PostgreSQL, through the API and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import yaml

from stellarbase import audit
from stellarbase.commands.migrate import migrate_up_command
from stellarbase.errors import ExitCode, StellarError
from stellarbase.migrate import BUILTIN_DIR, migrate_up
from tests import servers
from tests.cli import run_cli

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_url(postgres_server: servers.PostgresServer) -> str:
    return servers.create_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def migrated(postgres_server: servers.PostgresServer, db_url: str) -> str:
    migrate_up(db_url, postgres_server.password)
    return db_url


def _record(url: str, pw: str, action: str, **details: object) -> None:
    audit.record(
        url, pw, action=action, outcome="success", details=details, correlation_id="c-" + action
    )


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLARBASE_")}
    return {**env, **extra}


def test_record_and_read_back(
    postgres_server: servers.PostgresServer, migrated: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUDO_USER", "deployer")
    before = datetime.now(UTC)
    audit.record(
        migrated,
        postgres_server.password,
        action="install",
        outcome="failure",
        details={"changed": ["unit a"], "error": "boom"},
        correlation_id="cid-1",
    )
    audit.record(
        migrated,
        postgres_server.password,
        action="uninstall",
        outcome="success",
        details={},
        correlation_id="cid-2",
        actor="operator",
    )

    rows = audit.read(migrated, postgres_server.password)

    assert [(r.action, r.outcome, r.actor) for r in rows] == [
        ("install", "failure", "deployer"),
        ("uninstall", "success", "operator"),
    ]
    first = rows[0]
    assert first.host == socket.gethostname()
    assert first.details == {"changed": ["unit a"], "error": "boom"}
    assert first.correlation_id == "cid-1"
    assert before - timedelta(seconds=5) <= first.at <= datetime.now(UTC) + timedelta(seconds=5)


def test_secrets_never_reach_the_table(
    postgres_server: servers.PostgresServer, migrated: str
) -> None:
    details = {
        "step": "write secrets.env",
        "password": "pw-1",
        "s3": {"access_key": "ak-2", "secret_key": "sk-3", "bucket": "docs"},
        "headers": [{"apiToken": "tok-4", "accept": "json"}],
        "keyboard": "stays",
    }
    audit.record(
        migrated,
        postgres_server.password,
        action="install",
        outcome="success",
        details=details,
        correlation_id="c",
    )

    [row] = audit.read(migrated, postgres_server.password)
    assert row.details == {
        "step": "write secrets.env",
        "s3": {"bucket": "docs"},
        "headers": [{"accept": "json"}],
        "keyboard": "stays",
    }
    with psycopg.connect(migrated, password=postgres_server.password) as conn:
        stored = conn.execute("SELECT details::text FROM audit_log").fetchall()
    assert not any(s in stored[0][0] for s in ("pw-1", "ak-2", "sk-3", "tok-4"))


def test_since_and_limit(postgres_server: servers.PostgresServer, migrated: str) -> None:
    pw = postgres_server.password
    for action in ("old", "recent", "newest"):
        _record(migrated, pw, action)
    with psycopg.connect(migrated, password=pw, autocommit=True) as conn:
        conn.execute("UPDATE audit_log SET at = now() - interval '3 hours' WHERE action = 'old'")

    assert [r.action for r in audit.read(migrated, pw)] == ["old", "recent", "newest"]
    since_1h = audit.parse_since("1h")
    assert [r.action for r in audit.read(migrated, pw, since=since_1h)] == ["recent", "newest"]
    iso = (datetime.now(UTC) - timedelta(hours=4)).isoformat()
    assert len(audit.read(migrated, pw, since=audit.parse_since(iso))) == 3
    assert [r.action for r in audit.read(migrated, pw, limit=2)] == ["recent", "newest"]


def test_parse_since() -> None:
    now = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    assert audit.parse_since("90m", now) == now - timedelta(minutes=90)
    assert audit.parse_since("2d", now) == now - timedelta(days=2)
    assert audit.parse_since("2025-04-30T08:00:00Z") == datetime(2025, 4, 30, 8, tzinfo=UTC)
    with pytest.raises(StellarError) as err:
        audit.parse_since("yesterday")
    assert err.value.code == ExitCode.USAGE


def test_record_without_the_table_or_the_server_raises(
    postgres_server: servers.PostgresServer, db_url: str, dead_port: int
) -> None:
    with pytest.raises(StellarError) as err:
        _record(db_url, postgres_server.password, "install")
    assert err.value.code == ExitCode.MIGRATION
    assert "migrate up" in err.value.hint

    dead = f"postgresql://stellarbase@127.0.0.1:{dead_port}/stellarbase"
    with pytest.raises(StellarError) as err:
        _record(dead, "pw", "install")
    assert err.value.code == ExitCode.DEPENDENCY


def test_failed_migrate_up_is_recorded_with_what_it_applied(
    postgres_server: servers.PostgresServer, db_url: str, tmp_path: Path
) -> None:
    migrations = Path(shutil.copytree(BUILTIN_DIR, tmp_path / "migrations"))
    (migrations / "0003_broken.sql").write_text("SELEKT 1;\n")
    pw = postgres_server.password

    with pytest.raises(StellarError) as err:
        migrate_up_command(db_url, pw, to=None, correlation_id="cid-up", directory=migrations)

    assert err.value.details == ["applied before it: 0001_core.sql, 0002_audit_log.sql"]
    [row] = audit.read(db_url, pw)
    assert (row.action, row.outcome, row.correlation_id) == ("migrate up", "failure", "cid-up")
    assert row.details["applied"] == [1, 2]
    assert "0003_broken.sql" in row.details["error"]


def test_cli_audit_lists_the_migrate_rows(
    postgres_server: servers.PostgresServer, db_url: str, tmp_path: Path
) -> None:
    site = tmp_path / "site.yaml"
    data = {"tier": "pilot", "dependencies": {"mode": "external"}, "postgres": {"url": db_url}}
    site.write_text(yaml.safe_dump(data))
    env = _clean_env(STELLARBASE_POSTGRES__PASSWORD=postgres_server.password)
    config = ["--config", str(site)]

    assert run_cli(env, "migrate", "up", *config).returncode == 0
    assert run_cli(env, "migrate", "status", *config).returncode == 0
    assert run_cli(env, "migrate", "up", *config, "--to", "1").returncode == ExitCode.MIGRATION

    out = run_cli(env, "audit", *config, "-o", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["data"]["rows"]
    assert [(r["action"], r["outcome"]) for r in rows] == [
        ("migrate up", "success"),
        ("migrate status", "success"),
        ("migrate up", "failure"),
    ]
    assert rows[0]["details"]["applied"] == [1, 2]
    assert "already at version 2" in rows[2]["details"]["error"]
    assert len({r["correlation_id"] for r in rows}) == 3

    text = run_cli(env, "audit", *config, "--since", "1h", "--limit", "1")
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("\n") == 1 and "failure  migrate up" in text.stdout

    bad = run_cli(env, "audit", *config, "--since", "last week")
    assert bad.returncode == ExitCode.USAGE and "--since" in bad.stderr


def test_cli_reads_the_installed_config(
    postgres_server: servers.PostgresServer, migrated: str, tmp_path: Path
) -> None:
    """Without --config: etc/stellarbase/stellarbase.yaml plus the password in secrets.env."""
    _record(migrated, postgres_server.password, "install")
    etc = tmp_path / "etc" / "stellarbase"
    etc.mkdir(parents=True)
    site = {"tier": "pilot", "dependencies": {"mode": "external"}, "postgres": {"url": migrated}}
    (etc / "stellarbase.yaml").write_text(yaml.safe_dump(site))
    quoted = postgres_server.password.replace("\\", "\\\\").replace('"', '\\"')
    (etc / "secrets.env").write_text(f'# credentials\nSTELLARBASE_POSTGRES__PASSWORD="{quoted}"\n')

    out = run_cli(_clean_env(), "audit", "--root", str(tmp_path), "-o", "json")

    assert out.returncode == 0, out.stderr
    assert [r["action"] for r in json.loads(out.stdout)["data"]["rows"]] == ["install"]


def test_cli_finds_a_local_postgres_through_the_install_state(
    postgres_server: servers.PostgresServer, migrated: str, tmp_path: Path
) -> None:
    """A local PostgreSQL is not in the site file; install recorded its URL in state.json."""
    _record(migrated, postgres_server.password, "install")
    etc = tmp_path / "etc" / "stellarbase"
    etc.mkdir(parents=True)
    (etc / "stellarbase.yaml").write_text(yaml.safe_dump({"tier": "pilot"}))
    (etc / "secrets.env").write_text(
        f'STELLARBASE_POSTGRES__PASSWORD="{postgres_server.password}"\n'
        'STELLARBASE_REDIS__PASSWORD="redis-pw"\n'
    )
    state_dir = tmp_path / "var" / "lib" / "stellarbase"
    state_dir.mkdir(parents=True)
    (state_dir / "state.json").write_text(json.dumps({"database_url": migrated}))

    out = run_cli(_clean_env(), "audit", "--root", str(tmp_path), "-o", "json")

    assert out.returncode == 0, out.stderr
    assert [r["action"] for r in json.loads(out.stdout)["data"]["rows"]] == ["install"]


def test_cli_without_postgres_is_a_config_error(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "stellarbase"
    etc.mkdir(parents=True)
    (etc / "stellarbase.yaml").write_text(yaml.safe_dump({"tier": "pilot"}))

    out = run_cli(_clean_env(), "migrate", "status", "--root", str(tmp_path))

    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert "postgres is not configured" in out.stderr

    missing = run_cli(_clean_env(), "audit", "--root", str(tmp_path / "nowhere"))
    assert missing.returncode == ExitCode.CONFIG
    assert "no installed configuration" in missing.stderr
