"""Preflight and /readyz judge a PostgreSQL server with the same client and the same
rules: where one refuses a server, so does the other (a preflight that passed while the
services' /readyz failed, or the other way round, was possible with two clients)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from stellarbase import checks
from stellarbase.config import PostgresConfig, RedisConfig
from stellarbase.configload import load_config
from stellarbase.preflight import Level, deps
from tests.fakes import FakePostgres


@pytest.mark.parametrize(
    ("password", "query", "accepted"),
    [
        (None, "", True),  # a trusting server
        (None, "?require_auth=scram-sha-256", False),  # it must not just let us in
        (None, "?channel_binding=require", False),  # no TLS, nothing to bind to
        ("pw", "", False),  # cleartext asked for, over no TLS
        ("pw", "?sslmode=disable", False),
    ],
)
def test_preflight_and_readiness_agree(password: str | None, query: str, accepted: bool) -> None:
    with FakePostgres(version="16.2", password=password) as fake:
        url = f"postgresql://app@127.0.0.1:{fake.port}/app{query}"
        config = load_config(
            tier="pilot",
            sets=["dependencies.mode=external", f"postgres.url={url}"],
            env={"STELLARBASE_POSTGRES__PASSWORD": "pw"},
        ).config
        findings = deps.postgres_findings(
            PostgresConfig(url=url, password=SecretStr("pw")), config, 2
        )
        ready = checks.run_check(
            "postgres",
            lambda: checks.check_postgres(PostgresConfig(url=url, password=SecretStr("pw")), 2),
        )
    auth = {f.check: f for f in findings}.get("postgres.auth")
    assert auth is not None, findings
    assert (auth.level == Level.PASS) is accepted, auth
    assert ready.ok is accepted, ready


@pytest.mark.parametrize(
    ("url", "verified"),
    [
        ("rediss://cache:6380/0", True),
        ("rediss://cache:6380/0?ssl_cert_reqs=none", False),
        ("redis://cache:6379/0", False),
    ],
)
def test_required_redis_tls_means_a_verified_certificate(url: str, verified: bool) -> None:
    finding = deps._redis_tls(RedisConfig(url=url))
    assert (finding.level == Level.PASS) is verified
    if not verified:
        assert "rediss://" in finding.hint or "ssl_ca_certs" in finding.hint
