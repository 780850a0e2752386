"""Print operation results as text for people or JSON for machines."""

from __future__ import annotations

import enum
import json
import sys
from dataclasses import dataclass, field
from typing import Any


class Status(enum.StrEnum):
    CHANGED = "changed"
    UNCHANGED = "unchanged"
    FAILED = "failed"


@dataclass(frozen=True)
class StepResult:
    step: str
    status: Status
    detail: str = ""
    diff: str = ""


class Format(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass
class Result:
    operation: str
    steps: list[StepResult] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # extra text for people

    @property
    def changed(self) -> int:
        return sum(1 for s in self.steps if s.status == Status.CHANGED)

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "changed": self.changed,
            "steps": [
                {"step": s.step, "status": s.status.value, "detail": s.detail, "diff": s.diff}
                for s in self.steps
            ],
            **self.info,
        }


def emit(result: Result, fmt: Format, *, show_diff: bool = False, verbose: bool = False) -> None:
    if fmt == Format.JSON:
        json.dump(result.as_dict(), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    for s in result.steps:
        if s.status == Status.UNCHANGED and not verbose:
            continue
        print(f"{s.status.value:>9}  {s.step}" + (f": {s.detail}" if s.detail else ""))
        if show_diff and s.diff:
            print("".join("           " + line + "\n" for line in s.diff.splitlines()), end="")
    for line in result.lines:
        print(line)


def emit_error(message: str, hint: str, details: list[str], fmt: Format) -> None:
    if fmt == Format.JSON:
        json.dump({"error": message, "hint": hint, "details": details}, sys.stdout)
        sys.stdout.write("\n")
    print(f"error: {message}", file=sys.stderr)
    for line in details:
        print(f"  {line}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
