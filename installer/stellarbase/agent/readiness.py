"""The host's readiness from a snapshot: pure, so /readyz, /metrics and STATUS= agree.

Checks are named like Kubernetes' (`?exclude=NAME`, `?verbose`): `collection` (the loop is
running), each dependency (`postgres`, `redis`, `s3`), `unit:<unit>` for every unit of the
target, and `readyz:<unit>` for every service's own /readyz.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from stellarbase.agent.snapshot import DEPENDENCIES, SERVICES, UNITS, Snapshot

S = TypeVar("S")

STALE_ROUNDS = 3  # a snapshot older than this many intervals means the loop is stuck


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    seconds: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": "pass" if self.ok else "fail",
            "duration_seconds": round(self.seconds, 4),
            "message": self.message,
        }


@dataclass(frozen=True)
class Readiness:
    checks: tuple[Check, ...]
    excluded: tuple[Check, ...] = ()
    unknown_excludes: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failing(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]


def checks_of(snap: Snapshot | None, now: float, interval: float) -> list[Check]:
    if snap is None:
        return [Check("collection", False, 0.0, "no collection has finished yet")]
    age = now - snap.taken
    out = [
        Check("collection", True, 0.0, f"last round {age:.1f}s ago")
        if age <= STALE_ROUNDS * interval
        else Check("collection", False, 0.0, f"last round {age:.0f}s ago: the loop is stuck")
    ]
    out += _dependency_checks(snap)
    out += _unit_checks(snap)
    out += _service_checks(snap)
    return out


def _dependency_checks(snap: Snapshot) -> list[Check]:
    samples = snap.dependency_samples()
    if samples is None:
        why = f"dependency checks failed: {snap.error(DEPENDENCIES)}"
        return [Check(name, False, 0.0, why) for name in snap.dependencies]
    return [Check(s.name, s.up, s.seconds, s.message) for s in samples]


def _unit_checks(snap: Snapshot) -> list[Check]:
    # The agent answering is its own proof: its unit is left out.
    return _per_target(
        "unit",
        [t.unit for t in snap.targets.units if t.unit != snap.own_unit],
        snap.units(),
        lambda: f"unit states unknown: {snap.error(UNITS)}",
        "not reported by systemd",
        lambda name, u: Check(
            name, u.active_state == "active", 0.0, f"{u.active_state}/{u.sub_state}"
        ),
    )


def _service_checks(snap: Snapshot) -> list[Check]:
    return _per_target(
        "readyz",
        [t.unit for t in snap.targets.probed()],
        snap.services(),
        lambda: f"not probed: {snap.error(SERVICES)}",
        "not probed yet",
        lambda name, p: Check(name, p.ready, p.healthz_seconds, p.ready_message),
    )


def _per_target(
    kind: str,
    units: Sequence[str],
    samples: Mapping[str, S] | None,
    unknown: Callable[[], str],
    missing: str,
    judge: Callable[[str, S], Check],
) -> list[Check]:
    """One check `<kind>:<unit>` per unit: failed while the collector has no samples
    (`unknown`) or none for that unit (`missing`), else what `judge` makes of its sample."""
    out = []
    for unit in units:
        name = f"{kind}:{unit}"
        if samples is None:
            out.append(Check(name, False, 0.0, unknown()))
        elif (sample := samples.get(unit)) is None:
            out.append(Check(name, False, 0.0, missing))
        else:
            out.append(judge(name, sample))
    return out


def evaluate(checks: Sequence[Check], exclude: Sequence[str] = ()) -> Readiness:
    names = {c.name for c in checks}
    return Readiness(
        checks=tuple(c for c in checks if c.name not in exclude),
        excluded=tuple(c for c in checks if c.name in exclude),
        unknown_excludes=tuple(dict.fromkeys(e for e in exclude if e not in names)),
    )


def as_json(r: Readiness) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": "ready" if r.ready else "not ready",
        "service": "agent",
        "checks": [c.as_dict() for c in r.checks],
    }
    if r.excluded:
        body["excluded"] = [c.name for c in r.excluded]
    if r.unknown_excludes:
        body["unknown_excludes"] = list(r.unknown_excludes)
    return body


def as_text(r: Readiness) -> str:
    """Kubernetes' verbose form: one `[+]name ok` or `[-]name failed: why` line per check."""
    lines = [f"[+]{c.name} ok" if c.ok else f"[-]{c.name} failed: {c.message}" for c in r.checks]
    lines += [f"[+]{c.name} excluded: ok" for c in r.excluded]
    if r.unknown_excludes:
        quoted = ", ".join(f'"{name}"' for name in r.unknown_excludes)
        lines.append(f"warn: some checks cannot be excluded: no matches for {quoted}")
    lines.append("readyz check passed" if r.ready else "readyz check failed")
    return "\n".join(lines) + "\n"


def summary(snap: Snapshot, r: Readiness, archive_lag: float | None) -> str:
    """One line for STATUS= (`systemctl status stellarbase-agent`)."""
    units = [c for c in r.checks if c.name.startswith("unit:")]
    deps = [c for c in r.checks if c.name in snap.dependencies]
    parts = [
        f"{sum(c.ok for c in units)}/{len(units)} units active",
        f"{sum(c.ok for c in deps)}/{len(deps)} deps up",
    ]
    if archive_lag is not None:
        parts.append(f"archive lag {archive_lag:g}")
    head = "ready" if r.ready else "not ready (" + ", ".join(r.failing[:3]) + ")"
    return f"{head}: " + ", ".join(parts)
