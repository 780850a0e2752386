"""What the agent reads each round: thin adapters over systemctl, HTTP, the dependency
checks, psutil, NVML, the migrations table and the WAL archiver. Each returns plain data and
may raise; the runner turns a raise or a hang into that collector's failure."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as RegistryCollector

from stellarbase import checks, db, migrate, pgwire, systemd, verify
from stellarbase.agent.targets import Target
from stellarbase.config import PostgresConfig, RedisConfig, S3Config
from stellarbase.errors import ExitCode, StellarError
from stellarbase.gpu.inventory import GpuSource, Inventory

UNIT_PROPS = ("ActiveState", "SubState", "NRestarts", "MemoryCurrent", "CPUUsageNSec")
UNSET = 2**64 - 1  # systemd's "[not set]" for an unsigned property without accounting


@dataclass(frozen=True)
class UnitSample:
    active_state: str
    sub_state: str
    restarts: int
    memory_bytes: int | None  # None: no memory accounting for this unit
    cpu_seconds: float | None


@dataclass(frozen=True)
class ServiceProbe:
    healthy: bool  # /healthz answered 200
    healthz_seconds: float
    healthz_message: str
    ready: bool  # /readyz answered 200
    ready_message: str


@dataclass(frozen=True)
class DependencySample:
    name: str
    up: bool
    seconds: float
    message: str
    version: str | None = None


@dataclass(frozen=True)
class HostSample:
    cpu_ratio: float
    load: tuple[float, float, float]
    memory_total: int
    memory_available: int
    disk_path: str
    disk_total: int
    disk_free: int


@dataclass(frozen=True)
class GpuSample:
    inventory: Inventory
    xid: dict[str, int] = field(default_factory=dict)  # GPU UUID → XIDs seen (watcher)


@dataclass(frozen=True)
class MigrationSample:
    applied_version: int
    pending: int


def unit_states(units: Sequence[str]) -> dict[str, UnitSample]:
    """Every unit's state in one `systemctl show` (one fork per round, never per scrape)."""
    found: dict[str, UnitSample] = {}
    for unit, p in systemd.show_properties(units, UNIT_PROPS, timeout=10).items():
        memory = _unsigned(p.get("MemoryCurrent"))
        cpu = _unsigned(p.get("CPUUsageNSec"))
        found[unit] = UnitSample(
            active_state=p.get("ActiveState", "unknown"),
            sub_state=p.get("SubState", "unknown"),
            restarts=int(p.get("NRestarts") or 0),
            memory_bytes=memory,
            cpu_seconds=None if cpu is None else cpu / 1e9,
        )
    return found


def _unsigned(value: str | None) -> int | None:
    if not value or not value.isdigit() or int(value) == UNSET:
        return None
    return int(value)


def probe_services(
    host: str, targets: Sequence[Target], ready_timeout: float
) -> dict[str, ServiceProbe]:
    """/healthz and /readyz of every service at once, so one slow service costs one timeout."""
    probed = [t for t in targets if t.port]
    if not probed:
        return {}

    def one(target: Target) -> ServiceProbe:
        base = f"http://{host}:{target.port}"
        start = time.monotonic()
        code, body = verify.probe(f"{base}/healthz", timeout=2.0)
        seconds = time.monotonic() - start
        ready_code, ready_body = verify.probe(f"{base}/readyz", timeout=ready_timeout)
        return ServiceProbe(
            healthy=code == 200,
            healthz_seconds=seconds,
            healthz_message=_answer(code, body),
            ready=ready_code == 200,
            ready_message=_answer(ready_code, ready_body),
        )

    with ThreadPoolExecutor(max_workers=len(probed)) as pool:
        return dict(zip((t.unit for t in probed), pool.map(one, probed), strict=True))


def _answer(code: int, body: str) -> str:
    if code == 0:
        return f"no answer: {body.strip()[:200]}"
    if code == 200:
        return "ok"
    return f"answered {code}: {failing_checks(body) or body.strip()[:200]}"


def failing_checks(body: str) -> str:
    """The failing checks named in a service's /readyz JSON ("redis: Connection refused")."""
    try:
        data = json.loads(body)
        failing = [c for c in data.get("checks", []) if c.get("status") != "pass"]
    except (ValueError, AttributeError):
        return ""
    return "; ".join(f"{c.get('name')}: {c.get('message', '')}"[:160] for c in failing)


_VERSION = re.compile(r"^(?:PostgreSQL|Redis) (\S+)")


def dependencies(
    postgres: PostgresConfig | None, redis: RedisConfig | None, s3: S3Config | None, timeout: float
) -> list[DependencySample]:
    out = []
    for r in checks.dependency_checks(postgres, redis, s3, timeout):
        match = _VERSION.match(r.message) if r.ok else None
        out.append(
            DependencySample(r.name, r.ok, r.seconds, r.message, match[1] if match else None)
        )
    return out


