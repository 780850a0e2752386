"""Pure rendering of unit files and config files from the validated config and its Layout.
The planner is its one caller in the package (tests call render_units, which makes one)."""

from __future__ import annotations

import json

import jinja2
import yaml

from stellarbase import config as cfg
from stellarbase import envfile, layout, resources
from stellarbase.agent import SUPERVISE_SOCKET as SUPERVISE_SOCKET_PATH
from stellarbase.agent.targets import Target, Targets, render_targets, targets_file
from stellarbase.layout import (
    BACKUP_TIMER,
    BACKUP_UNIT,
    INFERENCE_TEMPLATE,
    POSTGRES_UNIT,
    REDIS_UNIT,
    SUPERVISE_SOCKET,
    SUPERVISE_TEMPLATE,
    TARGET,
    Layout,
    LocalServers,
)
from stellarbase.paths import (
    AGENT_USER,
    GROUP,
    POSTGRES_USER,
    REDIS_USER,
    SERVICE_USERS,
    HostPaths,
)
from stellarbase.service_settings import (
    ServiceName,
    load_catalog,
    service_credentials,
    service_settings,
)

# The agent reads host CPU, memory and load from /proc (ProcSubset=pid hides them) and, on
# a GPU host, asks NVML, which needs the NVIDIA devices.
AGENT_EXTRA = ("ProcSubset=all",)
AGENT_GPU_EXTRA = (
    "PrivateDevices=no",
    "DeviceAllow=char-nvidia r",
    "DeviceAllow=char-nvidia-frontend r",
    "DeviceAllow=char-nvidia-caps r",
)


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(resources.units_dir()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_inference_env(port: int) -> str:
    return f'# The port of this inference unit; its command may use ${{PORT}}.\nPORT="{port}"\n'


def render_units(
    config: cfg.Config, paths: HostPaths, local: LocalServers, devices: tuple[str, ...] = ()
) -> dict[str, str]:
    """Unit file name → content, for a caller without a Layout of its own."""
    return unit_files(config, paths, layout.compute(config, local, devices))


def unit_files(config: cfg.Config, paths: HostPaths, where: Layout) -> dict[str, str]:
    """Unit file name → content, for the target, the local servers and every service."""
    local, devices = where.local, where.devices
    env = environment()
    out: dict[str, str] = {}
    if devices:
        out[INFERENCE_TEMPLATE] = env.get_template(f"{INFERENCE_TEMPLATE}.j2").render(
            env_dir=paths.host_view(paths.inference_env_dir),
            command=config.inference.command,
            limits=config.inference.limits,
            user=SERVICE_USERS["inference"],
            groups=supplementary_groups("inference"),
            local_units=local.units(),
        )
    if local.postgres:
        out[POSTGRES_UNIT] = env.get_template(f"{POSTGRES_UNIT}.j2").render(
            version=local.postgres.version_text,
            bindir=local.postgres.path,
            data_dir=paths.host_view(paths.postgres_data),
            port=config.local.postgres.port,
            user=POSTGRES_USER,
        )
    if local.redis:
        out[REDIS_UNIT] = env.get_template(f"{REDIS_UNIT}.j2").render(
            version=local.redis.version_text,
            binary=local.redis.path,
            config_file=paths.host_view(paths.redis_conf),
            data_dir=paths.host_view(paths.redis_data),
            port=config.local.redis.port,
            user=REDIS_USER,
        )
    catalog = load_catalog().services
    binary = str(paths.host_view(paths.current / "stellarbase"))
    for name, entry in catalog.items():
        settings = paths.host_view(paths.service_settings_dir / f"{name}.json")
        command = f"{name} --settings {settings}"
        if entry.instanced:
            command = f"{name} --instance %i --settings {settings}"
        extra = [*AGENT_EXTRA, *(AGENT_GPU_EXTRA if devices else ())] if name == "agent" else []
        svc = {
            "description": entry.description,
            "command": command,
            "limits": getattr(config, name).limits,
            "rw_paths": backup_paths(config, paths) if name == "agent" else [],
            "extra": extra,
            "ports": own_ports(config, name),
        }
        out[entry.unit] = env.get_template(f"{entry.unit}.j2").render(
            svc=svc,
            binary=binary,
            credentials_file=paths.host_view(paths.credentials_file(name))
            if service_credentials(config, name)
            else "",
            user=SERVICE_USERS[name],
            groups=supplementary_groups(name),
            watchdog_seconds=config.health.watchdog_seconds,
            local_units=local.units(),
        )
    out[SUPERVISE_SOCKET] = env.get_template(f"{SUPERVISE_SOCKET}.j2").render(
        socket=SUPERVISE_SOCKET_PATH, group=AGENT_USER
    )
    out[SUPERVISE_TEMPLATE] = env.get_template(f"{SUPERVISE_TEMPLATE}.j2").render(
        binary=binary, targets_file=paths.host_view(targets_file(paths))
    )
    if where.backups:
        out[BACKUP_UNIT] = env.get_template(f"{BACKUP_UNIT}.j2").render(
            binary=binary,
            postgres_unit=POSTGRES_UNIT,
            rw_paths=[paths.host_view(paths.state_dir), *repository_dirs(config)],
            group=GROUP,
            file_repository=config.backup.location.directory is not None,
        )
        out[BACKUP_TIMER] = env.get_template(f"{BACKUP_TIMER}.j2").render(
            schedule=config.backup.schedule
        )
    out[TARGET] = env.get_template(f"{TARGET}.j2").render(wants=where.wanted_units())
    return out


def render_agent_targets(where: Layout) -> str:
    """What the agent watches: every unit of the target; the probed ones serve /healthz."""
    units = [Target(unit=u) for u in where.local.units()]
    units.append(Target(unit=SUPERVISE_SOCKET))
    for u in where.services:
        units.append(Target(unit=u.name, port=u.port, probe=u.name in where.probed))
    if where.backups:
        units.append(Target(unit=BACKUP_TIMER))
    return render_targets(Targets(units=tuple(units)))


def own_ports(config: cfg.Config, name: str) -> list[str]:
    """The TCP ports a service may bind (SocketBindAllow=). Workers: the range any worker
    count could use, so that adding a worker leaves the running ones' unit unchanged."""
    if name == "worker":
        return [f"{config.worker.port}-{min(config.worker.port + 63, 65535)}"]
    ports = [str(getattr(config, name).port)]
    if name == "agent" and config.agent.remote_port is not None:
        ports.append(str(config.agent.remote_port))
    return ports


def backup_paths(config: cfg.Config, paths: HostPaths) -> list[str]:
    """What the agent writes when backups are on: the WAL spool, and a file repository."""
    if not config.backup.enabled:
        return []
    return [paths.host_view(paths.wal_spool), *repository_dirs(config)]


def repository_dirs(config: cfg.Config) -> list[str]:
    """The file:// repository's directory, or nothing (s3, or backups off)."""
    where = config.backup.location.directory
    return [where] if where is not None else []


def render_redis_conf(config: cfg.Config, paths: HostPaths) -> str:
    return (
        environment()
        .get_template("redis.conf.j2")
        .render(
            port=config.local.redis.port,
            data_dir=paths.host_view(paths.redis_data),
            auth_file=paths.host_view(paths.redis_auth),
        )
    )


def render_redis_auth(password: str) -> str:
    # Redis config strings take double quotes with backslash escapes, like env files.
    return f"requirepass {envfile.quote(password)}\n"


def supplementary_groups(name: ServiceName) -> list[str]:
    """Groups of a service's user besides its own: the site config's readers, and for the
    agent, which reads the WAL it archives, the local PostgreSQL's group."""
    return [GROUP, POSTGRES_USER] if name == "agent" else [GROUP]


def render_sysusers(paths: HostPaths) -> str:
    names: list[ServiceName] = ["api", "worker", "agent", "inference"]
    return (
        environment()
        .get_template("sysusers.conf.j2")
        .render(
            group=GROUP,
            servers=[
                (POSTGRES_USER, "StellarBase local PostgreSQL", paths.postgres_data),
                (REDIS_USER, "StellarBase local Redis", paths.redis_data),
            ],
            services=[
                (SERVICE_USERS[n], f"StellarBase {n}", supplementary_groups(n)) for n in names
            ],
            home=paths.host_view(paths.state_dir),
            host_view=paths.host_view,
        )
    )


def render_site_config(config: cfg.Config) -> str:
    header = "# Resolved by `stellarbase install`; secrets live in secrets.env.\n"
    return header + yaml.safe_dump(cfg.public_dict(config), sort_keys=False)


def render_secrets(config: cfg.Config) -> str:
    return envfile.render_env_file(
        cfg.secrets_env(config),
        "Every credential of the site, root only; each unit loads its own from "
        "credentials/<service>.env. Never copy into unit files.",
    )


def render_credentials(config: cfg.Config, name: ServiceName) -> str:
    """The env file of one service's own secrets."""
    return envfile.render_env_file(
        service_credentials(config, name),
        f"The secrets of stellarbase-{name} and no other's; root only, loaded by systemd.",
    )


def render_service_settings(config: cfg.Config, name: ServiceName) -> str:
    settings = service_settings(config, name)
    return json.dumps(settings.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
