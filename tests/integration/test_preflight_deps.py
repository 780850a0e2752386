"""Preflight of PostgreSQL, Redis and S3 against real servers (and loopback fakes where a real
server cannot play the part: an old version, a server that never answers)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql

from stellarbase import checks
from stellarbase.config import RedisConfig
from stellarbase.configload import load_config
from stellarbase.paths import HostPaths
from stellarbase.preflight import Context, Finding, Level, deps, run_checks
from tests import servers
from tests.fakes import FakePostgres, FakeRedis, HungServer

pytestmark = pytest.mark.integration

FAMILIES = ("postgres", "redis", "s3")
HEALTHY = {
    "postgres": [
        "postgres.reachable",
        "postgres.auth",
        "postgres.version",
        "postgres.create",
        "postgres.vector",
        "postgres.wal_level",
        "postgres.connections",
    ],
    "redis": [
        "redis.reachable",
        "redis.auth",
        "redis.version",
        "redis.maxmemory_policy",
        "redis.persistence",
    ],
    "s3": ["s3.reachable", "s3.credentials", "s3.clock", "s3.bucket", "s3.probe"],
}


def context(
    site_deps: dict[str, Any],
    *,
    tier: str = "pilot",
    sets: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    postgres_url: str | None = None,
    redis_url: str | None = None,
) -> Context:
    """A config of external dependencies: the fixture servers unless told otherwise."""
    pg, rd, s3 = site_deps["postgres"], site_deps["redis"], site_deps["s3"]
    loaded = load_config(
        tier=tier,
        sets=[
            "dependencies.mode=external",
            f"postgres.url={postgres_url or pg['url']}",
            f"redis.url={redis_url or rd['url']}",
            f"s3.endpoint={s3['endpoint']}",
            f"s3.bucket={s3['bucket']}",
            f"s3.region={s3['region']}",
            *sets,
        ],
        env={
            "STELLARBASE_POSTGRES__PASSWORD": pg["password"],
            "STELLARBASE_REDIS__PASSWORD": rd["password"],
            "STELLARBASE_S3__ACCESS_KEY": s3["access_key"],
            "STELLARBASE_S3__SECRET_KEY": s3["secret_key"],
            **(env or {}),
        },
    )
    return Context(loaded.config, HostPaths(Path("/nonexistent-root")))


def preflight(ctx: Context) -> list[Finding]:
    return run_checks(deps.checks(ctx))


def by_name(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def names_of(findings: list[Finding], family: str) -> list[str]:
    return [f.check for f in findings if f.check.split(".")[0] == family]


def failures(findings: list[Finding]) -> list[str]:
    return [f"{f.check}: {f.value}" for f in findings if f.level == Level.FAIL]


@pytest.fixture(params=[15, 18], ids=["pg15", "pg18"])
def any_postgres(request: pytest.FixtureRequest) -> servers.PostgresServer:
    """Debian's PostgreSQL 15 (no pgvector) and the wheel's 18 (with it)."""
    name = "postgres_server" if request.param == 15 else "postgres18_server"
    server: servers.PostgresServer = request.getfixturevalue(name)
    return server


def on(pg: servers.PostgresServer) -> dict[str, Any]:
    """context() arguments that aim it at `pg` instead of the default server."""
    return {
        "postgres_url": f"postgresql://{pg.user}@{pg.host}:{pg.port}/{pg.database}",
        "env": {"STELLARBASE_POSTGRES__PASSWORD": pg.password},
    }


def test_healthy_servers_pass(
    site_deps: dict[str, Any], s3_server: servers.S3Server, any_postgres: servers.PostgresServer
) -> None:
    findings = preflight(context(site_deps, **on(any_postgres)))

    assert failures(findings) == []
    for family, expected in HEALTHY.items():
        assert names_of(findings, family) == expected
    found = by_name(findings)
    major = any_postgres.major
    assert f"(server_version_num {major}00" in found["postgres.version"].value
    assert found["postgres.version"].value.startswith(f"{major}.")
    vector = found["postgres.vector"]
    if major == 18:
        assert (vector.level, vector.value) == (Level.PASS, "available (0.8.6)")
    else:  # Debian's test cluster has no pgvector: that only turns semantic search off
        assert vector.level == Level.WARN
        assert f"apt install postgresql-{major}-pgvector" in vector.hint
    assert (found["postgres.wal_level"].level, found["postgres.wal_level"].value) == (
        Level.PASS,
        "replica",
    )
    assert found["redis.version"].value.startswith("Redis 7.")
    assert found["redis.persistence"].level == Level.NOTE  # not required on pilot
    # The probe object is gone again.
    listed = servers.s3_client(s3_server).list_objects_v2(
        Bucket=s3_server.bucket, Prefix=deps.PROBE_PREFIX
    )
    assert listed.get("KeyCount", 0) == 0


def test_local_dependencies_get_no_check(site_deps: dict[str, Any]) -> None:
    s3 = site_deps["s3"]
    loaded = load_config(
        tier="pilot",
        sets=["dependencies.mode=local", f"s3.endpoint={s3['endpoint']}", "s3.bucket=b-local"],
        env={"STELLARBASE_S3__ACCESS_KEY": "k", "STELLARBASE_S3__SECRET_KEY": "s"},
    )
    checks = deps.checks(Context(loaded.config, HostPaths(Path("/nonexistent-root"))))
    assert [c.name for c in checks] == ["s3"]
    assert checks[0].timeout == loaded.config.health.check_timeout_seconds


def test_wrong_postgres_password_fails_and_stops(site_deps: dict[str, Any]) -> None:
    findings = preflight(context(site_deps, env={"STELLARBASE_POSTGRES__PASSWORD": "wrong"}))

    assert names_of(findings, "postgres") == ["postgres.reachable", "postgres.auth"]
    auth = by_name(findings)["postgres.auth"]
    assert auth.level == Level.FAIL
    assert 'password authentication failed for user "stellarbase"' in auth.value
    assert "STELLARBASE_POSTGRES__PASSWORD" in auth.hint
    assert failures(findings) == [f"postgres.auth: {auth.value}"]  # the others still pass


def test_wrong_redis_password_fails_and_stops(site_deps: dict[str, Any]) -> None:
    findings = preflight(context(site_deps, env={"STELLARBASE_REDIS__PASSWORD": "wrong"}))

    assert names_of(findings, "redis") == ["redis.reachable", "redis.auth"]
    auth = by_name(findings)["redis.auth"]
    assert auth.level == Level.FAIL
    assert "invalid username-password pair" in auth.value
    assert "STELLARBASE_REDIS__PASSWORD" in auth.hint


def test_missing_bucket_fails_with_the_way_to_create_it(site_deps: dict[str, Any]) -> None:
    bucket = f"missing-{secrets.token_hex(4)}"
    findings = preflight(context(site_deps, sets=(f"s3.bucket={bucket}",)))

    assert names_of(findings, "s3")[-1] == "s3.bucket"  # nothing after: no bucket to probe
    missing = by_name(findings)["s3.bucket"]
    assert missing.level == Level.FAIL
    assert missing.value == f"{bucket} does not exist"
    assert f"aws s3api create-bucket --bucket {bucket}" in missing.hint
    assert "s3.create_bucket=true" in missing.hint


def test_missing_bucket_is_created_when_allowed(
    site_deps: dict[str, Any], s3_server: servers.S3Server
) -> None:
    bucket = f"created-{secrets.token_hex(4)}"
    sets = (f"s3.bucket={bucket}", "s3.create_bucket=true")
    findings = preflight(context(site_deps, sets=sets))

    assert failures(findings) == []
    assert by_name(findings)["s3.bucket"].value == f"created {bucket}"
    assert by_name(findings)["s3.probe"].level == Level.PASS
    servers.s3_client(s3_server).head_bucket(Bucket=bucket)  # raises if it is not there


def test_enterprise_needs_versioning_and_tls(site_deps: dict[str, Any]) -> None:
    findings = preflight(context(site_deps, tier="enterprise"))
    found = by_name(findings)

    versioning = found["s3.versioning"]
    assert versioning.level == Level.FAIL
    assert (versioning.value, versioning.requirement) == ("not enabled", "Enabled")
    assert (
        "aws s3api put-bucket-versioning --bucket stellarbase-test "
        "--versioning-configuration Status=Enabled" in versioning.hint
    )
    # The test servers speak plain TCP; enterprise demands TLS of each.
    assert (found["postgres.tls"].level, found["postgres.tls"].value) == (Level.FAIL, "not in use")
    assert "sslmode=verify-full" in found["postgres.tls"].hint
    assert (found["redis.tls"].level, found["redis.tls"].value) == (Level.FAIL, "redis://")
    assert "rediss://" in found["redis.tls"].hint
    assert (found["s3.tls"].level, found["s3.tls"].value) == (Level.FAIL, "http")


def test_versioned_bucket_passes_and_keeps_no_probe_versions(
    site_deps: dict[str, Any], s3_server: servers.S3Server
) -> None:
    bucket = f"versioned-{secrets.token_hex(4)}"
    client = servers.s3_client(s3_server)
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})

    findings = preflight(context(site_deps, tier="enterprise", sets=(f"s3.bucket={bucket}",)))

    assert by_name(findings)["s3.versioning"].level == Level.PASS
    assert by_name(findings)["s3.probe"].level == Level.PASS
    left = client.list_object_versions(Bucket=bucket, Prefix=deps.PROBE_PREFIX)
    assert left.get("Versions", []) == [] and left.get("DeleteMarkers", []) == []


def test_too_small_max_connections_fails_with_the_numbers(
    site_deps: dict[str, Any], any_postgres: servers.PostgresServer
) -> None:
    # The fixture servers have max_connections=50; pilot has 1 worker and 10 headroom.
    findings = preflight(
        context(site_deps, sets=("requirements.pool_size=30",), **on(any_postgres))
    )

    budget = by_name(findings)["postgres.connections"]
    assert budget.level == Level.FAIL
    assert budget.value == (
        "needs 70 = (1 api + 1 worker) × 30 + 10 headroom; max_connections is 50"  # noqa: RUF001 -- a product
    )
    assert "max_connections" in budget.hint and "pool_size" in budget.hint
    assert "ALTER SYSTEM SET max_connections = 70" in budget.hint


def test_user_without_create_privilege_fails(
    site_deps: dict[str, Any], postgres_server: servers.PostgresServer
) -> None:
    name = f"locked_{secrets.token_hex(4)}"
    with psycopg.connect(
        host=postgres_server.host,
        port=postgres_server.port,
        user=servers.PG_SUPERUSER,
        password=postgres_server.admin_password,
        dbname="postgres",
        autocommit=True,
    ) as admin:
        # Owned by the superuser: since PostgreSQL 15 others may not create in its public schema.
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    pg = postgres_server
    url = f"postgresql://{pg.user}@{pg.host}:{pg.port}/{name}"

    findings = preflight(context(site_deps, postgres_url=url))

    create = by_name(findings)["postgres.create"]
    assert create.level == Level.FAIL
    assert "permission denied for schema public" in create.value
    assert 'GRANT CREATE ON SCHEMA public TO "stellarbase"' in create.hint


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[servers.RedisServer]:
    """A Redis of this test's own, free to reconfigure."""
    server = servers.start_redis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def redis_admin(server: servers.RedisServer) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port, password=server.password)


