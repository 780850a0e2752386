"""What every command returns, and how the entry point prints it: text or a JSON envelope.

Each verb in `stellarbase.commands` returns one frozen `Result`; `stellarbase.cli.main` is
the only caller of `render`, `render_error` and so the only place that prints one. This
module imports nothing heavy: the `run` fast path uses it too.
"""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Version of the JSON envelope (README "Output and exit codes"); bump on an incompatible change.
ENVELOPE_SCHEMA = 1


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


@dataclass(frozen=True)
class Result:
    """One command's outcome. `steps` None: a query without steps (config, version), whose
    data is all it reports. `flat`: JSON without the envelope (`version`, which other
    releases' binaries read). `written`: the output went out already (a hand-over to another
    release's binary, which printed its own); only the exit code is left to pass on."""

    command: str
    data: Mapping[str, Any] = field(default_factory=dict)
    messages: tuple[str, ...] = ()
    exit_code: int = 0
    steps: tuple[StepResult, ...] | None = ()
    flat: bool = False
    written: bool = False

    @property
    def changed(self) -> int:
        return sum(1 for s in self.steps or () if s.status == Status.CHANGED)

    def as_dict(self) -> dict[str, Any]:
        """The command's fields: what `data` of the JSON envelope holds."""
        if self.steps is None:
            return dict(self.data)
        return {
            "operation": self.command,
            "changed": self.changed,
            "steps": [
                {"step": s.step, "status": s.status.value, "detail": s.detail, "diff": s.diff}
                for s in self.steps
            ],
            **self.data,
        }


def envelope(
    command: str, exit_code: int, data: Mapping[str, Any], messages: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {
        "schema": ENVELOPE_SCHEMA,
        "command": command,
        "ok": exit_code == 0,
        "exit_code": exit_code,
        "data": dict(data),
        "messages": list(messages),
    }


def payload(text: str) -> dict[str, Any]:
    """The fields of another binary's JSON output, enveloped or (older releases) flat."""
    found = json.loads(text)
    if not isinstance(found, dict):
        raise ValueError("not a JSON object")
    if isinstance(found.get("schema"), int) and isinstance(found.get("data"), dict):
        return dict(found["data"])
    return found


def render(result: Result, fmt: Format, *, show_diff: bool = False, quiet: bool = False) -> None:
    """Print a result: JSON (enveloped unless flat) or text; `quiet` prints no text."""
    if result.written:
        return
    if fmt == Format.JSON:
        shown = result.as_dict()
        if not result.flat:
            shown = envelope(result.command, result.exit_code, shown, result.messages)
        json.dump(shown, sys.stdout, indent=None if result.flat else 2, default=str)
        sys.stdout.write("\n")
        return
    if quiet:
        return
    for s in result.steps or ():
        if s.status == Status.UNCHANGED:
            continue
        print(f"{s.status.value:>9}  {s.step}" + (f": {s.detail}" if s.detail else ""))
        if show_diff and s.diff:
            print("".join("           " + line + "\n" for line in s.diff.splitlines()), end="")
    for line in result.messages:
        print(line)


def render_error(
    command: str, code: int, message: str, hint: str, details: list[str], fmt: Format
) -> None:
    """An error on stderr for people; under JSON also the envelope on stdout."""
    if fmt == Format.JSON:
        data = {"error": message, "hint": hint, "details": details}
        json.dump(envelope(command, code, data), sys.stdout)
        sys.stdout.write("\n")
    print(f"error: {message}", file=sys.stderr)
    for line in details:
        print(f"  {line}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
