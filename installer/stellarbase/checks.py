"""Dependency checks (PostgreSQL, Redis, S3): each returns a result, never raises.

Used by the services' /readyz and by install before it changes anything.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from stellarbase.config import PostgresConfig, RedisConfig, S3Config
from stellarbase.errors import one_line


class CheckStatus(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: CheckStatus
    message: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == CheckStatus.PASS

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "message": self.message,
            "seconds": round(self.seconds, 4),
        }


def check_postgres(dep: PostgresConfig, timeout: float) -> str:
    from stellarbase import pgwire

    password = dep.password.get_secret_value() if dep.password else None
    # The server reports its version while logging in: no query needed.
    with pgwire.connect(pgwire.parse_url(dep.url, password), time.monotonic() + timeout) as conn:
        return f"PostgreSQL {conn.server_version}"


def check_redis(dep: RedisConfig, timeout: float) -> str:
    from stellarbase import resp

    target = resp.parse_url(dep.url)
    password = dep.password.get_secret_value() if dep.password else target.password
    client = resp.connect(target, time.monotonic() + timeout)
    try:
        info = resp.hello(client, target, password)
    finally:
        client.close()
    return resp.describe(info)  # "Redis 7.0.15" or "Valkey 8.1.1"


def check_s3(dep: S3Config, timeout: float) -> str:
    """The bucket answers a signed request. The small SigV4 client of preflight, not boto3:
    every service probes this every few seconds, and boto3 costs ~27 MB per process."""
    from stellarbase import s3probe

    client = s3probe.client_for(dep, time.monotonic() + timeout)
    if client is None:
        raise RuntimeError("no S3 credentials")
    try:
        client.list_objects("stellarbase-readiness/")
    finally:
        client.close()
    return f"bucket {dep.bucket} reachable"


def run_check(name: str, probe: Callable[[], str]) -> CheckResult:
    start = time.monotonic()
    try:
        message = probe()
    except Exception as exc:  # a check reports any failure as its result
        return CheckResult(name, CheckStatus.FAIL, one_line(exc), time.monotonic() - start)
    return CheckResult(name, CheckStatus.PASS, message, time.monotonic() - start)


def dependency_checks(
    postgres: PostgresConfig | None,
    redis: RedisConfig | None,
    s3: S3Config | None,
    timeout: float,
) -> list[CheckResult]:
    """Check every configured dependency at once, so one dead one costs one timeout."""
    probes: list[tuple[str, Callable[[], str]]] = []
    if postgres is not None:
        probes.append(("postgres", lambda: check_postgres(postgres, timeout)))
    if redis is not None:
        probes.append(("redis", lambda: check_redis(redis, timeout)))
    if s3 is not None:
        probes.append(("s3", lambda: check_s3(s3, timeout)))
    if not probes:
        return []
    with ThreadPoolExecutor(max_workers=len(probes)) as pool:
        return list(pool.map(lambda p: run_check(*p), probes))