def test_valkey_passes_as_redis_and_is_named(
    site_deps: dict[str, Any], valkey_server: servers.RedisServer
) -> None:
    url = f"redis://{valkey_server.host}:{valkey_server.port}/0"
    password = valkey_server.password
    env = {"STELLARBASE_REDIS__PASSWORD": password}

    findings = preflight(context(site_deps, redis_url=url, env=env))

    assert failures(findings) == []
    assert names_of(findings, "redis") == HEALTHY["redis"]
    found = by_name(findings)
    assert (found["redis.version"].level, found["redis.version"].value) == (
        Level.PASS,
        "Valkey 8.1.1",
    )
    assert found["redis.maxmemory_policy"].value == "noeviction"
    # Readiness (/readyz, the agent) asks through the same client and names it alike.
    ready = checks.dependency_checks(None, RedisConfig(url=url, password=password), None, 2.0)
    assert [(r.name, r.ok, r.message) for r in ready] == [("redis", True, "Valkey 8.1.1")]
    wrong = RedisConfig(url=url, password="wrong")
    [refused] = checks.dependency_checks(None, wrong, None, 2.0)
    assert not refused.ok and "invalid username-password pair" in refused.message


def test_evicting_redis_fails_and_is_read_without_config(
    site_deps: dict[str, Any], own_redis: servers.RedisServer
) -> None:
    admin = redis_admin(own_redis)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    url = f"redis://{own_redis.host}:{own_redis.port}/0"
    env = {"STELLARBASE_REDIS__PASSWORD": own_redis.password}

    policy = by_name(preflight(context(site_deps, redis_url=url, env=env)))[
        "redis.maxmemory_policy"
    ]
    assert (policy.level, policy.value) == (Level.FAIL, "allkeys-lru")
    assert "CONFIG SET maxmemory-policy noeviction" in policy.hint

    # Managed Redis often denies CONFIG: the policy then comes from INFO memory.
    admin.acl_setuser(
        "app", enabled=True, passwords=["+app-secret"], commands=["+@all", "-config"], keys=["*"]
    )
    app_url = f"redis://app@{own_redis.host}:{own_redis.port}/0"
    app_env = {"STELLARBASE_REDIS__PASSWORD": "app-secret"}
    found = by_name(preflight(context(site_deps, redis_url=app_url, env=app_env)))
    assert (found["redis.maxmemory_policy"].level, found["redis.maxmemory_policy"].value) == (
        Level.FAIL,
        "allkeys-lru",
    )

    admin.config_set("maxmemory-policy", "noeviction")
    policy = by_name(preflight(context(site_deps, redis_url=url, env=env)))[
        "redis.maxmemory_policy"
    ]
    assert (policy.level, policy.value) == (Level.PASS, "noeviction")
    admin.close()


