"""The running system as the executor sees it: systemd, system users, the database and the
health gate, behind one `Host`; every wait, and so the clock, is behind it too.

`LiveHost` runs the real commands. `FilesOnlyHost` serves a --root install, which only
prepares files: nothing runs there, so the executor skips the steps a plan marks as
needing a running system (`Host.running_system`). `for_paths` is the one place that
decides which host a run gets. Tests inject a recording fake (tests/fakehost.py).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Protocol

from stellarbase import localdeps, migrate, systemd, verify
from stellarbase.paths import POSTGRES_USER, HostPaths
from stellarbase.proc import run

# Test-only hook: SIGKILL ourselves right after step N, to prove a re-run converges.
STOP_AFTER_ENV = "STELLARBASE_STOP_AFTER_STEP"
# Test-only: a directory of migrations other than the shipped ones.
MIGRATIONS_ENV = "STELLARBASE_MIGRATIONS_DIR"


class Host(Protocol):
    """What the executor asks of the system beyond the files under the root."""

    @property
    def running_system(self) -> bool:
        """False for a files-only host: steps that need units running are skipped."""
        ...

    # systemctl
    def show(self, units: list[str]) -> dict[str, systemd.UnitStatus]: ...
    def start(self, unit: str) -> None: ...
    def restart(self, unit: str, *, wait: bool = False) -> None: ...
    def stop(self, units: list[str]) -> None: ...
    def reset_failed(self, units: list[str]) -> None: ...
    def daemon_reload(self) -> None: ...

    # system users
    def sysusers(self, conf: Path) -> None: ...

    # the local PostgreSQL and the schema
    def init_cluster(self, bindir: Path, data_dir: Path, admin_password: str) -> None: ...
    def ensure_database(
        self, port: int, admin_password: str, app_password: str, timeout: float
    ) -> tuple[list[str], bool]: ...
    def configure_settings(
        self, port: int, admin_password: str, settings: tuple[tuple[str, str], ...], timeout: float
    ) -> tuple[list[str], list[str]]: ...
    def wait_until_up(self, port: int, admin_password: str, timeout: float) -> None: ...
    def migration_status(self, url: str, password: str | None) -> list[migrate.MigrationState]: ...
    def migrate_up(self, url: str, password: str | None) -> list[migrate.Migration]: ...

    # the health gate (it keeps the clock: every wait of a run is behind the host)
    def wait_healthy(
        self, units: list[str], ready_urls: list[tuple[str, str]], timeout: float
    ) -> None: ...

    def step_done(self, index: int) -> None:
        """Called after step `index` (from 1) of a real run."""
        ...


class LiveHost:
    """The real commands, as root on a host that runs systemd."""

    running_system = True

    def show(self, units: list[str]) -> dict[str, systemd.UnitStatus]:
        return systemd.show(units)

    def start(self, unit: str) -> None:
        systemd.start(unit)

    def restart(self, unit: str, *, wait: bool = False) -> None:
        systemd.restart(unit, wait=wait)

    def stop(self, units: list[str]) -> None:
        systemd.stop(units)

    def reset_failed(self, units: list[str]) -> None:
        systemd.reset_failed(units)

    def daemon_reload(self) -> None:
        systemd.daemon_reload()

    def sysusers(self, conf: Path) -> None:
        run(["systemd-sysusers", str(conf)])

    def init_cluster(self, bindir: Path, data_dir: Path, admin_password: str) -> None:
        localdeps.init_cluster(bindir, data_dir, POSTGRES_USER, admin_password)

    def ensure_database(
        self, port: int, admin_password: str, app_password: str, timeout: float
    ) -> tuple[list[str], bool]:
        return localdeps.ensure_database(port, admin_password, app_password, timeout)

    def configure_settings(
        self, port: int, admin_password: str, settings: tuple[tuple[str, str], ...], timeout: float
    ) -> tuple[list[str], list[str]]:
        return localdeps.configure_settings(port, admin_password, settings, timeout)

    def wait_until_up(self, port: int, admin_password: str, timeout: float) -> None:
        localdeps.wait_until_up(port, admin_password, timeout)

    def migration_status(self, url: str, password: str | None) -> list[migrate.MigrationState]:
        return migrate.migration_status(url, password, directory=_migrations())

    def migrate_up(self, url: str, password: str | None) -> list[migrate.Migration]:
        return migrate.migrate_up(url, password, directory=_migrations())

    def wait_healthy(
        self, units: list[str], ready_urls: list[tuple[str, str]], timeout: float
    ) -> None:
        verify.wait_healthy(units, ready_urls, timeout)

    def step_done(self, index: int) -> None:
        if index == int(os.environ.get(STOP_AFTER_ENV, "0") or 0):
            os.kill(os.getpid(), signal.SIGKILL)


class FilesOnlyHost(LiveHost):
    """A --root install: files under a root that no systemd runs. Its users are made in
    the root's own user database; its units are never loaded, so none is running."""

    running_system = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def show(self, units: list[str]) -> dict[str, systemd.UnitStatus]:
        return {
            u: systemd.UnitStatus(u, "not-found", "inactive", "dead", 0, 0, False) for u in units
        }

    def start(self, unit: str) -> None:
        pass

    def restart(self, unit: str, *, wait: bool = False) -> None:
        pass

    def stop(self, units: list[str]) -> None:
        pass

    def reset_failed(self, units: list[str]) -> None:
        pass

    def daemon_reload(self) -> None:
        pass

    def sysusers(self, conf: Path) -> None:
        run(["systemd-sysusers", f"--root={self.root}", str(conf)])


def for_paths(paths: HostPaths) -> Host:
    """The host a run under `paths` acts on: the live one, or files under a test root."""
    return LiveHost() if paths.live else FilesOnlyHost(paths.root)


def _migrations() -> Path:
    return Path(os.environ.get(MIGRATIONS_ENV) or migrate.BUILTIN_DIR)
