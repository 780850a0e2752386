"""Configuration: tier defaults ⊕ site file ⊕ --set ⊕ STELLARBASE_* env → one frozen model.

Every leaf value remembers which layer gave it, so an error names the file (or flag, or
variable), the key and a fix.
"""

from __future__ import annotations

import difflib
import enum
import functools
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from stellarbase import redact, resources, values
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
        None, description="PEM private key, readable by the stellarbase user"
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

    @property
    def enabled(self) -> bool:
        return self.repository != "none"

    _check_repository = field_validator("repository")(values.check_file_repository)
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
        if self.backup.repository == "s3" and self.s3 is None:
            raise ValueError("backup.repository is s3 but there is no s3 section: configure s3")
        if self.backup.repository.startswith("file://") and self.tier != Tier.PILOT:
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


# --- loading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One source of settings: a name for messages and a nested mapping."""

    name: str
    data: dict[str, Any]


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    sources: dict[str, str]  # dotted key (and each prefix) → the layer that set it last
    site_file: Path | None


def tier_defaults(tier: str) -> dict[str, Any]:
    # yaml is imported where it is used: a running service reads JSON settings only.
    import yaml

    path = resources.config_dir() / "tiers" / f"{tier}.yaml"
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def read_site_file(path: Path) -> Layer:
    import yaml

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StellarError(
            f"{path}: no such file", hint="pass an existing file to --config", code=ExitCode.CONFIG
        ) from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
        raise StellarError(
            f"{path}: cannot read the config file ({exc.__class__.__name__})",
            hint="check the path and its permissions (it must be a readable YAML file)",
            code=ExitCode.CONFIG,
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise StellarError(
            f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})",
            hint="fix the YAML syntax; `stellarbase config schema` shows the expected shape",
            code=ExitCode.CONFIG,
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise StellarError(
            f"{path}: the top level must be a mapping of keys, not {type(data).__name__}",
            hint="see config/site.example.yaml",
            code=ExitCode.CONFIG,
        )
    return Layer(str(path), data)


def parse_sets(items: list[str]) -> Layer:
    """--set KEY=VALUE layers. Secrets are refused: argv is readable by every local user
    (ps, /proc/PID/cmdline) and an upgrade would hand it on to the release's binary."""
    data: dict[str, Any] = {}
    for number, item in enumerate(items, start=1):
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*", key):
            # Never echo the argument: its value part may be a secret.
            raise StellarError(
                f"--set (argument {number} of --set): expected KEY=VALUE with a dotted "
                "lower-case key",
                hint="for example --set worker.instances=3",
                code=ExitCode.CONFIG,
            )
        _refuse_control(raw, f"--set {key}")
        value = _scalar(raw)
        one: dict[str, Any] = {}
        _put(one, key.split("."), value)
        for path in secret_paths():
            if _holds(one, path):  # also --set 'postgres={password: ...}'
                raise secret_on_command_line(".".join(path))
        _put(data, key.split("."), value)
    return Layer("--set", data)


def secret_on_command_line(dotted: str) -> StellarError:
    section, _, key = dotted.partition(".")
    return StellarError(
        f"--set {dotted}: secrets are not taken on the command line (every local user can "
        "read a command line)",
        hint=f"put {dotted} in the site file (chmod 600) or export "
        f"{secret_env_name(section, key)}; install keeps it in secrets.env",
        code=ExitCode.CONFIG,
    )


@functools.cache
def secret_paths() -> tuple[tuple[str, ...], ...]:
    """The key path of every SecretStr field of the config model."""
    found: list[tuple[str, ...]] = []

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, field in model.model_fields.items():
            args = [field.annotation, *getattr(field.annotation, "__args__", ())]
            if SecretStr in args:
                found.append((*prefix, name))
            for arg in args:
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    walk(arg, (*prefix, name))

    walk(Config, ())
    return tuple(found)