def test_redis_without_persistence_fails_where_required(
    site_deps: dict[str, Any], own_redis: servers.RedisServer
) -> None:
    url = f"redis://{own_redis.host}:{own_redis.port}/0"
    env = {"STELLARBASE_REDIS__PASSWORD": own_redis.password}
    sets = ("requirements.redis_persistence=true",)

    persistence = by_name(preflight(context(site_deps, sets=sets, redis_url=url, env=env)))[
        "redis.persistence"
    ]
    assert (persistence.level, persistence.value) == (Level.FAIL, 'appendonly no, save ""')
    assert "CONFIG SET appendonly yes" in persistence.hint

    admin = redis_admin(own_redis)
    admin.config_set("appendonly", "yes")
    # Until its first AOF is written Redis refuses to shut down ("Writing initial AOF,
    # can't exit"), and the fixture would wait out its stop deadline.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = admin.info("persistence")
        if not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]):
            break
        time.sleep(0.05)
    admin.close()
    persistence = by_name(preflight(context(site_deps, sets=sets, redis_url=url, env=env)))[
        "redis.persistence"
    ]
    assert (persistence.level, persistence.value) == (Level.PASS, "appendonly yes")


def test_old_server_versions_fail_before_any_query(site_deps: dict[str, Any]) -> None:
    with (
        FakePostgres(version="13.9") as old_pg,
        FakeRedis(version="6.2.0", password="old-redis") as old_redis,
    ):
        ctx = context(
            site_deps,
            postgres_url=f"postgresql://app@127.0.0.1:{old_pg.port}/app",
            redis_url=f"redis://127.0.0.1:{old_redis.port}/0",
            env={
                "STELLARBASE_POSTGRES__PASSWORD": "old-pg",
                "STELLARBASE_REDIS__PASSWORD": "old-redis",
            },
        )
        findings = preflight(ctx)
    found = by_name(findings)

    assert names_of(findings, "postgres")[-1] == "postgres.version"
    pg = found["postgres.version"]
    assert (pg.level, pg.value, pg.requirement) == (
        Level.FAIL,
        "13.9 (server_version_num 130009)",
        "≥ 14",
    )
    assert "upgrade to PostgreSQL 14+" in pg.hint

    assert names_of(findings, "redis")[-1] == "redis.version"
    rd = found["redis.version"]
    assert (rd.level, rd.value, rd.requirement) == (Level.FAIL, "Redis 6.2.0", "≥ 7")
    assert "upgrade to Redis 7+" in rd.hint
    assert failures(findings) == [
        "postgres.version: 13.9 (server_version_num 130009)",
        "redis.version: Redis 6.2.0",
    ]


