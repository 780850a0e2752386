"""Preflight: every check of host, GPUs and dependencies, run at once, each with a deadline.

A check family is a module here (`host`, `gpu`, `deps`) whose `checks(ctx)` returns the
`Check`s that apply to this config; `run_checks` starts every check in its own daemon
thread and waits for each only until its own deadline, so a dependency that never answers
costs one timeout, not the sum, and cannot keep the process alive.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from stellarbase.config import Config
from stellarbase.errors import one_line
from stellarbase.paths import HostPaths


class Level(enum.StrEnum):
    PASS = "pass"
    NOTE = "note"  # worth knowing, never blocks (no GPU on a tier that needs none)
    WARN = "warn"
    FAIL = "fail"


SEVERITY = {Level.PASS: 0, Level.NOTE: 0, Level.WARN: 1, Level.FAIL: 2}


@dataclass(frozen=True)
class Finding:
    """One checked fact: what was measured, what is required, and how to fix it."""

    check: str  # dotted name, e.g. "postgres.version"; --skip takes it or its family
    level: Level
    value: str
    requirement: str = ""
    hint: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "level": self.level.value,
            "value": self.value,
            "requirement": self.requirement,
            "hint": self.hint,
            "seconds": round(self.seconds, 4),
        }


@dataclass(frozen=True)
class Context:
    """What checks may read: the config, the host root and the GPU inventory."""

    config: Config
    paths: HostPaths
    gpus: Callable[[], Any] = field(default=lambda: None)  # returns a gpu.Inventory
    own_ports: frozenset[int] = frozenset()  # ports this installation already listens on


@dataclass(frozen=True)
class Check:
    name: str  # the family or check name the findings carry
    run: Callable[[], list[Finding]]
    timeout: float
    timeout_hint: str = ""


def passed(check: str, value: str, requirement: str = "") -> Finding:
    return Finding(check, Level.PASS, value, requirement)


def failed(check: str, value: str, requirement: str, hint: str) -> Finding:
    return Finding(check, Level.FAIL, value, requirement, hint)


def warned(check: str, value: str, requirement: str, hint: str) -> Finding:
    return Finding(check, Level.WARN, value, requirement, hint)


def noted(check: str, value: str, hint: str = "") -> Finding:
    return Finding(check, Level.NOTE, value, "", hint)


def run_checks(checks: Iterable[Check], skip: Iterable[str] = ()) -> list[Finding]:
    """Run every check at once; each returns by its own deadline or is reported as hung."""
    skipped = set(skip)
    todo = [c for c in checks if not _matches(c.name, skipped)]
    start = time.monotonic()
    slots: dict[str, list[Finding]] = {}
    done: dict[str, threading.Event] = {}
    for check in todo:
        done[check.name] = threading.Event()
        threading.Thread(
            target=_run_one, args=(check, slots, done[check.name]), daemon=True
        ).start()
    findings: list[Finding] = []
    for check in todo:
        remaining = start + check.timeout - time.monotonic()
        if done[check.name].wait(max(0.0, remaining)):
            findings += [f for f in slots[check.name] if not _matches(f.check, skipped)]
            continue
        findings.append(
            Finding(
                check.name,
                Level.FAIL,
                f"no answer within {check.timeout:g}s",
                "answers within the check timeout",
                check.timeout_hint or f"check that {check.name} is up and not overloaded",
                check.timeout,
            )
        )
    return findings


def _run_one(check: Check, slots: dict[str, list[Finding]], done: threading.Event) -> None:
    start = time.monotonic()
    try:
        results = check.run()
    except Exception as exc:  # a check that breaks is a failed check, not a crashed run
        why = one_line(exc)
        results = [Finding(check.name, Level.FAIL, why, "", f"see `{check.name}` above")]
    took = time.monotonic() - start
    slots[check.name] = [
        f if f.seconds else Finding(f.check, f.level, f.value, f.requirement, f.hint, took)
        for f in results
    ]
    done.set()


def _matches(name: str, skipped: set[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skipped)


def worst(findings: Iterable[Finding]) -> Level:
    levels = [f.level for f in findings]
    return max(levels, key=lambda lv: SEVERITY[lv], default=Level.PASS)
