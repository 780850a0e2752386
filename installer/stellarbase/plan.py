"""The planner: a pure function of config + facts → the ordered steps of an install.

`make_plan` refuses what this host must not take, computes the Layout once, then lets one
named planner after another add its steps, in the order the executor takes them. The plan
is always the whole plan of a live host; a files-only host (--root) skips the steps it
marks as needing a running system.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from pydantic import SecretStr

from stellarbase import config as cfg
from stellarbase import envfile, layout, render, steps
from stellarbase.agent.targets import targets_file
from stellarbase.errors import ExitCode, StellarError
from stellarbase.facts import Facts
from stellarbase.files import digest
from stellarbase.layout import POSTGRES_PASSWORD, REDIS_PASSWORD, Layout
from stellarbase.localdeps import ADMIN_PASSWORD, MIN_POSTGRES, MIN_REDIS, missing_error
from stellarbase.paths import GROUP, POSTGRES_USER, REDIS_USER, SERVICE_USERS, HostPaths
from stellarbase.service_settings import ServiceName, load_catalog, service_credentials


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
    """A dependency in local mode needs its server's binaries on this host."""
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
    if config.backup.location.directory is not None:
        kept.append(paths.at(config.backup.location.directory))
    return tuple(kept)


def _check_inference_ports(config: cfg.Config, devices: tuple[str, ...]) -> None:
    taken = {port: key for key, port in config.fixed_ports()}
    taken.update({port: "worker.port" for port in config.worker_ports()})
    for unit in layout.inference_instances(config, devices):
        if unit.port in taken:
            raise StellarError(
                f"inference.port: the {len(devices)} inference units take ports "
                f"{config.inference.port}-{config.inference.port + len(devices) - 1}, "
                f"and {unit.port} is {taken[unit.port]}",
                hint="choose an inference.port with one free port per GPU after it",
                code=ExitCode.CONFIG,
            )


@dataclass
class Draft:
    """The plan as the planners build it: its steps so far, and the host paths it owns."""

    paths: HostPaths
    planned: list[steps.Step] = field(default_factory=list)
    owned: list[Path] = field(default_factory=list)

    def add(self, *more: steps.Step) -> None:
        self.planned.extend(more)

    def mine(
        self, step: steps.EnsureDir | steps.WriteFile | steps.CopyFile | steps.Symlink
    ) -> None:
        """A step whose path the installer owns once applied (uninstall removes it)."""
        self.planned.append(step)
        self.owned.append(step.path)


@dataclass(frozen=True)
class Inputs:
    """What a unit's digest covers besides its unit file: a change restarts that unit only."""

    binary_digest: str
    unit_files: dict[str, str]
    settings: dict[str, bytes]  # by service
    credentials: dict[str, bytes]  # each service's own secrets, by service
    per_unit: dict[str, bytes]  # files of one unit or instance (redis.conf, PORT=)

    def of(self, unit: layout.UnitInstance) -> str:
        return digest(
            b"\0".join(
                [
                    self.unit_files[unit.template].encode(),
                    self.settings[unit.service],
                    self.per_unit.get(unit.name, b""),
                    self.credentials.get(unit.service, b""),
                    self.binary_digest.encode(),
                ]
            )
        )

    def of_files(self, *units: str, sep: bytes = b"\0") -> str:
        return digest(sep.join(self.unit_files[u].encode() for u in units))


def make_plan(
    site_config: cfg.Config, paths: HostPaths, facts: Facts, *, retire_local: bool = False
) -> steps.Plan:
    """The steps to converge the host; raises, before any step, on a config this host
    must not take. `retire_local`: a dependency gone external leaves its local data."""
    require_local_servers(site_config, facts)
    refuse_lost_data(site_config, paths, facts, retire_local)
    _check_inference_ports(site_config, facts.gpu_devices)
    refuse_postgres_leftovers(paths, facts)
    config = with_local_servers(site_config, facts)
    where = layout.compute(config, facts.local, facts.gpu_devices)
    draft = Draft(paths)
    plan_users(draft)
    data_dirs = plan_directories(draft, config, where)
    plan_release(draft, facts)
    inputs = plan_config(draft, site_config, config, facts, where)
    unit_files, targets = plan_units(draft, config, where)
    inputs = replace(inputs, unit_files=unit_files)
    plan_cleanup(draft, config, facts, where)
    plan_reload(draft, where, unit_files, data_dirs)
    plan_local_servers(draft, where, inputs)
    plan_database(draft, config, facts, where)
    plan_start(draft, where, inputs, targets)
    plan_health(draft, config, where)
    planned = tuple(draft.planned)
    return steps.Plan(
        planned,
        tuple(paths.host_view(p) for p in draft.owned),
        where.endpoints,
        database(config),
        frozenset(s for s in planned if isinstance(s, steps.SYSTEM_STEPS)),
    )