def test_postgres_hanging_mid_query_is_cut_off_at_the_timeout(site_deps: dict[str, Any]) -> None:
    timeout = 1.0
    with FakePostgres(version="16.2", answer_queries=False) as stuck:
        ctx = context(
            site_deps,
            sets=(f"health.check_timeout_seconds={timeout}",),
            postgres_url=f"postgresql://app@127.0.0.1:{stuck.port}/app",
            env={"STELLARBASE_POSTGRES__PASSWORD": "pw"},
        )
        start = time.monotonic()
        findings = preflight(ctx)
        took = time.monotonic() - start

    assert took <= timeout + 0.5
    # The check itself reports, so its thread is done: psycopg alone would wait forever.
    assert names_of(findings, "postgres") == [
        "postgres.reachable",
        "postgres.auth",
        "postgres.version",
        "postgres.query",
    ]
    query = by_name(findings)["postgres.query"]
    assert query.level == Level.FAIL
    assert query.value == "no answer within 0.9s"
    assert "server log" in query.hint


@pytest.mark.parametrize("family", FAMILIES)
def test_hung_dependency_costs_one_timeout(site_deps: dict[str, Any], family: str) -> None:
    timeout = 1.0
    with HungServer() as hung:
        where = f"127.0.0.1:{hung.port}"
        sets = [f"health.check_timeout_seconds={timeout}"]
        if family == "s3":
            sets.append(f"s3.endpoint=http://{where}")
        ctx = context(
            site_deps,
            sets=tuple(sets),
            postgres_url=f"postgresql://app@{where}/app" if family == "postgres" else None,
            redis_url=f"redis://{where}/0" if family == "redis" else None,
        )
        start = time.monotonic()
        findings = preflight(ctx)
        took = time.monotonic() - start

    assert took <= timeout + 0.5
    hung_findings = [f for f in findings if f.check.split(".")[0] == family]
    assert len(hung_findings) == 1
    (stuck,) = hung_findings
    assert stuck.level == Level.FAIL
    assert "within" in stuck.value and str(hung.port) in stuck.hint
    for other in FAMILIES:
        if other != family:
            assert names_of(findings, other) == HEALTHY[other]
    assert [f for f in findings if f.level == Level.FAIL] == [stuck]
