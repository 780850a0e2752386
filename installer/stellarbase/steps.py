"""The steps of a plan: what the planner decides and the executor carries out.

Pure data. `Plan.needs_system` names the planned steps that only a running system can take
(systemd units, the local servers, the health gate): a files-only host skips them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stellarbase.paths import LEGACY_USER


@dataclass(frozen=True)
class EnsureUser:
    users: tuple[str, ...]
    sysusers: Path


@dataclass(frozen=True)
class EnsureDir:
    path: Path
    owner: str
    group: str
    mode: int


@dataclass(frozen=True)
class EnsureDataDir(EnsureDir):
    """A directory of data a service user owns. One still `previous`'s (the one user of
    older releases) waits for the same step with `reown`, once the new units are loaded so
    that nothing starts a server as its old user: it stops `units` and re-owns it whole."""

    units: tuple[str, ...]
    previous: str = LEGACY_USER
    reown: bool = False


@dataclass(frozen=True)
class WriteFile:
    """A file rendered by the planner; `secret`: its diff is never shown."""

    path: Path
    content: bytes
    owner: str
    group: str
    mode: int
    secret: bool = False


@dataclass(frozen=True)
class CopyFile:
    """A file copied as it is (the release binary), compared by its digest."""

    path: Path
    source: Path
    digest: str
    owner: str
    group: str
    mode: int


@dataclass(frozen=True)
class Symlink:
    path: Path
    target: str


@dataclass(frozen=True)
class RemoveStale:
    """Paths an earlier install wrote that this config no longer wants."""

    paths: tuple[Path, ...]


@dataclass(frozen=True)
class StopUnits:
    units: tuple[str, ...]


@dataclass(frozen=True)
class DaemonReload:
    units: tuple[str, ...]  # reload when any of them changed on disk


@dataclass(frozen=True)
class StartUnit:
    unit: str
    digest: str  # of every input of the unit; a change means restart
    restart_on_change: bool = True
    port: int = 0
    ready_url: str = ""  # its /readyz: a rolling restart waits for it before the next unit


@dataclass(frozen=True)
class InitPostgres:
    bindir: Path
    data_dir: Path
    admin_password: str  # never shown: describe() leaves it out


@dataclass(frozen=True)
class EnsureDatabase:
    port: int
    admin_password: str
    app_password: str
    timeout: float


@dataclass(frozen=True)
class ConfigureArchiving:
    """PostgreSQL settings for WAL archiving, by ALTER SYSTEM; restarts only when needed."""

    port: int
    admin_password: str
    settings: tuple[tuple[str, str], ...]  # name, value ("" resets to the default)
    unit: str
    timeout: float


@dataclass(frozen=True)
class FirstBackup:
    """Once per host, right after backups are turned on: a base backup to restore from."""

    unit: str


@dataclass(frozen=True)
class Migrate:
    url: str
    password: str | None
    timeout: float


@dataclass(frozen=True)
class WaitHealthy:
    units: tuple[str, ...]
    ready_urls: tuple[tuple[str, str], ...]  # (unit, url of its /readyz)
    timeout: float


Step = (
    EnsureUser
    | EnsureDir
    | EnsureDataDir
    | WriteFile
    | CopyFile
    | Symlink
    | RemoveStale
    | StopUnits
    | DaemonReload
    | StartUnit
    | InitPostgres
    | EnsureDatabase
    | ConfigureArchiving
    | FirstBackup
    | Migrate
    | WaitHealthy
)


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    owned: tuple[str, ...]  # host paths the installer owns once applied (for uninstall)
    endpoints: tuple[tuple[str, str], ...]  # (unit, base URL)
    database: tuple[str, str | None] | None = None  # (url, password) for the audit log
    needs_system: frozenset[Step] = field(default_factory=frozenset)


def describe(step: Step) -> str:
    """One line naming the step, for plan output and logs (never a secret)."""
    match step:
        case EnsureUser():
            return "ensure system users " + ", ".join(step.users)
        case EnsureDataDir() if step.reown:
            return f"re-own {step.path} from {step.previous} ({step.owner}:{step.group})"
        case EnsureDir():  # EnsureDataDir too
            return f"ensure dir {step.path} ({step.owner}:{step.group} {step.mode:04o})"
        case WriteFile() | CopyFile():
            return f"write {step.path} ({step.owner}:{step.group} {step.mode:04o})"
        case Symlink():
            return f"link {step.path} -> {step.target}"
        case RemoveStale():
            return "remove " + ", ".join(str(p) for p in step.paths)
        case StopUnits():
            return "stop " + ", ".join(step.units)
        case DaemonReload():
            return "systemctl daemon-reload"
        case StartUnit():
            return f"start {step.unit}"
        case InitPostgres():
            return f"initialise the local PostgreSQL cluster in {step.data_dir}"
        case EnsureDatabase():
            return "ensure the local database, role and extensions"
        case ConfigureArchiving():
            on = dict(step.settings).get("archive_mode") == "on"
            return "configure WAL archiving" if on else "keep WAL archiving off"
        case FirstBackup():
            return f"start the first base backup ({step.unit})"
        case Migrate():
            return "apply database migrations"
        case WaitHealthy():
            return f"wait until {len(step.units)} units are active and ready"


# Steps that need a running system: systemd's units, the local servers they run, the
# database in them and the health gate. The planner marks them in Plan.needs_system.
SYSTEM_STEPS = (
    StopUnits,
    DaemonReload,
    StartUnit,
    InitPostgres,
    EnsureDatabase,
    ConfigureArchiving,
    Migrate,
    WaitHealthy,
    FirstBackup,
)
