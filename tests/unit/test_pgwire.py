"""The small PostgreSQL client the agent uses: URLs, SCRAM, logins, queries and deadlines.

Most tests talk to the real PostgreSQL test server (SCRAM-SHA-256); a second throwaway
cluster with its own pg_hba.conf covers trust, cleartext and MD5 logins.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stellarbase import pgwire
from tests import servers
from tests.fakes import FakePostgres, HungServer


def target(server: servers.PostgresServer, **changes: str | None) -> pgwire.Target:
    url = f"postgresql://{server.user}@{server.host}:{server.port}/{server.database}"
    base = pgwire.parse_url(url, server.password)
    return pgwire.Target(**{**base.__dict__, **changes})


def connect(t: pgwire.Target, seconds: float = 5) -> pgwire.Connection:
    return pgwire.connect(t, time.monotonic() + seconds)


# --- pure ----------------------------------------------------------------------------------


def test_url_parts_and_defaults() -> None:
    t = pgwire.parse_url(
        "postgresql://app%40corp@db.example:6432/my%20db?sslmode=verify-full&sslrootcert=/ca.pem",
        "pw",
    )
    assert (t.host, t.port, t.user, t.database, t.password) == (
        "db.example",
        6432,
        "app@corp",
        "my db",
        "pw",
    )
    assert (t.sslmode, t.sslrootcert) == ("verify-full", "/ca.pem")
    # libpq's defaults: port 5432, the database named after the user, TLS when offered.
    bare = pgwire.parse_url("postgres://app@db")
    assert (bare.port, bare.database, bare.sslmode, bare.password) == (5432, "app", "prefer", None)
    assert "pw" not in repr(t)
    with pytest.raises(ValueError, match="sslmode=sometimes"):
        pgwire.parse_url("postgresql://app@db/x?sslmode=sometimes")


def test_tls_settings_follow_sslmode() -> None:
    def context(mode: str, ca: str | None = None) -> tuple[bool, bool]:
        c = pgwire.tls_context(pgwire.Target("h", 5432, "u", "d", sslmode=mode, sslrootcert=ca))
        return c.verify_mode != pgwire.ssl.CERT_NONE, c.check_hostname

    assert context("prefer") == (False, False)
    assert context("require") == (False, False)
    assert context("verify-ca") == (True, False)
    assert context("verify-full") == (True, True)


def test_scram_matches_the_rfc_7677_example() -> None:
    scram = pgwire.Scram("pencil", user="user", nonce="rOprNGfwEbeRWgbNEkqO")
    assert scram.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = scram.client_final(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert final == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    with pytest.raises(pgwire.AuthenticationError, match="signature is wrong"):
        scram.verify(b"v=" + b"A" * 44)
    scram.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    assert scram.verified


def test_scram_refuses_a_nonce_the_server_made_up() -> None:
    scram = pgwire.Scram("pencil", nonce="abc")
    with pytest.raises(pgwire.AuthenticationError, match="nonce"):
        scram.client_final(b"r=xyz123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")


# --- the real server (SCRAM-SHA-256) --------------------------------------------------------


@pytest.mark.integration
def test_scram_login_learns_the_server_version(postgres_server: servers.PostgresServer) -> None:
    with connect(target(postgres_server)) as conn:
        assert conn.server_version.startswith("15.")
        assert conn.simple_query("SHOW server_version") == [(conn.server_version,)]
        assert conn.parameters["application_name"] == "stellarbase-agent"


@pytest.mark.integration
def test_a_query_returns_text_rows_with_nulls(postgres_server: servers.PostgresServer) -> None:
    with connect(target(postgres_server)) as conn:
        rows = conn.simple_query(
            "SELECT n, CASE WHEN n = 2 THEN NULL ELSE 'ä' || n END"
            " FROM generate_series(1, 3) AS n ORDER BY n"
        )
        assert rows == [("1", "ä1"), ("2", None), ("3", "ä3")]
        assert conn.simple_query("SELECT 1 WHERE false") == []
        assert conn.simple_query("SELECT to_regclass('no_such_table') IS NOT NULL") == [("f",)]


@pytest.mark.integration
def test_a_failing_query_raises_and_leaves_the_session_usable(
    postgres_server: servers.PostgresServer,
) -> None:
    with connect(target(postgres_server)) as conn:
        with pytest.raises(pgwire.ServerError) as failed:
            conn.simple_query("SELECT version FROM no_such_table")
        assert failed.value.sqlstate == "42P01"
        assert 'relation "no_such_table" does not exist' in str(failed.value)
        assert conn.simple_query("SELECT 42") == [("42",)]


@pytest.mark.integration
def test_wrong_password_is_28p01(postgres_server: servers.PostgresServer) -> None:
    with pytest.raises(pgwire.ServerError) as failed:
        connect(target(postgres_server, password="wrong"))
    assert failed.value.sqlstate == "28P01"
    assert str(failed.value) == 'password authentication failed for user "stellarbase"'


@pytest.mark.integration
def test_no_password_says_so(postgres_server: servers.PostgresServer) -> None:
    with pytest.raises(pgwire.AuthenticationError, match="asks for a password"):
        connect(target(postgres_server, password=None))


@pytest.mark.integration
def test_missing_database_is_3d000(postgres_server: servers.PostgresServer) -> None:
    with pytest.raises(pgwire.ServerError) as failed:
        connect(target(postgres_server, database="no_such_db"))
    assert failed.value.sqlstate == "3D000"
    assert str(failed.value) == 'database "no_such_db" does not exist'


@pytest.mark.integration
def test_require_fails_on_a_server_without_tls(postgres_server: servers.PostgresServer) -> None:
    with pytest.raises(ConnectionError, match="does not offer TLS"):
        connect(target(postgres_server, sslmode="require"))
    with connect(target(postgres_server, sslmode="disable")) as conn:
        assert conn.simple_query("SELECT 1") == [("1",)]


# --- deadlines and fakes --------------------------------------------------------------------


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])
def test_a_silent_server_costs_one_deadline(sslmode: str) -> None:
    with HungServer() as hung:
        t = pgwire.Target("127.0.0.1", hung.port, "app", "app", "pw", sslmode=sslmode)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            connect(t, 0.5)
        assert time.monotonic() - start < 1.0


def test_a_query_without_an_answer_costs_the_rest_of_the_deadline() -> None:
    with FakePostgres(version="16.2", password="pw", answer_queries=False) as stuck:
        t = pgwire.Target("127.0.0.1", stuck.port, "app", "app", "pw")
        start = time.monotonic()
        with connect(t, 0.5) as conn, pytest.raises(TimeoutError):
            conn.simple_query("SELECT 1")
        assert time.monotonic() - start < 1.0


def test_cleartext_password(dead_port: int) -> None:
    with FakePostgres(version="16.2", password="pw") as fake:
        with connect(pgwire.Target("127.0.0.1", fake.port, "app", "app", "pw")) as conn:
            assert conn.server_version == "16.2"
        with pytest.raises(pgwire.ServerError) as failed:
            connect(pgwire.Target("127.0.0.1", fake.port, "app", "app", "nope"))
        assert failed.value.sqlstate == "28P01"
    with pytest.raises(ConnectionRefusedError):
        connect(pgwire.Target("127.0.0.1", dead_port, "app", "app", "pw"))


# --- trust, cleartext and MD5 on a real server ----------------------------------------------

HBA = """\
local all all trust
host all trusting 127.0.0.1/32 trust
host all cleartext 127.0.0.1/32 password
host all all 127.0.0.1/32 md5
"""


@pytest.fixture(scope="module")
def hba_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.PostgresServer]:
    # The server account must read the file: a directory of its own outside pytest's tree.
    hba_dir = Path(tempfile.mkdtemp(prefix="stellarbase-hba-"))
    hba_dir.chmod(0o755)
    hba = hba_dir / "pg_hba.conf"
    hba.write_text(HBA)
    hba.chmod(0o644)
    server = servers.start_postgres(
        tmp_path_factory.mktemp("pg-hba"),
        extra={"hba_file": str(hba), "password_encryption": "md5"},
    )
    try:
        admin = pgwire.Target(
            server.host, server.port, "postgres", "postgres", server.admin_password
        )
        with connect(admin) as conn:
            for role in ("trusting", "cleartext", "hashed"):
                conn.simple_query(f"CREATE ROLE {role} LOGIN PASSWORD 'secret-{role}'")
        yield server
    finally:
        server.stop()
        hba.unlink()
        hba_dir.rmdir()


@pytest.mark.integration
@pytest.mark.parametrize("role", ["trusting", "cleartext", "hashed"])
def test_other_login_methods(
    hba_server: servers.PostgresServer, role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    md5_answers: list[bytes] = []
    real_md5 = pgwire.md5_password

    def md5_password(user: str, password: str, salt: bytes) -> str:
        md5_answers.append(salt)
        return real_md5(user, password, salt)

    monkeypatch.setattr(pgwire, "md5_password", md5_password)
    t = pgwire.Target(hba_server.host, hba_server.port, role, "postgres", f"secret-{role}")
    with connect(t) as conn:
        assert conn.simple_query("SELECT current_user") == [(role,)]
    assert len(md5_answers) == (1 if role == "hashed" else 0)
    if role == "trusting":
        return
    with pytest.raises(pgwire.ServerError) as failed:
        connect(pgwire.Target(hba_server.host, hba_server.port, role, "postgres", "wrong"))
    assert failed.value.sqlstate == "28P01"


# --- what the agent imports -----------------------------------------------------------------


def test_the_agent_runs_without_psycopg() -> None:
    code = (
        "import sys, stellarbase.agent.collectors, stellarbase.agent.runtime, stellarbase.checks;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'psycopg'))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.integration
def test_the_agent_counts_applied_and_pending_migrations(
    postgres_server: servers.PostgresServer,
) -> None:
    from pydantic import SecretStr

    from stellarbase import migrate
    from stellarbase.agent import collectors
    from stellarbase.config import PostgresConfig

    url = servers.create_database(postgres_server, "agent_migrations")
    config = PostgresConfig(url=url, password=SecretStr(postgres_server.password))
    shipped = [m.version for m in migrate.load_migrations()]

    assert collectors.migrations(config, 5) == collectors.MigrationSample(0, len(shipped))
    migrate.migrate_up(url, postgres_server.password, to=shipped[0])
    assert collectors.migrations(config, 5) == collectors.MigrationSample(
        shipped[0], len(shipped) - 1
    )
    migrate.migrate_up(url, postgres_server.password)
    assert collectors.migrations(config, 5) == collectors.MigrationSample(shipped[-1], 0)

    wrong = PostgresConfig(url=url, password=SecretStr("wrong"))
    with pytest.raises(collectors.StellarError, match=r"SQLSTATE 28P01"):
        collectors.migrations(wrong, 5)


@pytest.mark.integration
def test_the_readiness_probe_names_the_server_version(
    postgres_server: servers.PostgresServer,
) -> None:
    from pydantic import SecretStr

    from stellarbase import checks
    from stellarbase.config import PostgresConfig

    url = f"postgresql://{postgres_server.user}@{postgres_server.host}:{postgres_server.port}/"
    config = PostgresConfig(url=url + postgres_server.database)
    assert checks.run_check("postgres", lambda: checks.check_postgres(config, 5)).ok is False
    config = config.model_copy(update={"password": SecretStr(postgres_server.password)})
    message = checks.check_postgres(config, 5)
    assert message.startswith("PostgreSQL 15.")
