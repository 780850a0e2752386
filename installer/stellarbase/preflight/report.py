"""Collect the check families, run them, and report: a table for people, JSON for tools."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from stellarbase.errors import ExitCode, StellarError
from stellarbase.preflight import Check, Context, Finding, Level, run_checks, worst

FAMILIES = ("host", "gpu", "deps")
# The exit code install uses when a family fails (preflight itself exits CHECKS_FAILED).
FAMILY_CODES = {"host": ExitCode.HOST, "gpu": ExitCode.HOST}


@dataclass
class Report:
    findings: list[Finding]
    seconds: float
    skipped: list[str] = field(default_factory=list)

    @property
    def level(self) -> Level:
        return worst(self.findings)

    def exit_code(self) -> ExitCode:
        return {
            Level.FAIL: ExitCode.CHECKS_FAILED,
            Level.WARN: ExitCode.CHECKS_WARNED,
        }.get(self.level, ExitCode.OK)

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.level == Level.FAIL]

    def as_dict(self) -> dict[str, Any]:
        counts = {lv.value: sum(1 for f in self.findings if f.level == lv) for lv in Level}
        return {
            "result": self.level.value,
            "seconds": round(self.seconds, 3),
            "summary": counts,
            "skipped": self.skipped,
            "findings": [f.as_dict() for f in self.findings],
        }


def collect(ctx: Context, families: Iterable[str] = FAMILIES) -> list[Check]:
    # Imported by name, not by importlib, so that the one-file binary bundles them.
    from stellarbase.preflight import deps, gpu, host

    modules = {"host": host, "gpu": gpu, "deps": deps}
    return [check for family in families for check in modules[family].checks(ctx)]


def run(ctx: Context, skip: Iterable[str] = (), extra: Iterable[Check] = ()) -> Report:
    start = time.monotonic()
    skipped = sorted(set(skip))
    findings = run_checks([*collect(ctx), *extra], skipped)
    return Report(findings, time.monotonic() - start, skipped)


def refuse_on_failure(report: Report) -> None:
    """Install's gate: the first failure becomes the error, the others its details."""
    failures = report.failures()
    if not failures:
        return
    first = failures[0]
    family = first.check.split(".", 1)[0]
    code = FAMILY_CODES.get(family, ExitCode.DEPENDENCY)
    others = [f"also failing: {f.check}: {f.value}" for f in failures[1:]]
    requirement = f" (needs {first.requirement})" if first.requirement else ""
    raise StellarError(
        f"preflight {first.check}: {first.value}{requirement}",
        hint=(first.hint or "see `stellarbase preflight`")
        + f"; or skip it with --skip {first.check}",
        code=code,
    ).with_details(others)


def table_lines(report: Report) -> list[str]:
    """A fixed-width table (rich when on a terminal would add colour, not information)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for column in ("check", "result", "value", "requirement", "fix"):
        table.add_column(column, overflow="fold")
    for f in report.findings:
        table.add_row(f.check, f.level.value, f.value, f.requirement, f.hint)
    console = Console(width=160, record=True, force_terminal=False, color_system=None)
    with console.capture() as capture:
        console.print(table)
    summary = ", ".join(f"{n} {k}" for k, n in report.as_dict()["summary"].items() if n)
    return [*capture.get().rstrip().splitlines(), f"{summary} in {report.seconds:.2f}s"]
