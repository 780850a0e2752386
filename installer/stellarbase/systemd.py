"""Thin adapter over systemctl and journalctl: build argv, run, parse."""

from __future__ import annotations

from dataclasses import dataclass

from stellarbase.run import run

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
    """Properties of several units in one systemctl call."""
    if not units:
        return {}
    out = run(["systemctl", "show", "--property=" + ",".join(("Id", *SHOW_PROPS)), *units])
    statuses: dict[str, UnitStatus] = {}
    for block, unit in zip(out.stdout.strip().split("\n\n"), units, strict=False):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
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
    if units:
        run(["systemctl", "stop", *units], timeout=120)


def reset_failed(units: list[str]) -> None:
    if units:
        run(["systemctl", "reset-failed", *units], check=False)


def journal_tail(unit: str, lines: int = 15) -> list[str]:
    out = run(
        ["journalctl", "--no-pager", "--output=cat", "-n", str(lines), "-u", unit], check=False
    )
    return out.stdout.strip().splitlines()
