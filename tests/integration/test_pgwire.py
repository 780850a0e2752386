"""The small PostgreSQL client against real servers: the PostgreSQL test server
(SCRAM-SHA-256), and a second throwaway cluster with TLS and its own pg_hba.conf for trust,
cleartext and MD5 logins, channel binding and SASLprep."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stellarbase import pgwire
from tests import servers
from tests.hostile import self_signed


def target(server: servers.PostgresServer, **changes: str | None) -> pgwire.Target:
    url = f"postgresql://{server.user}@{server.host}:{server.port}/{server.database}"
    base = pgwire.parse_url(url, server.password)
    return pgwire.Target(**{**base.__dict__, **changes})


def connect(t: pgwire.Target, seconds: float = 5) -> pgwire.Connection:
    return pgwire.connect(t, time.monotonic() + seconds)


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


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


# --- trust, cleartext, MD5 and SCRAM on a real server with TLS ------------------------------

HBA = """local all all trust
host all trusting 127.0.0.1/32 trust
host all cleartext 127.0.0.1/32 password
host all hashed 127.0.0.1/32 md5
host all all 127.0.0.1/32 scram-sha-256
"""


@pytest.fixture(scope="module")
def hba_server(
    tmp_path_factory: pytest.TempPathFactory, certificate: tuple[Path, Path]
) -> Iterator[servers.PostgresServer]:
    # The server account must read the files: a directory of its own outside pytest's tree.
    hba_dir = Path(tempfile.mkdtemp(prefix="stellarbase-hba-"))
    hba_dir.chmod(0o755)
    hba = hba_dir / "pg_hba.conf"
    hba.write_text(HBA)
    hba.chmod(0o644)
    cert, key = hba_dir / "server.crt", hba_dir / "server.key"
    cert.write_bytes(certificate[0].read_bytes())
    key.write_bytes(certificate[1].read_bytes())
    cert.chmod(0o644)
    key.chmod(0o600)
    run_as = servers._pg_run_as()
    if run_as is not None:
        os.chown(key, run_as.pw_uid, run_as.pw_gid)
    server = servers.start_postgres(
        tmp_path_factory.mktemp("pg-hba"),
        extra={
            "hba_file": str(hba),
            "password_encryption": "md5",
            "ssl": "on",
            "ssl_cert_file": str(cert),
            "ssl_key_file": str(key),
        },
    )
    try:
        admin = pgwire.Target(
            server.host, server.port, "postgres", "postgres", server.admin_password
        )
        with connect(admin) as conn:
            for role in ("trusting", "cleartext", "hashed"):
                conn.simple_query(f"CREATE ROLE {role} LOGIN PASSWORD 'secret-{role}'")
            # SASLprep maps "I<SOFT HYPHEN>X" to "IX" on both sides.
            conn.simple_query("SET password_encryption = 'scram-sha-256'")
            conn.simple_query("CREATE ROLE salted LOGIN PASSWORD 'IX'")
        yield server
    finally:
        server.stop()
        for each in (hba, cert, key):
            each.unlink()
        hba_dir.rmdir()


@pytest.mark.integration
@pytest.mark.parametrize("role", ["trusting", "cleartext", "hashed"])
def test_other_login_methods_over_verified_tls(
    hba_server: servers.PostgresServer,
    certificate: tuple[Path, Path],
    role: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    md5_answers: list[bytes] = []
    real_md5 = pgwire.md5_password

    def md5_password(user: str, password: str, salt: bytes) -> str:
        md5_answers.append(salt)
        return real_md5(user, password, salt)

    monkeypatch.setattr(pgwire, "md5_password", md5_password)
    verified = {"sslmode": "verify-full", "sslrootcert": str(certificate[0])}
    t = pgwire.Target(
        hba_server.host, hba_server.port, role, "postgres", f"secret-{role}", **verified
    )
    with connect(t) as conn:
        assert conn.tls
        assert conn.simple_query("SELECT current_user") == [(role,)]
    assert len(md5_answers) == (1 if role == "hashed" else 0)
    if role == "trusting":
        return
    with pytest.raises(pgwire.ServerError) as failed:
        connect(
            pgwire.Target(hba_server.host, hba_server.port, role, "postgres", "wrong", **verified)
        )
    assert failed.value.sqlstate == "28P01"
    unverified = pgwire.Target(
        hba_server.host, hba_server.port, role, "postgres", f"secret-{role}", "require"
    )
    with pytest.raises(pgwire.AuthenticationError, match="TLS is not verified"):
        connect(unverified)


@pytest.mark.integration
def test_scram_binds_to_the_tls_channel_and_prepares_the_password(
    hba_server: servers.PostgresServer,
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hashed: list[bytes] = []
    real_hash = pgwire.certificate_hash
    monkeypatch.setattr(
        pgwire, "certificate_hash", lambda der: hashed.append(der) or real_hash(der)
    )
    verified = {"sslmode": "verify-full", "sslrootcert": str(certificate[0])}
    bound = pgwire.Target(
        hba_server.host,
        hba_server.port,
        "salted",
        "postgres",
        "I\u00adX",
        channel_binding="require",
        **verified,
    )
    with connect(bound) as conn:
        assert conn.simple_query("SELECT current_user") == [("salted",)]
    assert len(hashed) == 1  # SCRAM-SHA-256-PLUS, bound to the server's certificate
    plain = pgwire.Target(
        hba_server.host, hba_server.port, "salted", "postgres", "I\u00adX", "disable"
    )
    with connect(plain) as conn:  # no TLS: plain SCRAM, same prepared password
        assert conn.simple_query("SELECT current_user") == [("salted",)]
    with pytest.raises(pgwire.AuthenticationError, match="channel_binding=require"):
        connect(
            pgwire.Target(
                hba_server.host,
                hba_server.port,
                "salted",
                "postgres",
                "IX",
                "disable",
                channel_binding="require",
            )
        )


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
