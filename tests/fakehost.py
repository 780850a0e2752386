"""A recording fake of the running system, for unit tests of the whole plan of a live host.

It stands in for `stellarbase.host.LiveHost`: every systemctl, sysusers, database and
health-gate call is recorded in order in `calls`; units keep a state (start → active,
restarts counted, a changed unit file needs a daemon-reload); users land in the test
root's own passwd and group; the database applies the shipped migrations in memory. It
can be told to fail at a given call or right after step N of a run.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from stellarbase import migrate
from stellarbase.errors import ExitCode, StellarError
from stellarbase.paths import HostPaths
from stellarbase.systemd import UnitStatus

_NOW = datetime(2026, 1, 1)
# Settings PostgreSQL takes only at a restart.
RESTART_SETTINGS = frozenset({"wal_level", "archive_mode"})


@dataclass
class FakeHost:
    paths: HostPaths
    fail_call: str = ""  # the name of a call that raises (e.g. "migrate_up")
    fail_after_step: int = 0  # raise right after this step (from 1) of a run
    unhealthy: frozenset[str] = frozenset()  # units the health gate never sees ready
    calls: list[tuple[str, ...]] = field(default_factory=list)
    active: set[str] = field(default_factory=set)
    restarts: Counter[str] = field(default_factory=Counter)
    settings: dict[str, str] = field(default_factory=dict)
    applied: set[int] = field(default_factory=set)  # migration versions
    database: bool = False
    _loaded: dict[str, bytes] = field(default_factory=dict)  # unit files systemd has read

    running_system = True

    def _call(self, *call: str) -> None:
        self.calls.append(call)
        if call[0] == self.fail_call:
            raise StellarError(f"{call[0]} failed (fake host)", code=ExitCode.DEPENDENCY)

    # --- systemctl ----------------------------------------------------------------------

    def show(self, units: list[str]) -> dict[str, UnitStatus]:
        return {u: self._status(u) for u in units}

    def _status(self, unit: str) -> UnitStatus:
        on_disk = _read(self._unit_file(unit))
        loaded = self._loaded.get(self._unit_file(unit).name)
        state = "active" if unit in self.active else "inactive"
        return UnitStatus(
            name=unit,
            load_state="loaded" if loaded is not None else "not-found",
            active_state=state,
            sub_state="running" if state == "active" else "dead",
            main_pid=0,
            restarts=self.restarts[unit],
            need_daemon_reload=on_disk != loaded,
        )

    def _unit_file(self, unit: str) -> Path:
        exact = self.paths.unit_dir / unit
        return exact if exact.exists() else self.paths.unit_dir / re.sub(r"@[^.]+\.", "@.", unit)

    def start(self, unit: str) -> None:
        self._call("start", unit)
        self.active.add(unit)

    def restart(self, unit: str, *, wait: bool = False) -> None:
        self._call("restart", unit, "wait" if wait else "no-block")
        self.active.add(unit)
        self.restarts[unit] += 1

    def stop(self, units: list[str]) -> None:
        self._call("stop", *units)
        self.active.difference_update(units)

    def reset_failed(self, units: list[str]) -> None:
        self.calls.append(("reset-failed", *units))

    def daemon_reload(self) -> None:
        self._call("daemon-reload")
        unit_dir = self.paths.unit_dir
        files = unit_dir.glob("*") if unit_dir.is_dir() else []
        self._loaded = {p.name: p.read_bytes() for p in files if p.is_file()}

    # --- system users -------------------------------------------------------------------

    def sysusers(self, conf: Path) -> None:
        """Each `u` of the file becomes a user with a group of its own; `g` a group."""
        self._call("sysusers", conf.name)
        passwd, group = self.paths.passwd, self.paths.group
        passwd.parent.mkdir(parents=True, exist_ok=True)
        users = _names(passwd)
        groups = _names(group)
        for line in conf.read_text().splitlines():
            kind, _, rest = line.partition(" ")
            name = rest.split(" ", 1)[0]
            if kind == "u" and name not in users:
                users.add(name)
                with passwd.open("a") as f:
                    f.write(
                        f"{name}:x:{900 + len(users)}:{900 + len(users)}::/:/usr/sbin/nologin\n"
                    )
            if kind in ("u", "g") and name not in groups:
                groups.add(name)
                with group.open("a") as f:
                    f.write(f"{name}:x:{800 + len(groups)}:\n")

    # --- the local PostgreSQL and the schema --------------------------------------------

    def init_cluster(self, bindir: Path, data_dir: Path, admin_password: str) -> None:
        self._call("init-cluster", str(data_dir))
        (data_dir / "global").mkdir(parents=True, exist_ok=True)
        (data_dir / "PG_VERSION").write_text("15\n")
        (data_dir / "global" / "pg_control").write_bytes(b"control")

    def ensure_database(
        self, port: int, admin_password: str, app_password: str, timeout: float
    ) -> tuple[list[str], bool]:
        self._call("ensure-database", str(port))
        made = [] if self.database else ["created role stellarbase", "created database"]
        self.database = True
        return made, True

    def configure_settings(
        self, port: int, admin_password: str, settings: tuple[tuple[str, str], ...], timeout: float
    ) -> tuple[list[str], list[str]]:
        self._call("configure-settings", str(port))
        changed = [name for name, value in settings if self.settings.get(name, "") != value]
        self.settings.update(settings)
        return changed, [name for name in changed if name in RESTART_SETTINGS]

    def wait_until_up(self, port: int, admin_password: str, timeout: float) -> None:
        self._call("wait-until-up", str(port))

    def migration_status(self, url: str, password: str | None) -> list[migrate.MigrationState]:
        self._call("migration-status")
        return [
            migrate.MigrationState(
                m.version, m.name, _NOW if m.version in self.applied else None, True
            )
            for m in migrate.load_migrations()
        ]

    def migrate_up(self, url: str, password: str | None) -> list[migrate.Migration]:
        self._call("migrate-up")
        done = [m for m in migrate.load_migrations() if m.version not in self.applied]
        self.applied.update(m.version for m in done)
        return done

    # --- the health gate ----------------------------------------------------------------

    def wait_healthy(
        self, units: list[str], ready_urls: list[tuple[str, str]], timeout: float
    ) -> None:
        self._call("wait-healthy", *units)
        down = [u for u in units if u not in self.active or u in self.unhealthy]
        if down:
            raise StellarError(f"{down[0]} is not healthy (fake host)", code=ExitCode.UNHEALTHY)

    def step_done(self, index: int) -> None:
        if index == self.fail_after_step:
            raise StellarError(f"failed after step {index} (fake host)", code=ExitCode.HOST)

    # --- what the tests read ------------------------------------------------------------

    def named(self, *names: str) -> list[tuple[str, ...]]:
        """The recorded calls of these kinds, in order."""
        return [c for c in self.calls if c[0] in names]


def _names(table: Path) -> set[str]:
    if not table.exists():
        return set()
    return {line.split(":", 1)[0] for line in table.read_text().splitlines() if line}


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
