"""The site configuration's model: sections, defaults, checks and the names of its secrets.

`configload` builds it from tier defaults ⊕ site file ⊕ --set ⊕ STELLARBASE_* env.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from stellarbase import values
from stellarbase.errors import ExitCode, StellarError

ENV_PREFIX = "STELLARBASE_"
# STELLARBASE_* variables that steer the program rather than configure the site.
NON_CONFIG_ENV = frozenset(
    {
        "STELLARBASE_DEBUG",
        "STELLARBASE_STOP_AFTER_STEP",
        "STELLARBASE_MIGRATIONS_DIR",
        "STELLARBASE_FAKE_NVML",
        "STELLARBASE_RELEASE_PUBKEY",
        "STELLARBASE_SIGNING_KEY",
        "STELLARBASE_REBUILD",  # the test suite: rebuild dist/stellarbase first
        "STELLARBASE_TEST_ROOTS",  # the test suite: where cached distribution roots live
        "STELLARBASE_SRC",  # Vagrant provisioning: the checkout inside the VM
    }
)

Port = Annotated[int, Field(ge=1, le=65535)]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Tier(enum.StrEnum):
    PILOT = "pilot"
    DEPARTMENT = "department"
    ENTERPRISE = "enterprise"


class Limits(Model):
    """systemd resource limits of one service."""

    memory_max: Annotated[str, Field(pattern=r"^(\d+[KMGTP]?|\d+%|infinity)$")] = Field(
        description="MemoryMax=, e.g. 512M, 2G, 50% (of the host's memory) or infinity"
    )
    cpu_quota: Annotated[str, Field(pattern=r"^\d+%$")] = Field(
        description="CPUQuota=, e.g. 50% or 200% (two CPUs)"
    )
    tasks_max: Annotated[int, Field(ge=16, le=1_000_000)] = Field(description="TasksMax=")

    _check_memory = field_validator("memory_max")(values.check_memory_max)
    _check_quota = field_validator("cpu_quota")(values.check_cpu_quota)


class ServiceConfig(Model):
    port: Port = Field(description="TCP port of the service's /healthz, /readyz and /metrics")
    limits: Limits


class WorkerConfig(ServiceConfig):
    port: Port = Field(description="port of worker instance 1; instance N listens on port+N-1")
    instances: Annotated[int, Field(ge=1, le=64)] = Field(description="stellarbase-worker@N units")


class AgentConfig(ServiceConfig):
    interval_seconds: Annotated[float, Field(ge=1, le=300)] = Field(
        5, description="how often the agent collects unit, service, dependency and host state"
    )
    restart_after_failures: Annotated[int, Field(ge=1, le=100)] = Field(
        3, description="failed /healthz probes in a row before the agent restarts a service"
    )
    restart_backoff_seconds: Annotated[float, Field(ge=0, le=3600)] = Field(
        10, description="least time between two restarts of one unit; doubles each time"
    )
    restart_backoff_max_seconds: Annotated[float, Field(ge=0, le=86400)] = Field(
        600, description="cap of that doubling; a unit healthy this long starts over"
    )
    remote_port: Port | None = Field(
        None,
        description="a second listener for remote scrapers: /metrics and /readyz behind "
        "agent.metrics_token, over TLS with agent.tls_cert/tls_key; none: loopback only",
    )
    remote_bind: ipaddress.IPv4Address | ipaddress.IPv6Address = Field(
        ipaddress.IPv4Address("0.0.0.0"), description="address of that listener"
    )
    metrics_token: SecretStr | None = Field(
        None, description="bearer token remote scrapers send; kept in secrets.env"
    )
    tls_cert: values.Text | None = Field(
        None, description="PEM certificate (chain) of that listener"
    )
    tls_key: values.Text | None = Field(
        None, description="PEM private key, readable by the stellarbase-agent user"
    )

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _check_tls_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"{value!r} is not an absolute path")
        return value

    @model_validator(mode="after")
    def _check_remote(self) -> AgentConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both agent.tls_cert and agent.tls_key, or neither")
        if self.remote_port is not None and self.metrics_token is None:
            raise ValueError(
                "agent.remote_port needs agent.metrics_token: export "
                "STELLARBASE_AGENT__METRICS_TOKEN (e.g. `openssl rand -hex 32`)"
            )
        return self


class PostgresConfig(Model):
    url: values.Text = Field(description="postgresql://USER@HOST:PORT/DB (no password here)")
    password: SecretStr | None = Field(None, description="kept in secrets.env only")

    _check_url = field_validator("url")(values.check_postgres_url)


class RedisConfig(Model):
    url: values.Text = Field(
        description="redis://HOST:PORT/DB or rediss:// for TLS (no password here)"
    )
    password: SecretStr | None = Field(None, description="kept in secrets.env only")

    _check_url = field_validator("url")(values.check_redis_url)


class S3Config(Model):
    endpoint: values.Text | None = Field(None, description="S3 endpoint URL; empty for AWS")
    bucket: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]
    region: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,32}$")] = "us-east-1"
    addressing: Literal["path", "virtual"] = "path"
    # boto3 >= 1.36 sends checksums some S3-compatible stores reject; keep it switchable.
    checksums: Literal["when_supported", "when_required"] = "when_required"
    access_key: SecretStr | None = Field(None, description="kept in secrets.env only")
    secret_key: SecretStr | None = Field(None, description="kept in secrets.env only")
    create_bucket: bool = Field(False, description="preflight may create a missing bucket")

    @model_validator(mode="after")
    def _check_endpoint(self) -> S3Config:
        if self.endpoint:
            values.check_url(self.endpoint, ("http", "https"), "https://s3.example.com")
        return self


class HealthConfig(Model):
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        description="how long install waits for every unit active and every /readyz 200"
    )
    watchdog_seconds: Annotated[int, Field(ge=2, le=3600)] = Field(description="WatchdogSec=")
    check_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = Field(
        description="timeout of one dependency check (connect, ping, head-bucket)"
    )


class Requirements(Model):
    """What preflight demands of the host and the dependencies, by tier."""

    min_cpus: Annotated[int, Field(ge=1)]
    min_memory_gib: Annotated[float, Field(ge=0)]
    min_disk_gib: Annotated[float, Field(ge=0)] = Field(description="free, at the data dir")
    min_gpus: Annotated[int, Field(ge=0)] = 0
    min_gpu_memory_gib: Annotated[float, Field(ge=0)] = 0
    min_driver: str = Field("535", pattern=r"^\d+(\.\d+)*$", description="NVIDIA driver")
    tls: bool = Field(False, description="PostgreSQL, Redis and S3 only over TLS")
    s3_versioning: bool = False
    redis_persistence: bool = False
    pool_size: Annotated[int, Field(ge=1)] = Field(
        description="PostgreSQL connections each api/worker instance may open"
    )
    connection_headroom: Annotated[int, Field(ge=0)] = Field(
        description="connections kept free for admins, migrations, backups"
    )


class InferenceConfig(Model):
    gpus: Literal["all"] | Annotated[int, Field(ge=0)] | list[str] = Field(
        description="all, a count, or a list of GPU/MIG UUIDs to serve"
    )
    mig: Literal["whole", "slices"] = Field(
        description="a GPU in MIG mode: one unit for the whole GPU, or one per MIG instance"
    )
    command: values.Text = Field(description="inference server command; gets CUDA_VISIBLE_DEVICES")
    port: Port = Field(description="port of the first inference unit; the next get +1, +2…")
    limits: Limits

    _check_command = field_validator("command")(values.check_command)


class BackupConfig(Model):
    repository: values.Text = Field(
        "none",
        description="none, s3 (the s3 section's bucket) or file:///path (pilot only)",
    )
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")] = Field(
        "postgres", description="key prefix of the repository in the bucket or directory"
    )
    archive_timeout_seconds: Annotated[int, Field(ge=10, le=3600)] = Field(
        60, description="archive_timeout: a partly filled WAL segment is archived after this"
    )
    schedule: values.Text = Field("daily", description="OnCalendar= of stellarbase-backup.timer")
    retention_full: Annotated[int, Field(ge=1)] | None = Field(
        2, description="backup expire keeps this many full backups (none: by days only)"
    )
    retention_days: Annotated[int, Field(ge=1)] | None = Field(
        None, description="backup expire keeps backups younger than this many days"
    )
    compression_level: Annotated[int, Field(ge=1, le=19)] = Field(3, description="zstd level")
    upload_concurrency: Annotated[int, Field(ge=1, le=32)] = Field(
        4, description="WAL files the agent uploads at once"
    )
    encryption_key: SecretStr | None = Field(
        None,
        description="base64 of 32 random bytes: client-side AES-256-GCM; kept in secrets.env",
    )

    _location: values.RepositoryLocation = PrivateAttr()

    @property
    def location(self) -> values.RepositoryLocation:
        """`repository` as a type: test its kind, take its directory; never parse the text."""
        return self._location

    @property
    def enabled(self) -> bool:
        return self._location.enabled

    _check_repository = field_validator("repository")(values.check_repository)

    @model_validator(mode="after")
    def _parse_repository(self) -> BackupConfig:
        self._location = values.RepositoryLocation.parse(self.repository)  # checked: cannot fail
        return self

    _check_schedule = field_validator("schedule")(values.check_schedule)

    @model_validator(mode="after")
    def _check_retention(self) -> BackupConfig:
        if self.retention_full is None and self.retention_days is None:
            raise ValueError("set backup.retention_full or backup.retention_days (or both)")
        if self.encryption_key is not None:
            import base64
            import binascii

            try:
                key = base64.b64decode(self.encryption_key.get_secret_value(), validate=True)
            except binascii.Error:
                key = b""
            if len(key) != 32:
                raise ValueError(
                    "backup.encryption_key must be base64 of 32 bytes: "
                    "`head -c32 /dev/urandom | base64`"
                )
        return self


class DependencyMode(enum.StrEnum):
    LOCAL = "local"  # the installer runs it on this host from the distribution's packages
    EXTERNAL = "external"  # a managed or self-run server given by URL


class DependenciesConfig(Model):
    mode: DependencyMode = Field(description="local or external, for PostgreSQL and Redis")
    postgres: DependencyMode | None = Field(None, description="overrides mode for PostgreSQL")
    redis: DependencyMode | None = Field(None, description="overrides mode for Redis")


class LocalServer(Model):
    port: Port = Field(description="loopback port of the local server")


class LocalConfig(Model):
    """The servers the installer runs itself when a dependency is local."""

    postgres: LocalServer
    redis: LocalServer


class Config(Model):
    """The validated site configuration."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="StellarBase site configuration")

    tier: Tier
    bind: ipaddress.IPv4Address | ipaddress.IPv6Address = Field(
        description="address the services listen on"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    api: ServiceConfig
    worker: WorkerConfig
    agent: AgentConfig
    health: HealthConfig
    dependencies: DependenciesConfig
    local: LocalConfig
    requirements: Requirements
    inference: InferenceConfig
    postgres: PostgresConfig | None = None
    redis: RedisConfig | None = None
    s3: S3Config | None = None
    backup: BackupConfig

    @model_validator(mode="after")
    def _check_ports_and_secrets(self) -> Config:
        taken: dict[int, str] = {}
        for key, port in self.fixed_ports():
            if port in taken:
                raise ValueError(f"{key} and {taken[port]} are the same port")
            taken[port] = key
        for n in range(self.worker.instances):
            other = taken.get(self.worker.port + n)
            if other:
                raise ValueError(
                    f"worker.port..worker.port+{self.worker.instances - 1} overlaps {other}"
                )
        if self.worker.port + self.worker.instances - 1 > 65535:
            raise ValueError("worker.port + worker.instances - 1 exceeds 65535")
        taken.update({port: "worker.port" for port in self.worker_ports()})
        if self.inference.port in taken:
            raise ValueError(
                f"inference.port {self.inference.port} is the port of {taken[self.inference.port]}"
            )
        for dep in ("postgres", "redis"):
            if self.mode_of(dep) == DependencyMode.LOCAL and getattr(self, dep) is not None:
                raise ValueError(
                    f"{dep} is configured by URL but dependencies make it local: "
                    f"set dependencies.{dep}=external to use that server"
                )
        if self.backup.enabled and self.mode_of("postgres") != DependencyMode.LOCAL:
            raise ValueError(
                "backups archive the WAL of the local PostgreSQL: with an external server, "
                "set backup.repository=none and back it up where it runs"
            )
        if self.backup.location.kind == values.RepositoryKind.S3 and self.s3 is None:
            raise ValueError("backup.repository is s3 but there is no s3 section: configure s3")
        if self.backup.location.directory is not None and self.tier != Tier.PILOT:
            raise ValueError(
                "a file:// backup repository is for the pilot tier only: use s3 (object storage)"
            )
        return self

    def mode_of(self, dep: Literal["postgres", "redis"]) -> DependencyMode:
        return getattr(self.dependencies, dep) or self.dependencies.mode

    def fixed_ports(self) -> list[tuple[str, int]]:
        """Every single port this config listens on (workers' range aside)."""
        ports = [("api.port", self.api.port), ("agent.port", self.agent.port)]
        if self.agent.remote_port is not None:
            ports.append(("agent.remote_port", self.agent.remote_port))
        for dep in ("postgres", "redis"):
            if self.mode_of(dep) == DependencyMode.LOCAL:
                ports.append((f"local.{dep}.port", getattr(self.local, dep).port))
        return ports

    def worker_ports(self) -> list[int]:
        return [self.worker.port + n for n in range(self.worker.instances)]


# --- secrets: names in secrets.env --------------------------------------------------------

SECRET_KEYS: tuple[tuple[str, str], ...] = (
    ("postgres", "password"),
    ("redis", "password"),
    ("s3", "access_key"),
    ("s3", "secret_key"),
    ("backup", "encryption_key"),
    ("agent", "metrics_token"),
)


def secret_env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def require_secrets(config: Config, sources: Mapping[str, str]) -> None:
    """Every configured dependency must come with its credentials, each on one line."""
    for section, key in SECRET_KEYS:
        dep = getattr(config, section)
        value = getattr(dep, key) if dep is not None else None
        found = values.control_character(value.get_secret_value()) if value is not None else None
        if found:
            raise StellarError(
                f"{sources.get(section, 'the configuration')}: {section}.{key} has a control "
                f"character ({found})",
                hint="secrets are written to an EnvironmentFile: use one line of printable "
                "characters",
                code=ExitCode.CONFIG,
            )
        if dep is None or value is not None or section in ("backup", "agent"):
            continue  # the backup encryption key and the metrics token are optional
        if section == "s3" and dep.endpoint is None:
            continue  # AWS can use the instance role
        where = sources.get(section, "the configuration")
        raise StellarError(
            f"{where}: {section}.{key} is missing: {section} is configured without credentials",
            hint=f"set {section}.{key} in the site file or export {secret_env_name(section, key)}",
            code=ExitCode.CONFIG,
        )


def secrets_env(config: Config) -> dict[str, str]:
    out: dict[str, str] = {}
    for section, key in SECRET_KEYS:
        dep = getattr(config, section)
        value = getattr(dep, key) if dep is not None else None
        if value is not None:
            out[secret_env_name(section, key)] = value.get_secret_value()
    return out


def public_dict(config: Config) -> dict[str, Any]:
    """The config without secrets, as written to stellarbase.yaml and shown by `config show`."""
    data = config.model_dump(mode="json")
    for section, key in SECRET_KEYS:
        if isinstance(data.get(section), dict):
            data[section].pop(key, None)
    return data


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    # The tier file fills every required key; a site file may set any subset.
    schema.pop("required", None)
    for definition in schema.get("$defs", {}).values():
        definition.pop("required", None)
    return schema
