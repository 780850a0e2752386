"""Thin adapter over systemctl, systemd-analyze and journalctl: build argv, run, parse."""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from stellarbase.proc import BASE_ENV, run

SHOW_PROPS = ("ActiveState", "SubState", "MainPID", "NRestarts", "NeedDaemonReload", "LoadState")


@dataclass(frozen=True)
class UnitStatus:
    name: str
    load_state: str
    active_state: str
    sub_state: str
    main_pid: int
    restarts: int
    need_daemon_reload: bool

    @property
    def active(self) -> bool:
        return self.active_state == "active"


def show(units: list[str]) -> dict[str, UnitStatus]:
    """The state of several units in one systemctl call."""
    statuses: dict[str, UnitStatus] = {}
    for unit, props in show_properties(units, SHOW_PROPS).items():
        statuses[unit] = UnitStatus(
            name=unit,
            load_state=props.get("LoadState", ""),
            active_state=props.get("ActiveState", ""),
            sub_state=props.get("SubState", ""),
            main_pid=int(props.get("MainPID") or 0),
            restarts=int(props.get("NRestarts") or 0),
            need_daemon_reload=props.get("NeedDaemonReload") == "yes",
        )
    return statuses


def show_properties(
    units: Sequence[str], props: Sequence[str], *, timeout: float = 60.0
) -> dict[str, dict[str, str]]:
    """Raw properties of several units in one `systemctl show`: unit → {property: value}."""
    if not units:
        return {}
    argv = ["systemctl", "show", "--property=" + ",".join(("Id", *props)), "--", *units]
    blocks = run(argv, timeout=timeout).stdout.strip().split("\n\n")
    return {
        unit: dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        for block, unit in zip(blocks, units, strict=False)
    }


def daemon_reload() -> None:
    run(["systemctl", "daemon-reload"], timeout=120)


def start(unit: str, wait: bool = False) -> None:
    # --no-block: the health gate waits for all units together, not one after the other.
    if wait:
        run(["systemctl", "start", unit], timeout=300)
    else:
        run(["systemctl", "start", "--no-block", unit], timeout=60)


def restart(unit: str, wait: bool = False) -> None:
    """Restart; with wait, return once it is up again (Type=notify: once it sent READY=1)."""
    if wait:
        run(["systemctl", "restart", unit], timeout=300)
    else:
        run(["systemctl", "restart", "--no-block", unit], timeout=60)


def stop(units: list[str]) -> None:
    # The local PostgreSQL may take its unit's TimeoutSec= (300 s) for a fast shutdown.
    if units:
        run(["systemctl", "stop", *units], timeout=330)


def reset_failed(units: list[str]) -> None:
    if units:
        run(["systemctl", "reset-failed", *units], check=False)


def journal_tail(unit: str, lines: int = 15) -> list[str]:
    out = run(
        ["journalctl", "--no-pager", "--output=cat", "-n", str(lines), "-u", unit], check=False
    )
    return out.stdout.strip().splitlines()


# --- OnCalendar= ---------------------------------------------------------------------------

CALENDAR_SHORTHANDS = frozenset(
    {"minutely", "hourly", "daily", "weekly", "monthly", "quarterly", "semiannually",
     "yearly", "annually"}
)  # fmt: skip
_DAYS = "mon|tue|wed|thu|fri|sat|sun|monday|tuesday|wednesday|thursday|friday|saturday|sunday"
_WEEKDAYS = re.compile(rf"(?:{_DAYS})(?:\.\.(?:{_DAYS}))?(?:,(?:{_DAYS})(?:\.\.(?:{_DAYS}))?)*")
_DATE_RANGES = ((1970, 2199), (1, 12), (1, 31))
_TIME_RANGES = ((0, 23), (0, 59), (0, 59))


def calendar_problem(expression: str) -> str | None:
    """Why systemd would refuse `expression` in OnCalendar=, or None when it takes it.

    Asks `systemd-analyze calendar`, the parser systemd itself uses. Where that is missing
    (a files-only install on a build host), only a plain subset is taken: shorthands like
    daily, and `[weekdays] [date] time [UTC]` with numbers, *, lists, .. ranges and /steps.
    """
    tool = shutil.which("systemd-analyze", path=BASE_ENV["PATH"])
    if tool is None:
        return _calendar_subset_problem(expression)
    out = run([tool, "calendar", "--", expression], check=False, timeout=10)
    if out.returncode == 0:
        return None
    lines = out.stderr.strip().splitlines()
    return lines[-1] if lines else f"systemd-analyze calendar exited with {out.returncode}"


def _calendar_subset_problem(expression: str) -> str | None:
    words = expression.split()
    refused = (
        f"{expression!r} is not in the subset checked without systemd-analyze "
        "(daily, weekly…, or [Mon..Fri] [*-*-*] HH:MM[:SS] [UTC])"
    )
    if len(words) == 1 and words[0].lower() in CALENDAR_SHORTHANDS:
        return None
    if words and words[-1] == "UTC":
        words = words[:-1]
    if words and _WEEKDAYS.fullmatch(words[0].lower()):
        words = words[1:]
    if words and "-" in words[0]:
        if not _fields_ok(words[0].split("-"), _DATE_RANGES):
            return refused
        words = words[1:]
    if len(words) > 1 or (len(words) == 1 and not _fields_ok(words[0].split(":"), _TIME_RANGES)):
        return refused
    return None if expression.split() else refused


def _fields_ok(fields: list[str], ranges: tuple[tuple[int, int], ...]) -> bool:
    """Date (Y-M-D, M-D) or time (H:M, H:M:S) fields: * or n[..m][,…], each with a /step."""
    if not 2 <= len(fields) <= 3 or (ranges is _TIME_RANGES and len(fields) < 2):
        return False
    picked = ranges[-len(fields) :] if ranges is _DATE_RANGES else ranges[: len(fields)]
    for field, (low, high) in zip(fields, picked, strict=True):
        for item in field.split(","):
            match = re.fullmatch(r"(\*|\d+(?:\.\.\d+)?)(?:/(\d+))?", item)
            if not match or (match.group(2) is not None and int(match.group(2)) == 0):
                return False
            numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
            if any(not low <= n <= high for n in numbers):
                return False
    return True