def database(config: cfg.Config) -> tuple[str, str | None] | None:
    """The URL and password of the services' database, when there is one."""
    if not config.postgres:
        return None
    secret = config.postgres.password
    return config.postgres.url, secret.get_secret_value() if secret else None


def refuse_postgres_leftovers(paths: HostPaths, facts: Facts) -> None:
    if facts.local.postgres and facts.postgres_leftovers:
        raise StellarError(
            f"{paths.host_view(paths.postgres_data)} holds files but no PostgreSQL cluster: "
            "install never initialises over them",
            hint="if they are not needed (an initdb interrupted by an older release), move "
            "them aside and run install again; otherwise restore the cluster into it",
            code=ExitCode.HOST,
        )


def plan_users(draft: Draft) -> None:
    """The shared system directories, and a system user for each service and server."""
    paths = draft.paths
    # Shared system directories: ensured (an empty test root lacks them) but never owned.
    for shared in ("/etc/sysusers.d", "/etc/systemd/system", "/opt", "/var/lib"):
        draft.add(steps.EnsureDir(paths.at(shared), "root", "root", 0o755))
    sysusers = render.render_sysusers(paths).encode()
    draft.mine(steps.WriteFile(paths.sysusers_file, sysusers, "root", "root", 0o644))
    users = (POSTGRES_USER, REDIS_USER, *SERVICE_USERS.values())
    draft.add(steps.EnsureUser(users, paths.sysusers_file))


def plan_directories(draft: Draft, config: cfg.Config, where: Layout) -> list[steps.EnsureDataDir]:
    """The state and config directories, and the data directories: those are ensured,
    never owned (see kept_data). Returns them, to re-own once the new units are loaded."""
    paths = draft.paths
    # 0751: the local servers, not in the group, reach their data directories inside.
    draft.mine(steps.EnsureDir(paths.state_dir, "root", GROUP, 0o751))
    agent_unit = load_catalog().services["agent"].unit
    data_dirs: list[steps.EnsureDataDir] = []

    def data_dir(path: Path, user: str, mode: int, unit: str) -> None:
        data_dirs.append(steps.EnsureDataDir(path, user, user, mode, (unit,)))

    if where.local.postgres:  # 0750 with group access (initdb -g): the agent reads the WAL
        data_dir(paths.postgres_data, POSTGRES_USER, 0o750, layout.POSTGRES_UNIT)
    if where.local.redis:
        data_dir(paths.redis_data, REDIS_USER, 0o750, layout.REDIS_UNIT)
    if where.backups:  # 0755: archive_command runs as the PostgreSQL user and reads the markers
        agent = SERVICE_USERS["agent"]
        data_dir(paths.wal_spool, agent, 0o755, agent_unit)
        repo_dir = config.backup.location.directory
        if repo_dir is not None:  # ensured, never owned: uninstall keeps backups
            data_dir(paths.at(repo_dir), agent, 0o750, agent_unit)
    draft.add(*data_dirs)
    # 0751: Redis, not in the group, reaches its own two files (root:stellarbase-redis).
    draft.mine(steps.EnsureDir(paths.etc, "root", GROUP, 0o751))
    draft.mine(steps.EnsureDir(paths.service_settings_dir, "root", GROUP, 0o750))
    return data_dirs


def plan_release(draft: Draft, facts: Facts) -> None:
    """This release's binary under releases/, and `current` pointing at it."""
    paths = draft.paths
    draft.mine(steps.EnsureDir(paths.opt, "root", "root", 0o755))
    draft.mine(steps.EnsureDir(paths.releases, "root", "root", 0o755))
    binary = paths.release_binary(facts.version)
    draft.mine(steps.EnsureDir(binary.parent, "root", "root", 0o755))
    draft.mine(steps.CopyFile(binary, facts.binary, facts.binary_digest, "root", "root", 0o755))
    draft.mine(steps.Symlink(paths.current, f"releases/{facts.version}"))


