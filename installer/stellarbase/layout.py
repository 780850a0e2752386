"""What runs where: the names of the units, the local servers and each unit instance, and
the `Layout` of one config on one host, computed once.

The planner computes the Layout and hands it to render; the executor and the commands name
units through this module only. How a unit's file reads is render's business.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from stellarbase import config as cfg
from stellarbase.agent import local_address
from stellarbase.localdeps import ServerBinary
from stellarbase.service_settings import load_catalog

TARGET = "stellarbase.target"
INFERENCE_TEMPLATE = "stellarbase-inference@.service"
DEFAULT_INFERENCE_COMMAND = "/opt/stellarbase/current/stellarbase run inference"
POSTGRES_UNIT = "stellarbase-postgres.service"
REDIS_UNIT = "stellarbase-redis.service"
BACKUP_UNIT = "stellarbase-backup.service"
BACKUP_TIMER = "stellarbase-backup.timer"
SUPERVISE_SOCKET = "stellarbase-supervise.socket"
SUPERVISE_TEMPLATE = "stellarbase-supervise@.service"

# Passwords of the local servers that install generates, by their secrets.env name.
POSTGRES_PASSWORD = cfg.secret_env_name("postgres", "password")
REDIS_PASSWORD = cfg.secret_env_name("redis", "password")


@dataclass(frozen=True)
class LocalServers:
    """The host's server binaries for the dependencies that run locally (None: external)."""

    postgres: ServerBinary | None = None
    redis: ServerBinary | None = None

    def units(self) -> list[str]:
        return [u for u, b in ((POSTGRES_UNIT, self.postgres), (REDIS_UNIT, self.redis)) if b]


@dataclass(frozen=True)
class UnitInstance:
    """A unit the installer runs: `template` is the file on disk (worker@.service)."""

    name: str
    template: str
    service: str
    port: int


@dataclass(frozen=True)
class Layout:
    """Every unit of one config on one host, with its port, base URL and readiness URL."""

    local: LocalServers
    devices: tuple[str, ...]  # CUDA_VISIBLE_DEVICES ids, one inference unit each
    services: tuple[UnitInstance, ...]  # workers, API, agent, inference: in start order
    probed: frozenset[str]  # the services known to serve /readyz
    endpoints: tuple[tuple[str, str], ...]  # (unit, base URL) of every service
    backups: bool  # WAL archiving and base backups run next to the local PostgreSQL

    @property
    def ready_urls(self) -> tuple[tuple[str, str], ...]:
        return tuple((unit, f"{url}/readyz") for unit, url in self.endpoints if unit in self.probed)

    @property
    def inference(self) -> tuple[UnitInstance, ...]:
        return tuple(u for u in self.services if u.service == "inference")

    def wanted_units(self) -> tuple[str, ...]:
        """What the target wants: the local servers, the supervise socket, every service
        and, with backups on, their timer."""
        timer = (BACKUP_TIMER,) if self.backups else ()
        return (*self.local.units(), SUPERVISE_SOCKET, *(u.name for u in self.services), *timer)


def compute(config: cfg.Config, local: LocalServers, devices: tuple[str, ...] = ()) -> Layout:
    services = (*unit_instances(config), *inference_instances(config, devices))
    # Only the built-in inference server is known to serve /readyz; another command is
    # healthy once its unit is active.
    builtin = config.inference.command == DEFAULT_INFERENCE_COMMAND
    probed = frozenset(u.name for u in services if u.service != "inference" or builtin)
    agent_bind = local_address(config.bind)
    endpoints = tuple(
        (u.name, base_url(agent_bind if u.service == "agent" else config.bind, u.port))
        for u in services
    )
    backups = config.backup.enabled and local.postgres is not None
    return Layout(local, devices, services, probed, endpoints, backups)


def unit_instances(config: cfg.Config) -> list[UnitInstance]:
    """Every service unit to run, in start order. An upgrade restarts them in this order,
    each ready before the next: the workers one at a time, then the API, then the agent,
    whose readiness sums up all the others."""
    catalog = load_catalog().services
    template = catalog["worker"].unit
    out = [
        UnitInstance(template.replace("@", f"@{n}"), template, "worker", port)
        for n, port in enumerate(config.worker_ports(), start=1)
    ]
    out.append(UnitInstance(catalog["api"].unit, catalog["api"].unit, "api", config.api.port))
    out.append(
        UnitInstance(catalog["agent"].unit, catalog["agent"].unit, "agent", config.agent.port)
    )
    return out


def inference_instances(config: cfg.Config, devices: tuple[str, ...]) -> list[UnitInstance]:
    """One inference unit per GPU or MIG instance; ports count up from inference.port."""
    return [
        UnitInstance(
            INFERENCE_TEMPLATE.replace("@", f"@{device}"),
            INFERENCE_TEMPLATE,
            "inference",
            config.inference.port + n,
        )
        for n, device in enumerate(devices)
    ]


def base_url(bind: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    if bind.is_unspecified:
        bind = ipaddress.ip_address("::1" if bind.version == 6 else "127.0.0.1")
    host = f"[{bind}]" if bind.version == 6 else str(bind)
    return f"http://{host}:{port}"
