"""The agent's Prometheus families, built from a snapshot at scrape time (pure).

Names, types and labels are a contract with the alert rules and the dashboard: all
`stellarbase_`, base units, counters end in `_total` (prometheus_client adds it).
A family whose collector failed is left out; `stellarbase_collector_success` says so.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from stellarbase.agent.readiness import Readiness
from stellarbase.agent.snapshot import Snapshot

UNIT_STATES = ("active", "reloading", "inactive", "failed", "activating", "deactivating")


@dataclass(frozen=True)
class Supervision:
    consecutive_failures: Mapping[str, int]
    restarts: Mapping[str, int]


def families(
    snap: Snapshot,
    readiness: Readiness,
    supervision: Supervision,
    backup_max_age: float | None = None,
) -> Iterator[Metric]:
    yield from _readiness(readiness)
    yield from _units(snap)
    yield from _services(snap)
    yield from _dependencies(snap)
    yield from _host(snap)
    yield from _gpus(snap)
    yield from _migrations(snap)
    yield from snap.backup() or []
    if backup_max_age is not None:
        yield GaugeMetricFamily(
            "stellarbase_backup_max_age_seconds",
            "Oldest a last base backup may be before it is overdue (from the schedule)",
            value=backup_max_age,
        )
    yield from _supervision(supervision)
    yield from _collectors(snap)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _readiness(r: Readiness) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "stellarbase_host_ready", "1 when the agent's /readyz answers 200", value=int(r.ready)
    )
    up = _gauge("stellarbase_readiness_check_up", "1 when that /readyz check passes", ["check"])
    for c in r.checks:
        up.add_metric([c.name], int(c.ok))
    yield up


def _units(snap: Snapshot) -> Iterator[Metric]:
    units = snap.units()
    if units is None:
        return
    active = _gauge("stellarbase_unit_active", "1 when ActiveState=active", ["unit"])
    state = _gauge(
        "stellarbase_unit_state", "1 for the unit's current ActiveState", ["unit", "state"]
    )
    sub = _gauge("stellarbase_unit_sub_state_info", "The unit's SubState", ["unit", "sub_state"])
    restarts = CounterMetricFamily(
        "stellarbase_unit_restarts", "Automatic restarts by systemd (NRestarts)", labels=["unit"]
    )
    memory = _gauge("stellarbase_unit_memory_bytes", "MemoryCurrent of the unit", ["unit"])
    cpu = CounterMetricFamily(
        "stellarbase_unit_cpu_seconds", "CPU time used by the unit", labels=["unit"]
    )
    for unit, s in sorted(units.items()):
        active.add_metric([unit], int(s.active_state == "active"))
        for name in UNIT_STATES:
            state.add_metric([unit, name], int(s.active_state == name))
        sub.add_metric([unit, s.sub_state], 1)
        restarts.add_metric([unit], s.restarts)
        if s.memory_bytes is not None:
            memory.add_metric([unit], s.memory_bytes)
        if s.cpu_seconds is not None:
            cpu.add_metric([unit], s.cpu_seconds)
    yield from (active, state, sub, restarts, memory, cpu)


def _services(snap: Snapshot) -> Iterator[Metric]:
    probes = snap.services()
    if probes is None:
        return
    healthy = _gauge(
        "stellarbase_service_healthy",
        "1 when its /healthz answered 200 at the last probe",
        ["unit"],
    )
    ready = _gauge("stellarbase_service_ready", "1 when its /readyz answered 200", ["unit"])
    seconds = _gauge(
        "stellarbase_service_probe_duration_seconds",
        "Duration of the last /healthz probe",
        ["unit"],
    )
    for unit, p in sorted(probes.items()):
        healthy.add_metric([unit], int(p.healthy))
        ready.add_metric([unit], int(p.ready))
        seconds.add_metric([unit], p.healthz_seconds)
    yield from (healthy, ready, seconds)


def _dependencies(snap: Snapshot) -> Iterator[Metric]:
    samples = snap.dependency_samples()
    if samples is None:
        return
    up = _gauge("stellarbase_dependency_up", "1 when the dependency answered", ["dependency"])
    seconds = _gauge(
        "stellarbase_dependency_probe_duration_seconds",
        "Duration of the last probe of the dependency",
        ["dependency"],
    )
    info = _gauge(
        "stellarbase_dependency_info", "Server version, where known", ["dependency", "version"]
    )
    for s in samples:
        up.add_metric([s.name], int(s.up))
        seconds.add_metric([s.name], s.seconds)
        if s.version:
            info.add_metric([s.name, s.version], 1)
    yield from (up, seconds, info)


def _host(snap: Snapshot) -> Iterator[Metric]:
    h = snap.host()
    if h is None:
        return
    yield GaugeMetricFamily(
        "stellarbase_host_cpu_usage_ratio", "CPU busy over the last round, 0..1", value=h.cpu_ratio
    )
    load = _gauge("stellarbase_host_load_average", "Load average", ["period"])
    for period, value in zip(("1m", "5m", "15m"), h.load, strict=True):
        load.add_metric([period], value)
    yield load
    yield GaugeMetricFamily(
        "stellarbase_host_memory_total_bytes", "Physical memory", value=h.memory_total
    )
    yield GaugeMetricFamily(
        "stellarbase_host_memory_available_bytes",
        "Memory available without swapping",
        value=h.memory_available,
    )
    total = _gauge(
        "stellarbase_host_disk_total_bytes", "Size of the data dir's file system", ["path"]
    )
    total.add_metric([h.disk_path], h.disk_total)
    free = _gauge("stellarbase_host_disk_free_bytes", "Free space at the data dir", ["path"])
    free.add_metric([h.disk_path], h.disk_free)
    yield from (total, free)


def _gpus(snap: Snapshot) -> Iterator[Metric]:
    sample = snap.gpus()
    if sample is None:
        return
    info = _gauge(
        "stellarbase_gpu_info",
        "One per GPU and per MIG instance (mig=true; gpu_uuid is the parent GPU)",
        ["uuid", "gpu_uuid", "index", "name", "mig"],
    )
    util = _gauge("stellarbase_gpu_utilization_ratio", "GPU busy, 0..1", ["uuid"])
    used = _gauge("stellarbase_gpu_memory_used_bytes", "Memory in use", ["uuid"])
    total = _gauge("stellarbase_gpu_memory_total_bytes", "Memory", ["uuid"])
    temp = _gauge("stellarbase_gpu_temperature_celsius", "GPU temperature", ["uuid"])
    power = _gauge("stellarbase_gpu_power_watts", "Power draw", ["uuid"])
    ecc = CounterMetricFamily(
        "stellarbase_gpu_ecc_errors", "Volatile uncorrected ECC errors", labels=["uuid"]
    )
    xid = CounterMetricFamily(
        "stellarbase_gpu_xid_errors", "XID errors seen since the agent started", labels=["uuid"]
    )
    for g in sample.inventory.gpus:
        info.add_metric([g.uuid, g.uuid, str(g.index), g.name, "false"], 1)
        used.add_metric([g.uuid], g.memory_used_bytes)
        total.add_metric([g.uuid], g.memory_total_bytes)
        if g.utilization_pct is not None:
            util.add_metric([g.uuid], g.utilization_pct / 100)
        if g.temperature_c is not None:
            temp.add_metric([g.uuid], g.temperature_c)
        if g.power_w is not None:
            power.add_metric([g.uuid], g.power_w)
        if g.ecc_uncorrected is not None:
            ecc.add_metric([g.uuid], g.ecc_uncorrected)
        xids = sample.xid.get(g.uuid, g.xid_errors)
        if xids is not None:
            xid.add_metric([g.uuid], xids)
        for m in g.mig_devices:
            info.add_metric([m.uuid, g.uuid, str(g.index), g.name, "true"], 1)
            used.add_metric([m.uuid], m.memory_used_bytes)
            total.add_metric([m.uuid], m.memory_total_bytes)
    yield from (info, util, used, total, temp, power, ecc, xid)


def _migrations(snap: Snapshot) -> Iterator[Metric]:
    m = snap.migrations()
    if m is None:
        return
    yield GaugeMetricFamily(
        "stellarbase_migrations_applied_version",
        "Highest migration applied to the database",
        value=m.applied_version,
    )
    yield GaugeMetricFamily(
        "stellarbase_migrations_pending",
        "Migrations this binary ships that the database lacks",
        value=m.pending,
    )


def _supervision(s: Supervision) -> Iterator[Metric]:
    restarts = CounterMetricFamily(
        "stellarbase_supervisor_restarts", "Restarts the agent made", labels=["unit"]
    )
    for unit, n in sorted(s.restarts.items()):
        restarts.add_metric([unit], n)
    failures = _gauge(
        "stellarbase_supervisor_consecutive_failures", "Failed /healthz probes in a row", ["unit"]
    )
    for unit, n in sorted(s.consecutive_failures.items()):
        failures.add_metric([unit], n)
    yield from (restarts, failures)


def _collectors(snap: Snapshot) -> Iterator[Metric]:
    ok = _gauge(
        "stellarbase_collector_success",
        "1 when the collector's last run finished in time without error",
        ["collector"],
    )
    seconds = _gauge(
        "stellarbase_collector_duration_seconds", "Duration of its last run", ["collector"]
    )
    for name, outcome in sorted(snap.outcomes.items()):
        ok.add_metric([name], int(outcome.ok))
        seconds.add_metric([name], outcome.seconds)
    yield from (ok, seconds)


def backup_max_age(schedule: str) -> float:
    """How old the last base backup may get: one interval of the schedule plus slack
    (2 h, or one more interval when that is shorter): daily → 26 h, hourly → 2 h."""
    period = {
        "minutely": 60,
        "hourly": 3600,
        "daily": 86400,
        "weekly": 7 * 86400,
        "monthly": 31 * 86400,
    }.get(schedule.strip().lower(), 86400)
    return float(period + min(period, 7200))