def plan_config(
    draft: Draft, site_config: cfg.Config, config: cfg.Config, facts: Facts, where: Layout
) -> Inputs:
    """The site config, the secrets, each local server's and each service's own files.
    Returns them by the unit they are an input of."""
    paths, local = draft.paths, where.local
    site = render.render_site_config(site_config).encode()  # as given: local stays local
    secrets = render.render_secrets(config).encode()
    draft.mine(steps.WriteFile(paths.config_file, site, "root", GROUP, 0o640))
    # Root only: what install reads back. Each service gets its own secrets from a file
    # of its own in the credentials directory, which systemd reads as root.
    draft.mine(steps.WriteFile(paths.secrets_file, secrets, "root", "root", 0o600, secret=True))
    draft.mine(steps.EnsureDir(paths.credentials_dir, "root", "root", 0o700))
    per_unit: dict[str, bytes] = {}
    if local.postgres:
        admin = {ADMIN_PASSWORD: facts.secret(ADMIN_PASSWORD)}
        admin_env = envfile.render_env_file(admin, "Local PostgreSQL superuser; root only.")
        draft.mine(
            steps.WriteFile(
                paths.admin_secrets_file, admin_env.encode(), "root", "root", 0o600, True
            )
        )
        pw = facts.secret(ADMIN_PASSWORD)
        draft.add(steps.InitPostgres(local.postgres.path, paths.postgres_data, pw))
    if local.redis:
        redis_conf = render.render_redis_conf(config, paths).encode()
        redis_auth = render.render_redis_auth(facts.secret(REDIS_PASSWORD)).encode()
        draft.mine(steps.WriteFile(paths.redis_conf, redis_conf, "root", REDIS_USER, 0o640))
        draft.mine(steps.WriteFile(paths.redis_auth, redis_auth, "root", REDIS_USER, 0o640, True))
        per_unit[layout.REDIS_UNIT] = redis_conf + b"\0" + redis_auth
    settings: dict[str, bytes] = {}
    credentials: dict[str, bytes] = {}
    names: list[ServiceName] = [*load_catalog().services]
    if where.devices:
        names.append("inference")
    for name in names:
        if service_credentials(config, name):
            credentials[name] = render.render_credentials(config, name).encode()
            where_to = paths.credentials_file(name)
            draft.mine(steps.WriteFile(where_to, credentials[name], "root", "root", 0o600, True))
        settings[name] = render.render_service_settings(config, name).encode()
        settings_file = paths.service_settings_dir / f"{name}.json"
        draft.mine(steps.WriteFile(settings_file, settings[name], "root", GROUP, 0o640))
    if where.devices:
        draft.mine(steps.EnsureDir(paths.inference_env_dir, "root", GROUP, 0o750))
        for unit in where.inference:
            device = unit.name.split("@", 1)[1].removesuffix(".service")
            per_unit[unit.name] = render.render_inference_env(unit.port).encode()
            env_file = paths.inference_env_dir / f"{device}.env"
            draft.mine(steps.WriteFile(env_file, per_unit[unit.name], "root", GROUP, 0o640))
    return Inputs(facts.binary_digest, {}, settings, credentials, per_unit)


def plan_units(
    draft: Draft, config: cfg.Config, where: Layout
) -> tuple[dict[str, str], steps.WriteFile]:
    """Every unit file and the target's link. Returns the unit files, and the agent's
    targets file, which plan_start writes once the schema is current (owned from here)."""
    paths = draft.paths
    # Not an input of the agent's unit: the agent reads it again each round, so a new
    # worker or port does not restart it. Written only once the schema is current, just
    # before the services restart: a run that fails earlier never has the agent probe
    # ports nothing listens on yet.
    agent_targets = render.render_agent_targets(where).encode()
    targets = steps.WriteFile(targets_file(paths), agent_targets, "root", GROUP, 0o640)
    draft.owned.append(targets.path)
    unit_files = render.unit_files(config, paths, where)
    for unit_name, content in unit_files.items():
        draft.mine(
            steps.WriteFile(paths.unit_dir / unit_name, content.encode(), "root", "root", 0o644)
        )
    wants = paths.unit_dir / "multi-user.target.wants"
    draft.add(steps.EnsureDir(wants, "root", "root", 0o755))
    draft.mine(
        steps.Symlink(wants / layout.TARGET, paths.host_view(paths.unit_dir / layout.TARGET))
    )
    return unit_files, targets


