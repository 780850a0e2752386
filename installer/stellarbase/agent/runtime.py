"""The agent process: the collection loop, supervision, sd_notify, /readyz and /metrics.

systemd: READY=1 after the first round, WATCHDOG=1 from the loop only (a stuck loop gets
the agent killed and restarted by WatchdogSec=), STATUS= a one-line summary.

Test hook: while /run/stellarbase/fault/agent.freeze exists and is newer than the agent
process, the loop stops (no collection, no watchdog ping). A restarted agent ignores the
older flag, so the hook cannot keep it down. Nothing creates the file.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
from prometheus_client.core import Metric
from prometheus_client.registry import Collector as RegistryCollector

from stellarbase import audit, gpu, notify
from stellarbase.agent import (
    FAULT_DIR,
    SUPERVISE_SOCKET,
    collectors,
    local_address,
    metrics,
    readiness,
    remote,
)
from stellarbase.agent.runner import Collector, Runner
from stellarbase.agent.snapshot import (
    BACKUP,
    DEPENDENCIES,
    GPUS,
    HOST,
    MIGRATIONS,
    SERVICES,
    UNITS,
    Snapshot,
)
from stellarbase.agent.supervise import Action, Policy, Supervisor, request_restart
from stellarbase.agent.targets import Targets, TargetsReader, targets_file
from stellarbase.errors import ExitCode, StellarError
from stellarbase.gpu.inventory import GpuSource
from stellarbase.paths import HostPaths
from stellarbase.service_runtime import Service, handler
from stellarbase.service_settings import AgentSettings, ServiceSettings

log = structlog.get_logger()

DEFAULTS = AgentSettings(
    interval_seconds=5,
    restart_after_failures=3,
    restart_backoff_seconds=10,
    restart_backoff_max_seconds=600,
)
MIGRATIONS_EVERY = 60.0  # the schema changes only on install: no connection every round


class Agent(Service):
    def __init__(
        self,
        settings: ServiceSettings,
        *,
        paths: HostPaths | None = None,
        gpu_source: GpuSource | None = None,
        supervise_socket: Path = SUPERVISE_SOCKET,
        fault_dir: Path = FAULT_DIR,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = settings.agent or DEFAULTS
        self.paths = paths or HostPaths()
        self.clock = clock
        self.supervise_socket = supervise_socket
        self.freeze_flag = fault_dir / "agent.freeze"
        self.started_at = time.time()
        self.supervisor = Supervisor(Policy.of(self.options))
        self.restarts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._targets = Targets()
        self._reader = TargetsReader(targets_file(self.paths))
        self._restart_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supervise")
        super().__init__(settings, None)
        self.backup_collector: collectors.BackupCollector | None = None
        if settings.backup is not None:
            self._start_archiver()
        self.gpu_source = gpu_source or gpu.default_source()
        self.xid_watcher = self._start_xid_watcher()
        self.runner = Runner(self._collectors(), clock=clock)

    # --- setup ------------------------------------------------------------------------------

    def _dependency_metrics(self) -> None:
        self.registry.register(_Metrics(self))  # the agent's dependency families among them

    def _start_archiver(self) -> None:
        """The WAL archiver of the local PostgreSQL: uploads ahead of archive_command."""
        from stellarbase.backup import codec
        from stellarbase.backup.archiver import Archiver, return_freed_buffers
        from stellarbase.backup.repo import repository_from

        backup = self.settings.backup
        assert backup is not None
        return_freed_buffers()
        self.archiver = Archiver(
            repository_from(backup, self.settings.s3),
            self.paths.postgres_data / "pg_wal",
            self.paths.wal_spool,
            level=backup.compression_level,
            key=codec.encryption_key(backup),
            concurrency=backup.upload_concurrency,
        )
        self.backup_collector = collectors.BackupCollector(
            self.archiver, self.paths.backup_status_file
        )
        thread = threading.Thread(
            target=self.archiver.run, args=(self._stop,), name="archiver", daemon=True
        )
        thread.start()
        log.info("wal archiver started", pg_wal=str(self.paths.postgres_data / "pg_wal"))

    def _start_xid_watcher(self) -> Any:
        from stellarbase.gpu.nvml import NvmlSource, XidWatcher

        if not isinstance(self.gpu_source, NvmlSource):
            return None
        watcher = XidWatcher(self.gpu_source.library)
        threading.Thread(target=watcher.run, args=(self._stop,), name="xid", daemon=True).start()
        return watcher

    def _collectors(self) -> list[Collector]:
        s = self.settings
        timeout = s.check_timeout_seconds
        found = [
            Collector(
                UNITS, lambda: collectors.unit_states([t.unit for t in self._targets.units]), 10
            ),
            Collector(
                SERVICES,
                lambda: collectors.probe_services(
                    self.probe_host(), self._targets.probed(), timeout + 1
                ),
                timeout + 4,
            ),
            Collector(HOST, lambda: collectors.host(self.paths.state_dir), 3),
            Collector(
                GPUS,
                lambda: collectors.gpus(self.gpu_source, self.xid_watcher, self._expect_gpus()),
                10,
            ),
        ]
        if s.postgres or s.redis or s.s3:
            found.append(
                Collector(
                    DEPENDENCIES,
                    lambda: collectors.dependencies(s.postgres, s.redis, s.s3, timeout),
                    timeout + 2,
                )
            )
        if s.postgres is not None:
            pg = s.postgres
            found.append(
                Collector(
                    MIGRATIONS,
                    lambda: collectors.migrations(pg, timeout),
                    timeout + 2,
                    every=MIGRATIONS_EVERY,
                )
            )
        if self.backup_collector is not None:
            backup = self.backup_collector
            found.append(Collector(BACKUP, lambda: list(backup.collect()), 3))
        return found

    def probe_host(self) -> str:
        host = str(self.settings.bind)
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"[{host}]" if ":" in host else host

    def listen_host(self) -> str:
        # /metrics and /readyz?verbose answer here without a token: never off the host.
        return str(local_address(self.settings.bind))

    def _remote_server(self) -> remote.BoundedServer | None:
        """The listener for remote scrapers: bearer token, and TLS when configured.

        Local callers (the install gate, `status`, the watchdog probe) keep the loopback
        listener; this one answers /metrics and /readyz only with the token.
        """
        agent = self.settings.agent
        if agent is None or agent.remote_port is None or agent.remote_bind is None:
            return None
        token = os.environ.get(remote.TOKEN_ENV, "")
        if not token:
            raise StellarError(
                f"agent.remote_port is set but {remote.TOKEN_ENV} is not in the environment",
                hint="set agent.metrics_token and re-run `stellarbase install`",
                code=ExitCode.CONFIG,
            )
        context = None
        if agent.tls_cert and agent.tls_key:
            context = remote.tls_context(agent.tls_cert, agent.tls_key)
        server = remote.BoundedServer(
            (str(agent.remote_bind), agent.remote_port),
            handler(self, token=token),
            context=context,
        )
        threading.Thread(target=server.serve_forever, name="http-remote", daemon=True).start()
        log.info("remote listener", port=agent.remote_port, tls=context is not None)
        return server

    def _expect_gpus(self) -> bool:
        return any(t.unit.startswith("stellarbase-inference@") for t in self._targets.units)

    # --- the loop ---------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        with self._lock:
            return self._snapshot

    def main_loop(self) -> None:
        interval = self.options.interval_seconds
        watchdog = notify.watchdog_interval()
        tick = min(watchdog or interval, interval)  # how long any wait may be without a ping
        ready_sent, status = False, ""
        next_round = self.clock()
        while not self._stop.is_set():
            self._freeze_if_asked()
            line = self.collect_once(tick)
            if not ready_sent:
                notify.notify("READY=1", f"STATUS={line}")
                log.info("agent ready", status=line)
                ready_sent, status = True, line
            elif line != status:
                notify.notify(f"STATUS={line}")
                log.info("agent status", status=line)
                status = line
            self._ping()
            next_round = max(next_round + interval, self.clock())
            while not self._stop.wait(max(0.0, min(next_round - self.clock(), tick))):
                self._ping()
                if self.clock() >= next_round:
                    break
        self.runner.close()
        self._restart_pool.shutdown(wait=False, cancel_futures=True)

    def collect_once(self, tick: float = 1.0) -> str:
        """One round: collect, cache, supervise; the STATUS= line."""
        self._targets = self._reader.read()
        self.runner.round(tick=self._ping, tick_every=tick)
        snap = Snapshot(
            taken=self.clock(),
            targets=self._targets,
            outcomes=dict(self.runner.outcomes),
            dependencies=self._dependencies(),
        )
        with self._lock:
            self._snapshot = snap
        self.supervise(snap)
        r = self.readiness_now()
        return readiness.summary(snap, r, _archive_lag(snap))

    def _dependencies(self) -> tuple[str, ...]:
        s = self.settings
        return tuple(name for name in ("postgres", "redis", "s3") if getattr(s, name) is not None)

    def _ping(self) -> None:
        if notify.watchdog_interval() is not None:
            notify.notify("WATCHDOG=1")

    def _freeze_if_asked(self) -> None:
        warned = False
        while not self._stop.is_set():
            try:
                if self.freeze_flag.stat().st_mtime < self.started_at:
                    return
            except OSError:
                return
            if not warned:
                log.warning("collection loop frozen by the test hook", flag=str(self.freeze_flag))
                warned = True
            time.sleep(0.5)

    # --- supervision ------------------------------------------------------------------------

    def supervise(self, snap: Snapshot) -> None:
        units, probes = snap.units(), snap.services()
        if units is None or probes is None:
            return  # without both facts no decision is safe
        now = self.clock()
        for target in snap.targets.probed():
            unit, probe = units.get(target.unit), probes.get(target.unit)
            with self._lock:
                self.restarts.setdefault(target.unit, 0)
            if unit is None or probe is None:
                continue
            active = unit.active_state == "active"
            d = self.supervisor.observe(target.unit, active=active, healthy=probe.healthy, now=now)
            if d.action == Action.RESTART:
                log.warning(
                    "restarting an unhealthy service",
                    unit=target.unit,
                    failures=d.failures,
                    healthz=probe.healthz_message,
                )
                self._restart_pool.submit(
                    self._restart, target.unit, d.failures, probe.healthz_message
                )
            elif d.action == Action.BACKOFF:
                log.info("restart held back", unit=target.unit, wait_seconds=round(d.wait, 1))

    def _restart(self, unit: str, failures: int, healthz: str) -> None:
        ok, message = request_restart(self.supervise_socket, unit)
        if ok:
            with self._lock:
                self.restarts[unit] = self.restarts.get(unit, 0) + 1
            log.warning("supervisor restarted a service", unit=unit, result=message)
        else:
            log.error("supervisor could not restart a service", unit=unit, error=message)
        pg = self.settings.postgres
        if pg is not None:
            audit.try_record(
                pg.url,
                pg.password.get_secret_value() if pg.password else None,
                action="supervise restart",
                outcome="success" if ok else "failure",
                details={
                    "unit": unit,
                    "failed_probes": failures,
                    "healthz": healthz,
                    "result": message,
                },
                correlation_id=uuid.uuid4().hex,
            )

    # --- endpoints --------------------------------------------------------------------------

    def readiness_now(self, exclude: list[str] | None = None) -> readiness.Readiness:
        checks = readiness.checks_of(self.snapshot, self.clock(), self.options.interval_seconds)
        return readiness.evaluate(checks, exclude or [])

    def readyz(self, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        r = self.readiness_now(query.get("exclude", []))
        code = 200 if r.ready else 503
        if "verbose" in query:
            return code, readiness.as_text(r).encode(), "text/plain; charset=utf-8"
        return code, (json.dumps(readiness.as_json(r)) + "\n").encode(), "application/json"

    def supervision(self) -> metrics.Supervision:
        with self._lock:
            restarts = dict(self.restarts)
        return metrics.Supervision(self.supervisor.consecutive_failures(), restarts)

    def backup_max_age(self) -> float | None:
        schedule = self.options.backup_schedule
        return metrics.backup_max_age(schedule) if schedule else None


class _Metrics(RegistryCollector):
    """Reads the agent's cached snapshot at scrape time: a scrape never waits on a probe."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        snap = a.snapshot or Snapshot(taken=a.clock(), targets=Targets(), outcomes={})
        yield from metrics.families(snap, a.readiness_now(), a.supervision(), a.backup_max_age())


def _archive_lag(snap: Snapshot) -> float | None:
    for family in snap.backup() or []:
        if family.name == "stellarbase_backup_wal_archive_lag_segments" and family.samples:
            return float(family.samples[0].value)
    return None
