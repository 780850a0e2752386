"""The agent's /readyz logic: checks from a snapshot, ?exclude, ?verbose, the STATUS= line."""

from __future__ import annotations

from stellarbase.agent import readiness
from stellarbase.agent.collectors import DependencySample, ServiceProbe, UnitSample
from stellarbase.agent.runner import Outcome
from stellarbase.agent.snapshot import DEPENDENCIES, SERVICES, UNITS, Snapshot
from stellarbase.agent.targets import Target, Targets

TARGETS = Targets(
    units=(
        Target(unit="stellarbase-redis.service"),
        Target(unit="stellarbase-agent.service", port=8390, probe=True),
        Target(unit="stellarbase-api.service", port=8300, probe=True),
    )
)


def _unit(state: str = "active", sub: str = "running") -> UnitSample:
    return UnitSample(state, sub, 0, 1 << 20, 1.5)


def _probe(ready: bool = True) -> ServiceProbe:
    return ServiceProbe(True, 0.01, "ok", ready, "ok" if ready else "answered 503: redis: down")


def _snapshot(*, redis_up: bool = True, taken: float = 100.0, units_ok: bool = True) -> Snapshot:
    units = {
        "stellarbase-redis.service": _unit() if redis_up else _unit("inactive", "dead"),
        "stellarbase-agent.service": _unit("activating", "start"),
        "stellarbase-api.service": _unit(),
    }
    deps = [
        DependencySample("postgres", True, 0.01, "PostgreSQL 15.4", "15.4"),
        DependencySample(
            "redis", redis_up, 0.02, "Redis 7.0.15" if redis_up else "Connection refused"
        ),
    ]
    outcomes = {
        UNITS: Outcome(True, 0.01, units) if units_ok else Outcome(False, 10, error="timed out"),
        SERVICES: Outcome(True, 0.05, {"stellarbase-api.service": _probe(redis_up)}),
        DEPENDENCIES: Outcome(True, 0.02, deps),
    }
    return Snapshot(taken, TARGETS, outcomes, dependencies=("postgres", "redis"))


def test_all_checks_pass_and_the_agent_does_not_judge_its_own_unit() -> None:
    r = readiness.evaluate(readiness.checks_of(_snapshot(), now=101, interval=5))
    assert r.ready
    assert [c.name for c in r.checks] == [
        "collection",
        "postgres",
        "redis",
        "unit:stellarbase-redis.service",
        "unit:stellarbase-api.service",
        "readyz:stellarbase-api.service",
    ]
    body = readiness.as_json(r)
    assert body["status"] == "ready"
    assert set(body["checks"][1]) == {"name", "status", "duration_seconds", "message"}


def test_a_stopped_redis_fails_its_checks_by_name() -> None:
    r = readiness.evaluate(readiness.checks_of(_snapshot(redis_up=False), now=101, interval=5))
    assert not r.ready
    assert r.failing == [
        "redis",
        "unit:stellarbase-redis.service",
        "readyz:stellarbase-api.service",
    ]
    text = readiness.as_text(r)
    assert "[-]redis failed: Connection refused\n" in text
    assert "[-]unit:stellarbase-redis.service failed: inactive/dead\n" in text
    assert "[+]postgres ok\n" in text
    assert text.endswith("readyz check failed\n")


def test_exclude_takes_checks_out_and_names_unknown_ones() -> None:
    checks = readiness.checks_of(_snapshot(redis_up=False), now=101, interval=5)
    exclude = [
        "redis",
        "unit:stellarbase-redis.service",
        "readyz:stellarbase-api.service",
        "nosuch",
    ]
    r = readiness.evaluate(checks, exclude)
    assert r.ready
    assert [c.name for c in r.excluded] == exclude[:3]
    assert r.unknown_excludes == ("nosuch",)
    text = readiness.as_text(r)
    assert "[+]redis excluded: ok\n" in text
    assert 'no matches for "nosuch"' in text
    assert text.endswith("readyz check passed\n")
    assert readiness.as_json(r)["unknown_excludes"] == ["nosuch"]


def test_a_stale_snapshot_or_none_is_not_ready() -> None:
    stuck = readiness.evaluate(readiness.checks_of(_snapshot(taken=100), now=116, interval=5))
    assert stuck.failing == ["collection"]
    assert "stuck" in stuck.checks[0].message
    assert readiness.evaluate(readiness.checks_of(None, now=0, interval=5)).failing == [
        "collection"
    ]


def test_unknown_unit_states_fail_the_unit_checks_not_the_scrape() -> None:
    r = readiness.evaluate(readiness.checks_of(_snapshot(units_ok=False), now=101, interval=5))
    assert r.failing == ["unit:stellarbase-redis.service", "unit:stellarbase-api.service"]
    assert "timed out" in r.checks[3].message


def test_status_line_summarises_units_dependencies_and_archive_lag() -> None:
    snap = _snapshot()
    r = readiness.evaluate(readiness.checks_of(snap, now=101, interval=5))
    line = readiness.summary(snap, r, 0)
    assert line == "ready: 2/2 units active, 2/2 deps up, archive lag 0"
    down = _snapshot(redis_up=False)
    r = readiness.evaluate(readiness.checks_of(down, now=101, interval=5))
    assert readiness.summary(down, r, None).startswith("not ready (redis, unit:")
