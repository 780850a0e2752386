"""`stellarbase run api|worker|inference`: a real service process with health and metrics.

Each serves /healthz (alive), /readyz (its configured dependencies answer) and /metrics
(Prometheus text), tells systemd when it is ready, pings the watchdog only while its own
HTTP server answers, and stops cleanly on SIGTERM. The agent (`stellarbase.agent`) builds
on the same server.

Test hook: while the file /run/stellarbase/fault/<unit>.healthz exists, that service's
/healthz answers 500 (what the agent's supervision reacts to). Nothing creates it.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from pydantic import ValidationError

from stellarbase import __version__, checks, gpu, notify, verify
from stellarbase import log as logsetup
from stellarbase.agent import FAULT_DIR
from stellarbase.errors import ExitCode, StellarError
from stellarbase.service_settings import ServiceSettings

log = structlog.get_logger()

REMOTE_TOKEN_ENV = "STELLARBASE_AGENT__METRICS_TOKEN"
READY_CACHE_SECONDS = 1.0  # scrapers and the health gate may poll fast; dependencies need not


class Service:
    def __init__(self, settings: ServiceSettings, instance: int | None) -> None:
        self.settings = settings
        self.instance = instance
        self.port = settings.port_of(instance)
        self.name = settings.service + (f"@{instance}" if instance else "")
        self.registry = CollectorRegistry()
        self._ready_lock = threading.Lock()
        self._ready: tuple[float, list[checks.CheckResult]] | None = None
        self._stop = threading.Event()
        self.fault_flag = FAULT_DIR / f"{self.unit_name()}.healthz"
        self._metrics()

    def unit_name(self) -> str:
        if self.settings.service == "inference":  # the unit's instance is its device
            return f"stellarbase-inference@{os.environ.get('CUDA_VISIBLE_DEVICES', '')}.service"
        return f"stellarbase-{self.name}.service"

    def _metrics(self) -> None:
        build = Gauge(
            "stellarbase_build_info",
            "Version of the running StellarBase service",
            ["version", "service"],
            registry=self.registry,
        )
        build.labels(__version__, self.settings.service).set(1)
        self.requests = Counter(
            "stellarbase_http_requests_total",
            "HTTP requests served, by path and status code",
            ["path", "code"],
            registry=self.registry,
        )
        self._dependency_metrics()

    def _dependency_metrics(self) -> None:
        self.check_up = Gauge(
            "stellarbase_dependency_up",
            "1 when the last readiness check of the dependency passed",
            ["dependency"],
            registry=self.registry,
        )
        self.check_seconds = Histogram(
            "stellarbase_dependency_check_duration_seconds",
            "Duration of readiness checks, by dependency",
            ["dependency"],
            registry=self.registry,
        )

    # --- readiness --------------------------------------------------------------------------

    def readiness(self) -> list[checks.CheckResult]:
        with self._ready_lock:
            now = time.monotonic()
            if self._ready and now - self._ready[0] < READY_CACHE_SECONDS:
                return self._ready[1]
            s = self.settings
            results = checks.dependency_checks(s.postgres, s.redis, s.s3, s.check_timeout_seconds)
            if s.service == "inference":
                results.append(checks.run_check("gpu", check_visible_gpu))
            for r in results:
                self.check_up.labels(r.name).set(1 if r.ok else 0)
                self.check_seconds.labels(r.name).observe(r.seconds)
                if not r.ok:
                    log.warning("dependency check failed", check=r.name, error=r.message)
            self._ready = (time.monotonic(), results)
            return results

    def readyz(self, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        """Status code, body and content type of /readyz."""
        results = self.readiness()
        ready = all(r.ok for r in results)
        body = {
            "status": "ready" if ready else "not ready",
            "service": self.name,
            "checks": [r.as_dict() for r in results],
        }
        return 200 if ready else 503, (json.dumps(body) + "\n").encode(), "application/json"

    def healthy(self) -> bool:
        return not self.fault_flag.exists()

    # --- serving ----------------------------------------------------------------------------

    def serve(self) -> None:
        server = ThreadingHTTPServer((self.listen_host(), self.port), _handler(self))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        remote = self._remote_server()
        self._stop_on_signals()
        log.info("service started", service=self.name, port=self.port, version=__version__)
        self.main_loop()
        notify.notify("STOPPING=1")
        log.info("service stopping", service=self.name)
        for each in (server, remote):
            if each is not None:
                each.shutdown()
                each.server_close()

    def _stop_on_signals(self) -> None:
        """SIGTERM and SIGINT stop the service, however many arrive and whenever.

        A Python signal handler runs in the main thread between two bytecodes, possibly in
        the middle of the `Event.wait` or `Event.set` it would call, whose lock is not
        reentrant: two SIGTERMs a moment apart (systemd's, and the one the one-file
        bootloader forwards) deadlocked the process that way. So the handler only writes a
        byte to a pipe, and a thread that reads it sets the event.
        """
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)

        def on_signal(_signum: int, _frame: object) -> None:
            with contextlib.suppress(OSError):  # a full pipe: a stop is already on its way
                os.write(write_fd, b"\0")

        def stop_when_signalled() -> None:
            os.read(read_fd, 1)
            self._stop.set()

        threading.Thread(target=stop_when_signalled, name="stop-signal", daemon=True).start()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def listen_host(self) -> str:
        """The address of the plain listener: `bind` (the agent keeps to loopback)."""
        return str(self.settings.bind)

    def _remote_server(self) -> HTTPServer | None:
        """A second listener, for remote scrapers: the agent's (agent/remote.py)."""
        return None

    def main_loop(self) -> None:
        """Until SIGTERM: ready at once, then ping the watchdog while HTTP answers."""
        notify.notify("READY=1", f"STATUS=serving on port {self.port}")
        interval = notify.watchdog_interval()
        while not self._stop.wait(interval or 3600):
            if interval is not None and self._alive():
                notify.notify("WATCHDOG=1")

    def _alive(self) -> bool:
        host = self.listen_host()
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        host = f"[{host}]" if ":" in host else host
        code, _ = verify.probe(f"http://{host}:{self.port}/healthz", timeout=2.0)
        # Any answer proves the server is not hung; an unhealthy /healthz is the agent's to
        # act on (it restarts through systemd), not a reason to be killed by the watchdog.
        return code != 0


