"""The planner: a pure function of config + facts → the ordered steps of an install."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from stellarbase import config as cfg
from stellarbase import render
from stellarbase.files import digest
from stellarbase.paths import GROUP, USER, HostPaths


@dataclass(frozen=True)
class Facts:
    """What the planner needs to know of the host (gathered read-only by facts.py)."""

    version: str
    binary: Path  # the executable to install as this release
    binary_digest: str
    previous_files: tuple[str, ...] = ()  # host paths an earlier install owns
    previous_units: tuple[str, ...] = ()  # units an earlier install started


@dataclass(frozen=True)
class EnsureUser:
    user: str
    sysusers: Path


@dataclass(frozen=True)
class EnsureDir:
    path: Path
    owner: str
    group: str
    mode: int


@dataclass(frozen=True)
class WriteFile:
    path: Path
    content: bytes
    owner: str
    group: str
    mode: int
    secret: bool = False


@dataclass(frozen=True)
class CopyFile:
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


@dataclass(frozen=True)
class WaitHealthy:
    units: tuple[str, ...]
    ready_urls: tuple[tuple[str, str], ...]  # (unit, url of its /readyz)
    timeout: float


Step = (
    EnsureUser
    | EnsureDir
    | WriteFile
    | CopyFile
    | Symlink
    | RemoveStale
    | StopUnits
    | DaemonReload
    | StartUnit
    | WaitHealthy
)


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    owned: tuple[str, ...]  # host paths the installer owns once applied (for uninstall)
    endpoints: tuple[tuple[str, str], ...]  # (unit, base URL)


def make_plan(config: cfg.Config, paths: HostPaths, facts: Facts) -> Plan:
    steps: list[Step] = []
    owned: list[Path] = []

    def mine(step: EnsureDir | WriteFile | CopyFile | Symlink) -> None:
        steps.append(step)
        owned.append(step.path)

    # Shared system directories: ensured (an empty test root lacks them) but never owned.
    for shared in ("/etc/sysusers.d", "/etc/systemd/system", "/opt", "/var/lib"):
        steps.append(EnsureDir(paths.at(shared), "root", "root", 0o755))
    mine(
        WriteFile(
            paths.sysusers_file, render.render_sysusers(paths).encode(), "root", "root", 0o644
        )
    )
    steps.append(EnsureUser(USER, paths.sysusers_file))

    mine(EnsureDir(paths.state_dir, "root", GROUP, 0o750))
    mine(EnsureDir(paths.etc, "root", GROUP, 0o750))
    mine(EnsureDir(paths.service_settings_dir, "root", GROUP, 0o750))
    mine(EnsureDir(paths.opt, "root", "root", 0o755))
    mine(EnsureDir(paths.releases, "root", "root", 0o755))
    release = paths.releases / facts.version
    mine(EnsureDir(release, "root", "root", 0o755))
    binary = release / "stellarbase"
    mine(CopyFile(binary, facts.binary, facts.binary_digest, "root", "root", 0o755))
    mine(Symlink(paths.current, f"releases/{facts.version}"))

    site = render.render_site_config(config).encode()
    secrets = render.render_secrets(config).encode()
    mine(WriteFile(paths.config_file, site, "root", GROUP, 0o640))
    mine(WriteFile(paths.secrets_file, secrets, "root", GROUP, 0o640, secret=True))
    settings: dict[str, bytes] = {}
    for name in cfg.load_catalog().services:
        settings[name] = render.render_service_settings(config, name).encode()
        mine(
            WriteFile(
                paths.service_settings_dir / f"{name}.json", settings[name], "root", GROUP, 0o640
            )
        )

    unit_files = render.render_units(config, paths)
    for unit_name, content in unit_files.items():
        mine(WriteFile(paths.unit_dir / unit_name, content.encode(), "root", "root", 0o644))
    wants = paths.unit_dir / "multi-user.target.wants"
    steps.append(EnsureDir(wants, "root", "root", 0o755))
    mine(Symlink(wants / render.TARGET, paths.host_view(paths.unit_dir / render.TARGET)))

    owned_views = tuple(paths.host_view(p) for p in owned)
    stale = [
        paths.at(p)
        for p in facts.previous_files
        if p not in owned_views and not p.startswith(paths.host_view(paths.releases) + "/")
    ]
    if stale:
        steps.append(RemoveStale(tuple(stale)))

    instances = render.unit_instances(config)
    endpoints = tuple((u.name, _base_url(config.bind, u.port)) for u in instances)
    if paths.live:
        wanted = {u.name for u in instances}
        gone = tuple(u for u in facts.previous_units if u not in wanted and u != render.TARGET)
        if gone:
            steps.append(StopUnits(gone))
        loaded = [u for u in unit_files if not u.endswith("@.service")]  # templates: via instances
        steps.append(DaemonReload(tuple(dict.fromkeys([*loaded, *wanted]))))
        for unit in instances:
            inputs = b"\0".join(
                [
                    unit_files[unit.template].encode(),
                    settings[unit.service],
                    secrets,
                    facts.binary_digest.encode(),
                ]
            )
            steps.append(StartUnit(unit.name, digest(inputs), port=unit.port))
        # Restarting the target would restart every service (PartOf=): only ever start it.
        steps.append(StartUnit(render.TARGET, "", restart_on_change=False))
        steps.append(
            WaitHealthy(
                units=(*(u.name for u in instances), render.TARGET),
                ready_urls=tuple((name, f"{url}/readyz") for name, url in endpoints),
                timeout=config.health.timeout_seconds,
            )
        )
    return Plan(tuple(steps), owned_views, endpoints)


def _base_url(bind: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    if bind.is_unspecified:
        bind = ipaddress.ip_address("::1" if bind.version == 6 else "127.0.0.1")
    host = f"[{bind}]" if bind.version == 6 else str(bind)
    return f"http://{host}:{port}"


def describe(step: Step) -> str:
    """One line naming the step, for plan output and logs (never a secret)."""
    match step:
        case EnsureUser():
            return f"ensure system user {step.user}"
        case EnsureDir():
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
        case WaitHealthy():
            return f"wait until {len(step.units)} units are active and ready"