def host(data_dir: Path) -> HostSample:
    import psutil

    memory = psutil.virtual_memory()
    # Before install creates it, the data dir lives where its nearest parent does.
    existing = next(p for p in (data_dir, *data_dir.parents) if p.exists())
    disk = shutil.disk_usage(existing)
    # interval=None: the usage since the previous call, i.e. over the last round.
    return HostSample(
        cpu_ratio=psutil.cpu_percent(interval=None) / 100,
        load=os.getloadavg(),
        memory_total=int(memory.total),
        memory_available=int(memory.available),
        disk_path=str(data_dir),
        disk_total=int(disk.total),
        disk_free=int(disk.free),
    )


def gpus(source: GpuSource, watcher: object | None, expect: bool) -> GpuSample:
    """The GPUs; an NVML that cannot be read fails the collector only where GPUs serve."""
    inventory = source.inventory()
    if inventory.error and expect:
        raise RuntimeError(inventory.error)
    counts = getattr(watcher, "counts", None)
    return GpuSample(inventory, counts() if callable(counts) else {})


def migrations(postgres: PostgresConfig, timeout: float) -> MigrationSample:
    """The highest applied migration and how many shipped ones are not applied yet."""
    shipped = {m.version for m in migrate.load_migrations()}
    password = postgres.password.get_secret_value() if postgres.password else None
    target = pgwire.parse_url(postgres.url, password)
    try:
        conn = pgwire.connect(target, time.monotonic() + timeout)
    except (OSError, pgwire.ServerError) as exc:
        raise StellarError(
            f"cannot connect to PostgreSQL at {db.where(postgres.url)}: {db.one_line(exc)}",
            code=ExitCode.DEPENDENCY,
        ) from None
    with conn:
        try:
            exists = conn.simple_query(f"SELECT to_regclass('{migrate.TABLE}') IS NOT NULL")
            found = exists == [("t",)]
            rows = conn.simple_query(f"SELECT version FROM {migrate.TABLE}") if found else []
        except pgwire.ServerError as exc:
            raise StellarError(
                f"PostgreSQL refused reading the applied migrations: {db.one_line(exc)}",
                code=ExitCode.MIGRATION,
            ) from None
    applied = {int(version) for (version,) in rows if version is not None}
    return MigrationSample(max(applied, default=0), len(shipped - applied))


class BackupCollector(RegistryCollector):
    """Backup metrics read fresh at scrape time: the archiver's counters, the last backup."""

    def __init__(self, archiver: Any, status_file: Path) -> None:
        self.archiver = archiver
        self.status_file = status_file

    def collect(self) -> Iterator[Metric]:
        stats = self.archiver.stats()
        yield GaugeMetricFamily(
            "stellarbase_backup_wal_archive_lag_segments",
            "WAL files PostgreSQL has finished that are not yet durable in the repository",
            value=stats.pending,
        )
        yield GaugeMetricFamily(
            "stellarbase_backup_wal_archive_lag_seconds",
            "Age of the oldest WAL file not yet durable in the repository (0: none waiting)",
            value=stats.lag_seconds,
        )
        yield GaugeMetricFamily(
            "stellarbase_backup_wal_last_archived_timestamp_seconds",
            "When the last WAL file became durable in the repository (Unix time)",
            value=stats.last_archived_at or 0,
        )
        uploaded = CounterMetricFamily(
            "stellarbase_backup_uploaded_bytes",
            "Bytes stored in the repository, by operation",
            labels=["operation"],
        )
        uploaded.add_metric(["wal"], stats.bytes_uploaded_total)
        yield uploaded
        uploads = CounterMetricFamily(
            "stellarbase_backup_uploads", "Objects stored, by operation", labels=["operation"]
        )
        uploads.add_metric(["wal"], stats.uploads_total)
        yield uploads
        status = _read_json(self.status_file)
        failures = CounterMetricFamily(
            "stellarbase_backup_failures", "Failed attempts, by operation", labels=["operation"]
        )
        failures.add_metric(["wal"], stats.failures_total)
        failures.add_metric(["base_backup"], float(status.get("failures", 0)))
        yield failures
        yield GaugeMetricFamily(
            "stellarbase_backup_last_success_timestamp_seconds",
            "When the last base backup finished (Unix time; 0: none yet on this host)",
            value=float(status.get("last_success", 0)),
        )
        yield GaugeMetricFamily(
            "stellarbase_backup_last_size_bytes",
            "Stored size of the last base backup",
            value=float(status.get("last_stored_bytes", 0)),
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