class BackupCollector(Collector):
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


def _handler(service: Service, token: str | None = None) -> type[BaseHTTPRequestHandler]:
    """Request handler; with `token`, /metrics and /readyz need `Authorization: Bearer`."""
    expected = f"Bearer {token}".encode() if token else b""

    class Handler(BaseHTTPRequestHandler):
        server_version = f"stellarbase/{__version__}"

        def do_GET(self) -> None:
            cid = self.headers.get("X-Correlation-Id") or uuid.uuid4().hex
            # Each request runs in its own thread: its log lines carry the caller's id.
            structlog.contextvars.bind_contextvars(correlation_id=cid)
            path, _, query = self.path.partition("?")
            given = self.headers.get("Authorization", "").encode()
            if token and path != "/healthz" and not hmac.compare_digest(given, expected):
                self._send(401, {"error": "a bearer token is required"}, cid)
            elif path == "/healthz":
                if service.healthy():
                    self._send(200, {"status": "ok", "service": service.name}, cid)
                else:
                    self._send(500, {"status": "failing", "service": service.name}, cid)
            elif path == "/readyz":
                code, data, ctype = service.readyz(parse_qs(query, keep_blank_values=True))
                self._raw(code, data, ctype, cid)
            elif path == "/metrics":
                self._raw(200, generate_latest(service.registry), CONTENT_TYPE_LATEST, cid)
            else:
                self._send(404, {"error": f"no such path {path}"}, cid)
            known = path if path in ("/healthz", "/readyz", "/metrics") else "other"
            service.requests.labels(known, str(self._code)).inc()

        def _send(self, code: int, body: dict[str, Any], cid: str) -> None:
            data = (json.dumps(body) + "\n").encode()
            self._raw(code, data, "application/json", cid)

        def _raw(self, code: int, data: bytes, ctype: str, cid: str) -> None:
            self._code = code
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Correlation-Id", cid)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            if self.path.split("?", 1)[0] != "/healthz":  # the watchdog's own probe is noise
                log.debug("http", request=self.requestline, code=getattr(self, "_code", 0))

    return Handler


def load_settings(path: Path) -> ServiceSettings:
    try:
        data = json.loads(path.read_text())
        return ServiceSettings.model_validate(data).with_secrets(os.environ)
    except FileNotFoundError:
        raise StellarError(
            f"{path}: no such settings file",
            hint="run `stellarbase install` first, or pass --settings",
            code=ExitCode.CONFIG,
        ) from None
    except (OSError, ValueError, ValidationError) as exc:
        raise StellarError(
            f"{path}: unreadable service settings ({exc.__class__.__name__})",
            hint="re-run `stellarbase install` to rewrite it",
            code=ExitCode.CONFIG,
        ) from None


def check_visible_gpu() -> str:
    """The device of CUDA_VISIBLE_DEVICES is one NVML reports (a GPU or a MIG instance)."""
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    inventory = gpu.default_source().inventory()
    if inventory.error:
        raise RuntimeError(f"NVML: {inventory.error}")
    known = {g.uuid for g in inventory.gpus} | {
        m.uuid for g in inventory.gpus for m in g.mig_devices
    }
    if device not in known:
        raise RuntimeError(f"CUDA_VISIBLE_DEVICES={device!r} is not a GPU NVML reports")
    return f"{device} visible (driver {inventory.driver_version})"


def run_service(name: str, settings_path: Path, instance: int | None) -> None:
    settings = load_settings(settings_path)
    if name == "inference":  # one settings file for every unit; each unit has its own $PORT
        port = os.environ.get("PORT", "")
        if not port.isdigit():
            raise StellarError(
                "inference needs its port in $PORT",
                hint="the stellarbase-inference@ units set it from /etc/stellarbase/inference/",
                code=ExitCode.CONFIG,
            )
        settings = settings.model_copy(update={"port": int(port)})
    if settings.service != name:
        raise StellarError(
            f"{settings_path} holds settings of {settings.service}, not {name}",
            hint=f"pass --settings with the {name} file",
            code=ExitCode.CONFIG,
        )
    import sys

    logsetup.setup(settings.log_level, sys.stdout)
    logsetup.bind_correlation_id()
    if name == "agent":
        from stellarbase.agent.runtime import Agent

        Agent(settings).serve()
    else:
        Service(settings, instance).serve()