def _holds(data: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = data
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def parse_env(env: Mapping[str, str]) -> list[Layer]:
    layers = []
    secret_names = {"__".join(path).upper() for path in secret_paths()}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower().split("__")
        _refuse_control(env[name], f"environment variable {name}")
        data: dict[str, Any] = {}
        # A secret is taken as written: YAML would turn 0123 into 83, "a: b" into a mapping.
        raw = name[len(ENV_PREFIX) :] in secret_names
        _put(data, key, env[name] if raw else _scalar(env[name]))
        layers.append(Layer(f"environment variable {name}", data))
    return layers


def _refuse_control(raw: str, where: str) -> None:
    """YAML would fold a line break into a space: refuse it before it is parsed."""
    found = values.control_character(raw)
    if found:
        raise StellarError(
            f"{where}: the value contains a control character ({found})",
            hint="every value lands in a unit file or a server setting on one line: "
            "remove line breaks and other control characters",
            code=ExitCode.CONFIG,
        )


def load_config(
    *,
    site_file: Path | None = None,
    sets: list[str] | None = None,
    tier: str | None = None,
    env: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Merge every layer and validate; raise StellarError naming the layer and key."""
    env = os.environ if env is None else env
    upper: list[Layer] = []
    if site_file is not None:
        upper.append(read_site_file(site_file))
    upper.append(parse_sets(sets or []))
    upper.extend(parse_env(env))
    if tier is not None:
        upper.append(Layer("--tier", {"tier": tier}))

    chosen, chosen_from = Tier.PILOT.value, "the default tier"
    for layer in upper:
        if "tier" in layer.data:
            chosen, chosen_from = layer.data["tier"], layer.name
    if chosen not in {t.value for t in Tier}:
        raise StellarError(
            f"{chosen_from}: tier: unknown tier {chosen!r}",
            hint="choose one of: " + ", ".join(t.value for t in Tier),
            code=ExitCode.CONFIG,
        )

    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer in [Layer(f"tier defaults ({chosen})", tier_defaults(chosen)), *upper]:
        _merge(merged, layer.data, layer.name, sources, ())
    try:
        config = Config.model_validate(merged)
        require_secrets(config, sources)
    except ValidationError as exc:
        secrets = redact.values_at(merged, secret_paths())
        raise redact.redact_error(_explain(exc, sources), secrets) from None
    except StellarError as exc:
        raise redact.redact_error(exc, redact.values_at(merged, secret_paths())) from None
    return LoadedConfig(config, sources, site_file)


def _merge(
    into: dict[str, Any],
    data: Mapping[str, Any],
    layer: str,
    sources: dict[str, str],
    prefix: tuple[str, ...],
) -> None:
    for key, value in data.items():
        path = (*prefix, str(key))
        dotted = ".".join(path)
        sources[dotted] = layer
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, layer, sources, path)
        elif isinstance(value, Mapping):
            into[key] = {}
            _merge(into[key], value, layer, sources, path)
        else:
            into[key] = value


def _explain(exc: ValidationError, sources: Mapping[str, str]) -> StellarError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
    dotted = ".".join(loc)
    layer = _source_of(dotted, sources)
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {'.'.join([*loc[:-1], close[0]])!r}? " if close else ""
        return StellarError(
            f"{layer}: {dotted}: unknown key",
            hint=hint + "`stellarbase config schema` lists every key",
            code=ExitCode.CONFIG,
        )
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    hint = _hint_for(loc)
    if any(tuple(loc[: len(path)]) == path for path in secret_paths()):
        shown = ""  # a secret's value is never shown, whatever its type
        hint = (
            f"a secret is one line of text: quote it in YAML ({loc[-1]}: '...'); "
            "an environment variable is taken as written"
        )
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a rule across keys: name the layer of the first key the message mentions
        keys = re.findall(
            r"\b(?:api|agent|worker|local|postgres|redis|inference|backup)(?:\.[a-z_]+)*", msg
        )
        named = [sources[k] for k in keys if k in sources]
        # The user's own layer is the likelier culprit than the tier defaults.
        named.sort(key=lambda name: name.startswith("tier defaults"))
        layer = named[0] if named else "configuration"
        return StellarError(
            f"{layer}: {msg}",
            hint="`stellarbase config show -o json` shows where each key comes from",
            code=ExitCode.CONFIG,
        )
    key = dotted
    return StellarError(
        f"{layer}: {key}: {msg}{shown}",
        hint=hint,
        code=ExitCode.CONFIG,
    )


def _source_of(dotted: str, sources: Mapping[str, str]) -> str:
    parts = dotted.split(".") if dotted else []
    while parts:
        found = sources.get(".".join(parts))
        if found:
            return found
        parts.pop()
    return "configuration"


def _hint_for(loc: list[str]) -> str:
    leaf = loc[-1] if loc else ""
    if leaf == "port" or not loc:
        return "ports are integers 1-65535 and must not overlap; see `stellarbase config schema`"
    return f"fix {'.'.join(loc)}; `stellarbase config schema` shows its type and allowed values"


def _known_keys(loc: list[str]) -> list[str]:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type)]
        model = next(
            (a for a in [ann, *args] if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if model is None:
            return []
    return list(model.model_fields)


def _put(data: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def _scalar(raw: str) -> Any:
    import yaml

    if re.fullmatch(r"\d+(:\d+)+", raw.strip()):
        return raw  # a time like 02:30, not YAML 1.1's base-60 integer
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    # The tier file fills every required key; a site file may set any subset.
    schema.pop("required", None)
    for definition in schema.get("$defs", {}).values():
        definition.pop("required", None)
    return schema