def plan_cleanup(draft: Draft, config: cfg.Config, facts: Facts, where: Layout) -> None:
    """Units an earlier install started that this config no longer wants, stopped before
    their files go; then the paths it wrote that this config no longer wants."""
    paths = draft.paths
    owned_views = {paths.host_view(p) for p in draft.owned}
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
    wanted = where.wanted_units()
    gone = tuple(u for u in facts.previous_units if u not in wanted and u != layout.TARGET)
    if gone:
        draft.add(steps.StopUnits(gone))
    if stale:
        draft.add(steps.RemoveStale(tuple(stale)))


def plan_reload(
    draft: Draft, where: Layout, unit_files: dict[str, str], data_dirs: list[steps.EnsureDataDir]
) -> None:
    """Load the new units; then re-own what an older release's one user still owns, now
    that nothing starts a server as that user any more."""
    loaded = [u for u in unit_files if not u.endswith("@.service")]  # via instances
    draft.add(steps.DaemonReload(tuple(dict.fromkeys([*loaded, *where.wanted_units()]))))
    draft.add(*(replace(d, reown=True) for d in data_dirs))


def plan_local_servers(draft: Draft, where: Layout, inputs: Inputs) -> None:
    for unit in where.local.units():
        server = inputs.unit_files[unit].encode() + b"\0" + inputs.per_unit.get(unit, b"")
        draft.add(steps.StartUnit(unit, digest(server)))


def plan_database(draft: Draft, config: cfg.Config, facts: Facts, where: Layout) -> None:
    """The local database, role and archiving settings; then the schema."""
    timeout = config.health.timeout_seconds
    if where.local.postgres:
        port, admin = config.local.postgres.port, facts.secret(ADMIN_PASSWORD)
        draft.add(steps.EnsureDatabase(port, admin, facts.secret(POSTGRES_PASSWORD), timeout))
        archiving = archive_settings(config, draft.paths, where.backups)
        draft.add(steps.ConfigureArchiving(port, admin, archiving, layout.POSTGRES_UNIT, timeout))
    schema = database(config)
    if schema:
        draft.add(steps.Migrate(*schema, timeout))


def plan_start(draft: Draft, where: Layout, inputs: Inputs, targets: steps.WriteFile) -> None:
    """The agent's targets, then every unit in start order, the target last."""
    draft.add(targets)
    socket = inputs.of_files(layout.SUPERVISE_SOCKET, layout.SUPERVISE_TEMPLATE)
    draft.add(steps.StartUnit(layout.SUPERVISE_SOCKET, socket))
    ready = dict(where.ready_urls)
    for unit in where.services:
        ready_url = ready.get(unit.name, "")
        draft.add(steps.StartUnit(unit.name, inputs.of(unit), port=unit.port, ready_url=ready_url))
    if where.backups:
        # Its two files joined without a separator, as ever: a new digest restarts it.
        timer = inputs.of_files(layout.BACKUP_TIMER, layout.BACKUP_UNIT, sep=b"")
        draft.add(steps.StartUnit(layout.BACKUP_TIMER, timer))
    # Restarting the target would restart every service (PartOf=): only ever start it.
    draft.add(steps.StartUnit(layout.TARGET, "", restart_on_change=False))


def plan_health(draft: Draft, config: cfg.Config, where: Layout) -> None:
    """The health gate over every unit but the timer; then, with backups newly on, the
    first base backup (after the gate: the agent must archive for a backup to complete)."""
    units = (*where.local.units(), layout.SUPERVISE_SOCKET, *(u.name for u in where.services))
    timeout = config.health.timeout_seconds
    draft.add(steps.WaitHealthy((*units, layout.TARGET), where.ready_urls, timeout))
    if where.backups:
        draft.add(steps.FirstBackup(layout.BACKUP_UNIT))


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
