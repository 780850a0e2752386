"""The planner: a pure function of config + facts → the ordered steps of an install."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import SecretStr

from stellarbase import config as cfg
from stellarbase import envfile, layout, render
from stellarbase.agent import local_address
from stellarbase.agent.targets import targets_file
from stellarbase.errors import ExitCode, StellarError
from stellarbase.files import digest
from stellarbase.localdeps import (
    ADMIN_PASSWORD,
    MIN_POSTGRES,
    MIN_REDIS,
    ServerBinary,
    missing_error,
)
from stellarbase.paths import (
    AGENT_USER,
    GROUP,
    LEGACY_USER,
    POSTGRES_USER,
    REDIS_USER,
    SERVICE_USERS,
    HostPaths,
)
from stellarbase.service_settings import ServiceName, load_catalog, service_credentials

NO_LOCAL_SERVERS = layout.LocalServers()


@dataclass(frozen=True)
class Facts:
    """What the planner needs to know of the host (gathered read-only by facts.py)."""

    version: str
    binary: Path  # the executable to install as this release
    binary_digest: str
    previous_files: tuple[str, ...] = ()  # host paths an earlier install owns
    previous_units: tuple[str, ...] = ()  # units an earlier install started
    local: layout.LocalServers = NO_LOCAL_SERVERS  # binaries of local dependencies
    found: tuple[tuple[str, tuple[ServerBinary, ...]], ...] = ()  # all servers seen, by dep
    gpu_devices: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES ids that get an inference unit
    # Passwords the installer generates (local servers), reused from the last install.
    generated: tuple[tuple[str, str], ...] = ()
    local_data: tuple[str, ...] = ()  # dependencies whose local data directory holds files
    postgres_leftovers: bool = False  # its data directory holds files but no cluster

    def secret(self, name: str) -> str:
        return dict(self.generated)[name]


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
class EnsureDataDir:
    """A directory of data a service user owns. One still `previous`'s (the one user of
    older releases) waits for the same step with `reown`, once the new units are loaded so
    that nothing starts a server as its old user: it stops `units` and re-owns it whole."""

    path: Path
    owner: str
    group: str
    mode: int
    units: tuple[str, ...]
    previous: str = LEGACY_USER
    reown: bool = False


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

POSTGRES_PASSWORD = cfg.secret_env_name("postgres", "password")
REDIS_PASSWORD = cfg.secret_env_name("redis", "password")


def with_local_servers(config: cfg.Config, facts: Facts) -> cfg.Config:
    """The config as the services see it: local dependencies filled in as loopback URLs."""
    update: dict[str, object] = {}
    if facts.local.postgres:
        update["postgres"] = cfg.PostgresConfig(
            url=f"postgresql://stellarbase@127.0.0.1:{config.local.postgres.port}/stellarbase",
            password=SecretStr(facts.secret(POSTGRES_PASSWORD)),
        )
    if facts.local.redis:
        update["redis"] = cfg.RedisConfig(
            url=f"redis://127.0.0.1:{config.local.redis.port}/0",
            password=SecretStr(facts.secret(REDIS_PASSWORD)),
        )
    return config.model_copy(update=update)


def require_local_servers(config: cfg.Config, facts: Facts) -> None:
    found = dict(facts.found)
    for dep, have, minimum in (
        ("postgres", facts.local.postgres, MIN_POSTGRES),
        ("redis", facts.local.redis, MIN_REDIS),
    ):
        if config.mode_of(dep) == cfg.DependencyMode.LOCAL and have is None:  # type: ignore[arg-type]
            raise missing_error(dep, list(found.get(dep, ())), minimum)


def refuse_lost_data(config: cfg.Config, paths: HostPaths, facts: Facts, retire: bool) -> None:
    """A dependency that goes external while its local data is still on disk: refused,
    unless the way forward was taken (the data moved) and said so with --retire-local."""
    if retire:
        return
    deps: tuple[Literal["postgres", "redis"], ...] = ("postgres", "redis")
    leaving = [
        d
        for d in deps
        if d in facts.local_data and config.mode_of(d) == cfg.DependencyMode.EXTERNAL
    ]
    if not leaving:
        return
    where = {"postgres": paths.postgres_data, "redis": paths.redis_data}
    held = ", ".join(f"{d} ({paths.host_view(where[d])})" for d in leaving)
    raise StellarError(
        f"the local {held} holds data, and this config makes it external: "
        "install never leaves data behind unasked",
        hint="move the data first (`stellarbase backup now` and restore it there, or "
        "`pg_dump` into the external server), then run install again with --retire-local: "
        "it stops the local servers and keeps their data on disk",
        code=ExitCode.CONFIG,
    )


def kept_data(config: cfg.Config, paths: HostPaths) -> tuple[Path, ...]:
    """What install, upgrade and rollback never remove, wanted or not: the data, and the
    password that opens the local cluster. Only `uninstall --purge` removes them."""
    kept = [
        paths.postgres_data,
        paths.redis_data,
        paths.wal_spool,
        paths.backup_status_file,
        paths.admin_secrets_file,
    ]
    if config.backup.repository.startswith("file://"):
        kept.append(paths.at(config.backup.repository.removeprefix("file://")))
    return tuple(kept)


def _check_inference_ports(config: cfg.Config, devices: tuple[str, ...]) -> None:
    taken = {port: key for key, port in config.fixed_ports()}
    taken.update({port: "worker.port" for port in config.worker_ports()})
    for unit in render.inference_instances(config, devices):
        if unit.port in taken:
            raise StellarError(
                f"inference.port: the {len(devices)} inference units take ports "
                f"{config.inference.port}-{config.inference.port + len(devices) - 1}, "
                f"and {unit.port} is {taken[unit.port]}",
                hint="choose an inference.port with one free port per GPU after it",
                code=ExitCode.CONFIG,
            )


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    owned: tuple[str, ...]  # host paths the installer owns once applied (for uninstall)
    endpoints: tuple[tuple[str, str], ...]  # (unit, base URL)
    database: tuple[str, str | None] | None = None  # (url, password) for the audit log


def make_plan(
    site_config: cfg.Config, paths: HostPaths, facts: Facts, *, retire_local: bool = False
) -> Plan:
    """The steps to converge the host; raises, before any step, on a config this host
    must not take. `retire_local`: a dependency gone external leaves its local data."""
    require_local_servers(site_config, facts)
    refuse_lost_data(site_config, paths, facts, retire_local)
    _check_inference_ports(site_config, facts.gpu_devices)
    if facts.local.postgres and facts.postgres_leftovers:
        raise StellarError(
            f"{paths.host_view(paths.postgres_data)} holds files but no PostgreSQL cluster: "
            "install never initialises over them",
            hint="if they are not needed (an initdb interrupted by an older release), move "
            "them aside and run install again; otherwise restore the cluster into it",
            code=ExitCode.HOST,
        )
    config = with_local_servers(site_config, facts)
    local = facts.local
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
    users = (POSTGRES_USER, REDIS_USER, *SERVICE_USERS.values())
    steps.append(EnsureUser(users, paths.sysusers_file))

    # 0751: the local servers, not in the group, reach their data directories inside.
    mine(EnsureDir(paths.state_dir, "root", GROUP, 0o751))
    # Data directories are ensured, never owned: a config that no longer wants them leaves
    # them as they are (see kept_data).
    agent_unit = load_catalog().services["agent"].unit
    data_dirs: list[EnsureDataDir] = []
    if local.postgres:  # 0750 with group access (initdb -g): the agent, in it, reads the WAL
        data_dirs.append(EnsureDataDir(paths.postgres_data, POSTGRES_USER, POSTGRES_USER, 0o750,
                                       (layout.POSTGRES_UNIT,)))  # fmt: skip
    if local.redis:
        data_dirs.append(EnsureDataDir(paths.redis_data, REDIS_USER, REDIS_USER, 0o750,
                                       (layout.REDIS_UNIT,)))  # fmt: skip
    backups = render.backups_on(config, local)
    if backups:  # 0755: archive_command runs as the PostgreSQL user and reads the markers
        data_dirs.append(EnsureDataDir(paths.wal_spool, AGENT_USER, AGENT_USER, 0o755,
                                       (agent_unit,)))  # fmt: skip
        repo = config.backup.repository
        if repo.startswith("file://"):  # ensured, never owned: uninstall keeps backups
            where = paths.at(repo.removeprefix("file://"))
            data_dirs.append(EnsureDataDir(where, AGENT_USER, AGENT_USER, 0o750, (agent_unit,)))
    steps.extend(data_dirs)
    reowned = [replace(d, reown=True) for d in data_dirs]  # after the new units are loaded
    # 0751: Redis, not in the group, reaches its own two files (root:stellarbase-redis).
    mine(EnsureDir(paths.etc, "root", GROUP, 0o751))
    mine(EnsureDir(paths.service_settings_dir, "root", GROUP, 0o750))
    mine(EnsureDir(paths.opt, "root", "root", 0o755))
    mine(EnsureDir(paths.releases, "root", "root", 0o755))
    binary = paths.release_binary(facts.version)
    mine(EnsureDir(binary.parent, "root", "root", 0o755))
    mine(CopyFile(binary, facts.binary, facts.binary_digest, "root", "root", 0o755))
    mine(Symlink(paths.current, f"releases/{facts.version}"))

    site = render.render_site_config(site_config).encode()  # as given: local stays local
    secrets = render.render_secrets(config).encode()
    mine(WriteFile(paths.config_file, site, "root", GROUP, 0o640))
    # Root only: what install reads back. Each service gets its own secrets from a file
    # of its own in the credentials directory, which systemd reads as root.
    mine(WriteFile(paths.secrets_file, secrets, "root", "root", 0o600, secret=True))
    mine(EnsureDir(paths.credentials_dir, "root", "root", 0o700))
    # Files each local server reads besides its unit: a change restarts that server only.
    local_inputs: dict[str, bytes] = {}
    if local.postgres:
        admin = {ADMIN_PASSWORD: facts.secret(ADMIN_PASSWORD)}
        admin_env = envfile.render_env_file(admin, "Local PostgreSQL superuser; root only.")
        mine(WriteFile(paths.admin_secrets_file, admin_env.encode(), "root", "root", 0o600, True))
        if paths.live:
            pw = facts.secret(ADMIN_PASSWORD)
            steps.append(InitPostgres(local.postgres.path, paths.postgres_data, pw))
    if local.redis:
        redis_conf = render.render_redis_conf(config, paths).encode()
        redis_auth = render.render_redis_auth(facts.secret(REDIS_PASSWORD)).encode()
        mine(WriteFile(paths.redis_conf, redis_conf, "root", REDIS_USER, 0o640))
        mine(WriteFile(paths.redis_auth, redis_auth, "root", REDIS_USER, 0o640, secret=True))
        local_inputs[layout.REDIS_UNIT] = redis_conf + b"\0" + redis_auth
    devices = facts.gpu_devices
    settings: dict[str, bytes] = {}
    credentials: dict[str, bytes] = {}  # each service's own secrets, an input of its units
    names: list[ServiceName] = [*load_catalog().services]
    if devices:
        names.append("inference")
    for name in names:
        if service_credentials(config, name):
            credentials[name] = render.render_credentials(config, name).encode()
            where = paths.credentials_file(name)
            mine(WriteFile(where, credentials[name], "root", "root", 0o600, secret=True))
        settings[name] = render.render_service_settings(config, name).encode()
        mine(
            WriteFile(
                paths.service_settings_dir / f"{name}.json", settings[name], "root", GROUP, 0o640
            )
        )

    unit_inputs: dict[str, bytes] = {}  # per-instance files that are inputs of one unit
    if devices:
        mine(EnsureDir(paths.inference_env_dir, "root", GROUP, 0o750))
        for unit in render.inference_instances(config, devices):
            device = unit.name.split("@", 1)[1].removesuffix(".service")
            unit_inputs[unit.name] = render.render_inference_env(unit.port).encode()
            env_file = paths.inference_env_dir / f"{device}.env"
            mine(WriteFile(env_file, unit_inputs[unit.name], "root", GROUP, 0o640))

    instances = [*render.unit_instances(config), *render.inference_instances(config, devices)]
    # Only the built-in inference server is known to serve /readyz; another command is
    # healthy once its unit is active.
    probed = {
        u.name
        for u in instances
        if u.service != "inference" or config.inference.command == layout.DEFAULT_INFERENCE_COMMAND
    }
    # Not an input of the agent's unit: the agent reads it again each round, so a new
    # worker or port does not restart it. On a live host it is written only once the
    # schema is current, just before the services restart: a run that fails earlier
    # never has the agent probe ports nothing listens on yet.
    agent_targets = render.render_agent_targets(config, local, devices, probed).encode()
    targets = WriteFile(targets_file(paths), agent_targets, "root", GROUP, 0o640)
    owned.append(targets.path)
    if not paths.live:
        steps.append(targets)

    unit_files = render.render_units(config, paths, local, devices)
    for unit_name, content in unit_files.items():
        mine(WriteFile(paths.unit_dir / unit_name, content.encode(), "root", "root", 0o644))
    wants = paths.unit_dir / "multi-user.target.wants"
    steps.append(EnsureDir(wants, "root", "root", 0o755))
    mine(Symlink(wants / layout.TARGET, paths.host_view(paths.unit_dir / layout.TARGET)))

    owned_views = tuple(paths.host_view(p) for p in owned)
    kept = kept_data(config, paths)
    stale = [
        paths.at(p)
        for p in facts.previous_files
        if p not in owned_views
        and not p.startswith(paths.host_view(paths.releases) + "/")
        # An earlier release may have recorded a data directory as its own file.
        and not any(k == paths.at(p) or k in paths.at(p).parents for k in kept)
        and not any(paths.at(p) in k.parents for k in kept)
    ]
    wanted_units: set[str] = set()
    if paths.live:
        wanted_units = {*local.units(), layout.SUPERVISE_SOCKET, *(u.name for u in instances)}
        if backups:
            wanted_units.add(layout.BACKUP_TIMER)
        gone = tuple(
            u for u in facts.previous_units if u not in wanted_units and u != layout.TARGET
        )
        if gone:  # stopped before their unit files and settings go
            steps.append(StopUnits(gone))
    if stale:
        steps.append(RemoveStale(tuple(stale)))

    if not paths.live:
        steps.extend(reowned)

    database = None
    if config.postgres:
        secret = config.postgres.password
        database = (config.postgres.url, secret.get_secret_value() if secret else None)
    endpoints = tuple(
        (
            u.name,
            _base_url(local_address(config.bind) if u.service == "agent" else config.bind, u.port),
        )
        for u in instances
    )
    ready_urls = {name: f"{url}/readyz" for name, url in endpoints if name in probed}
    if paths.live:
        loaded = [u for u in unit_files if not u.endswith("@.service")]  # templates: via instances
        steps.append(DaemonReload(tuple(dict.fromkeys([*loaded, *wanted_units]))))
        steps.extend(reowned)
        for unit_name in local.units():
            inputs = unit_files[unit_name].encode() + b"\0" + local_inputs.get(unit_name, b"")
            steps.append(StartUnit(unit_name, digest(inputs)))
        timeout = config.health.timeout_seconds
        if local.postgres:
            steps.append(
                EnsureDatabase(
                    config.local.postgres.port,
                    facts.secret(ADMIN_PASSWORD),
                    facts.secret(POSTGRES_PASSWORD),
                    timeout,
                )
            )
            steps.append(
                ConfigureArchiving(
                    config.local.postgres.port,
                    facts.secret(ADMIN_PASSWORD),
                    archive_settings(config, paths, backups),
                    layout.POSTGRES_UNIT,
                    timeout,
                )
            )
        if database:
            steps.append(Migrate(*database, timeout))
        steps.append(targets)
        socket_inputs = b"\0".join(
            unit_files[u].encode() for u in (layout.SUPERVISE_SOCKET, layout.SUPERVISE_TEMPLATE)
        )
        steps.append(StartUnit(layout.SUPERVISE_SOCKET, digest(socket_inputs)))
        for unit in instances:
            inputs = b"\0".join(
                [
                    unit_files[unit.template].encode(),
                    settings[unit.service],
                    unit_inputs.get(unit.name, b""),
                    credentials.get(unit.service, b""),
                    facts.binary_digest.encode(),
                ]
            )
            ready_url = ready_urls.get(unit.name, "")
            steps.append(StartUnit(unit.name, digest(inputs), port=unit.port, ready_url=ready_url))
        if backups:
            timer = (
                unit_files[layout.BACKUP_TIMER].encode() + unit_files[layout.BACKUP_UNIT].encode()
            )
            steps.append(StartUnit(layout.BACKUP_TIMER, digest(timer)))
        # Restarting the target would restart every service (PartOf=): only ever start it.
        steps.append(StartUnit(layout.TARGET, "", restart_on_change=False))
        steps.append(
            WaitHealthy(
                units=(
                    *local.units(),
                    layout.SUPERVISE_SOCKET,
                    *(u.name for u in instances),
                    layout.TARGET,
                ),
                ready_urls=tuple(ready_urls.items()),
                timeout=config.health.timeout_seconds,
            )
        )
        if backups:  # after the gate: the agent must archive for a backup to complete
            steps.append(FirstBackup(layout.BACKUP_UNIT))
    return Plan(tuple(steps), owned_views, endpoints, database)


def archive_settings(
    config: cfg.Config, paths: HostPaths, backups: bool
) -> tuple[tuple[str, str], ...]:
    """With backups on: archive every WAL file through the agent. Off: PostgreSQL's defaults."""
    if not backups:
        return (("archive_mode", ""), ("archive_command", ""), ("archive_timeout", ""))
    from stellarbase.backup.archiver import archive_command

    return (
        ("wal_level", "replica"),
        ("archive_mode", "on"),
        ("archive_command", archive_command(Path(paths.host_view(paths.wal_spool)))),
        ("archive_timeout", f"{config.backup.archive_timeout_seconds}s"),
    )


def _base_url(bind: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    if bind.is_unspecified:
        bind = ipaddress.ip_address("::1" if bind.version == 6 else "127.0.0.1")
    host = f"[{bind}]" if bind.version == 6 else str(bind)
    return f"http://{host}:{port}"


def describe(step: Step) -> str:
    """One line naming the step, for plan output and logs (never a secret)."""
    match step:
        case EnsureUser():
            return "ensure system users " + ", ".join(step.users)
        case EnsureDataDir() if step.reown:
            return f"re-own {step.path} from {step.previous} ({step.owner}:{step.group})"
        case EnsureDir() | EnsureDataDir():
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
