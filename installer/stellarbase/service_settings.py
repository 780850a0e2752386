"""The service catalog and each service's own settings (services/<name>.json).

Each service gets only what it needs, so a change elsewhere in the site config does not
restart it; its secrets reach it as systemd credentials (`service_credentials`), never
through this file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, SecretStr

from stellarbase import resources
from stellarbase.config import (
    SECRET_KEYS,
    BackupConfig,
    Config,
    Model,
    Port,
    PostgresConfig,
    RedisConfig,
    S3Config,
    secret_env_name,
    secrets_env,
)

Dependency = Literal["postgres", "redis", "s3"]
ServiceName = Literal["api", "worker", "agent", "inference"]
CatalogName = Literal["api", "worker", "agent"]


class CatalogEntry(Model):
    description: str
    unit: str
    instanced: bool = False
    deps: tuple[Dependency, ...] = ()


class Catalog(Model):
    services: dict[CatalogName, CatalogEntry]


def load_catalog() -> Catalog:
    import yaml  # here: a running service reads JSON settings only

    data = yaml.safe_load((resources.config_dir() / "catalog.yaml").read_text())
    return Catalog.model_validate(data)


class AgentSettings(Model):
    """The agent's own knobs; the units it watches come from a file of their own (targets)."""

    interval_seconds: float
    restart_after_failures: int
    restart_backoff_seconds: float
    restart_backoff_max_seconds: float
    backup_schedule: str | None = None  # OnCalendar= of base backups, when they are on
    # The remote listener; its token is one of the agent's credentials.
    remote_port: Port | None = None
    remote_bind: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


class ServiceSettings(Model):
    """What one service reads at start (services/<name>.json); secrets come as credentials.

    Each service gets only its own settings so that a change elsewhere in the site config
    does not restart it.
    """

    service: ServiceName
    bind: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: Port
    log_level: Literal["debug", "info", "warning", "error"]
    check_timeout_seconds: float
    postgres: PostgresConfig | None = None
    redis: RedisConfig | None = None
    s3: S3Config | None = None
    backup: BackupConfig | None = None  # the agent's, when backups are on
    agent: AgentSettings | None = None

    def port_of(self, instance: int | None) -> int:
        return self.port + (instance - 1 if instance else 0)

    def with_secrets(self, env: Mapping[str, str]) -> ServiceSettings:
        update: dict[str, Any] = {}
        for section, key in SECRET_KEYS:
            if section == "agent" or section not in type(self).model_fields:
                continue  # the agent's token is read from the environment where it is used
            dep = update.get(section, getattr(self, section))
            value = env.get(secret_env_name(section, key))
            if dep is not None and value is not None:
                update[section] = dep.model_copy(update={key: SecretStr(value)})
        return self.model_copy(update=update)


def service_settings(config: Config, name: ServiceName) -> ServiceSettings:
    # Inference servers need a GPU, not the dependencies; their port comes from $PORT.
    deps_of = () if name == "inference" else load_catalog().services[name].deps
    svc = getattr(config, name)
    deps = {dep: _strip_secrets(getattr(config, dep)) for dep in deps_of}
    return ServiceSettings(
        service=name,
        bind=config.bind,
        port=svc.port,
        log_level=config.log_level,
        check_timeout_seconds=config.health.check_timeout_seconds,
        backup=_strip_secrets(config.backup) if name == "agent" and config.backup.enabled else None,
        agent=_agent_settings(config) if name == "agent" else None,
        **deps,
    )


def service_credentials(config: Config, name: ServiceName) -> dict[str, str]:
    """The secrets one service is given (variable name → value), and no other.

    A service gets the credentials of the dependencies its /readyz checks. The agent also
    archives WAL, so it holds the backup encryption key, and its metrics token when the
    token listener is on. Inference gets none: its command is the site's own.
    """
    if name == "inference":
        return {}
    sections: set[str] = set(load_catalog().services[name].deps)
    if name == "agent":
        sections |= {"backup", "agent"} if config.backup.enabled else {"agent"}
        if config.agent.remote_port is None:
            sections.discard("agent")
    wanted = {secret_env_name(s, k) for s, k in SECRET_KEYS if s in sections}
    return {k: v for k, v in secrets_env(config).items() if k in wanted}


def _agent_settings(config: Config) -> AgentSettings:
    agent = config.agent
    return AgentSettings(
        interval_seconds=agent.interval_seconds,
        restart_after_failures=agent.restart_after_failures,
        restart_backoff_seconds=agent.restart_backoff_seconds,
        restart_backoff_max_seconds=agent.restart_backoff_max_seconds,
        backup_schedule=config.backup.schedule if config.backup.enabled else None,
        remote_port=agent.remote_port,
        remote_bind=agent.remote_bind if agent.remote_port is not None else None,
        tls_cert=agent.tls_cert,
        tls_key=agent.tls_key,
    )


def _strip_secrets(dep: BaseModel | None) -> Any:
    if dep is None:
        return None
    keys = [key for section, key in SECRET_KEYS if key in type(dep).model_fields]
    return dep.model_copy(update=dict.fromkeys(keys))
