"""Collectors under deadlines, the metric families, and one agent round end to end in-process
(fake GPUs, a fake service, a fake root helper)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stellarbase.agent import collectors
from stellarbase.agent.collectors import UnitSample
from stellarbase.agent.runner import Collector, Runner
from stellarbase.agent.runtime import Agent
from stellarbase.agent.targets import Target, Targets, render_targets, targets_file
from stellarbase.gpu.fake import FakeSource
from stellarbase.paths import HostPaths
from stellarbase.service_settings import ServiceSettings

GIB = 1 << 30
FAKE_GPUS = {
    "driver_version": "550.54.15",
    "gpus": [
        {
            "uuid": "GPU-aaaa",
            "name": "NVIDIA L40S",
            "memory_total_bytes": 48 * GIB,
            "memory_used_bytes": 2 * GIB,
            "utilization_pct": 50,
            "temperature_c": 61,
            "power_w": 210.5,
            "ecc_uncorrected": 0,
            "xid_errors": 2,
        },
        {
            "uuid": "GPU-bbbb",
            "name": "NVIDIA A100-SXM4-80GB",
            "memory_total_bytes": 80 * GIB,
            "utilization_pct": 0,
            "mig_devices": [
                {"uuid": "MIG-b001", "memory_total_bytes": 20 * GIB},
                {"uuid": "MIG-b002", "memory_total_bytes": 20 * GIB},
                {"uuid": "MIG-b003", "memory_total_bytes": 40 * GIB, "memory_used_bytes": GIB},
            ],
        },
    ],
}
API = "stellarbase-api.service"


def test_a_hung_or_raising_collector_costs_only_its_own_results() -> None:
    release = threading.Event()
    calls = {"hung": 0}

    def hung() -> int:
        calls["hung"] += 1
        release.wait(30)
        return 1

    def broken() -> int:
        raise RuntimeError("no such thing")

    runner = Runner(
        [
            Collector("hung", hung, deadline=0.3),
            Collector("broken", broken, deadline=1),
            Collector("fine", lambda: 42, deadline=1),
        ]
    )
    ticks: list[float] = []
    start = time.monotonic()
    runner.round(tick=lambda: ticks.append(time.monotonic()), tick_every=0.1)
    assert time.monotonic() - start < 1.0
    assert ticks  # the watchdog keeps being fed while a collector is slow
    out = runner.outcomes
    assert (out["fine"].ok, out["fine"].value) == (True, 42)
    assert not out["broken"].ok and out["broken"].error == "no such thing"
    assert not out["hung"].ok and "timed out" in out["hung"].error
    runner.round()
    assert "still running" in runner.outcomes["hung"].error
    assert calls["hung"] == 1  # never started twice
    release.set()
    time.sleep(0.1)
    runner.round()
    assert runner.outcomes["hung"].ok and calls["hung"] == 2
    runner.close()


class _FakeService(BaseHTTPRequestHandler):
    healthy = False

    def do_GET(self) -> None:
        code = 200 if self.path == "/readyz" or self.healthy else 500
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_api() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_helper(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    path = tmp_path / "supervise.sock"
    requests: list[str] = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                requests.append(json.loads(conn.makefile("rb").readline())["restart"])
                conn.sendall(b'{"ok": true, "message": "queued"}\n')

    threading.Thread(target=serve, daemon=True).start()
    yield path, requests
    sock.close()


def _agent(tmp_path: Path, api_port: int, helper: Path) -> Agent:
    paths = HostPaths(tmp_path)
    paths.state_dir.mkdir(parents=True)
    targets = Targets(
        units=(
            Target(unit="stellarbase-agent.service", port=1, probe=True),
            Target(unit=API, port=api_port, probe=True),
        )
    )
    targets_file(paths).parent.mkdir(parents=True)
    targets_file(paths).write_text(render_targets(targets))
    gpus = tmp_path / "gpus.json"
    gpus.write_text(json.dumps(FAKE_GPUS))
    settings = ServiceSettings.model_validate(
        {
            "service": "agent",
            "bind": "127.0.0.1",
            "port": 1,
            "log_level": "info",
            "check_timeout_seconds": 1,
            "agent": {
                "interval_seconds": 1,
                "restart_after_failures": 3,
                "restart_backoff_seconds": 60,
                "restart_backoff_max_seconds": 600,
            },
        }
    )
    return Agent(
        settings,
        paths=paths,
        gpu_source=FakeSource(gpus),
        supervise_socket=helper,
        fault_dir=tmp_path / "fault",
    )


def _families(agent: Agent) -> dict[str, Any]:
    text = generate_latest(agent.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(family: Any, **labels: str) -> float:
    found = [s.value for s in family.samples if s.labels == labels]
    assert len(found) == 1, (labels, family.samples)
    return float(found[0])


def test_an_agent_round_supervises_and_exports_every_family(
    tmp_path: Path,
    fake_api: int,
    fake_helper: tuple[Path, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        collectors,
        "unit_states",
        lambda units: {u: UnitSample("active", "running", 1, 5 << 20, 2.5) for u in units},
    )
    helper, requests = fake_helper
    agent = _agent(tmp_path, fake_api, helper)
    for _ in range(3):  # K = 3 failed /healthz probes in a row
        agent.collect_once()
    deadline = time.monotonic() + 10
    while not agent.supervision().restarts.get(API) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests == [API]
    agent.collect_once()  # a fourth failure: held back by the backoff, not restarted
    time.sleep(0.2)
    assert requests == [API]

    f = _families(agent)
    assert _value(f["stellarbase_supervisor_restarts"], unit=API) == 1
    assert _value(f["stellarbase_supervisor_consecutive_failures"], unit=API) == 1
    assert _value(f["stellarbase_service_healthy"], unit=API) == 0
    assert _value(f["stellarbase_service_ready"], unit=API) == 1
    assert _value(f["stellarbase_unit_state"], unit=API, state="active") == 1
    assert _value(f["stellarbase_unit_state"], unit=API, state="failed") == 0
    assert _value(f["stellarbase_unit_cpu_seconds"], unit=API) == 2.5
    assert _value(f["stellarbase_host_ready"]) == 1
    assert f["stellarbase_host_memory_total_bytes"].samples[0].value > 0
    assert {s.labels["period"] for s in f["stellarbase_host_load_average"].samples} == {
        "1m",
        "5m",
        "15m",
    }
    success = {s.labels["collector"]: s.value for s in f["stellarbase_collector_success"].samples}
    assert success == {"units": 1, "services": 1, "host": 1, "gpus": 1}


def test_gpu_families_carry_one_series_per_gpu_and_mig_instance(
    tmp_path: Path,
    fake_api: int,
    fake_helper: tuple[Path, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(collectors, "unit_states", lambda units: {})
    agent = _agent(tmp_path, fake_api, fake_helper[0])
    agent.collect_once()
    f = _families(agent)
    info = {s.labels["uuid"]: s.labels for s in f["stellarbase_gpu_info"].samples}
    assert sorted(info) == ["GPU-aaaa", "GPU-bbbb", "MIG-b001", "MIG-b002", "MIG-b003"]
    assert info["MIG-b002"] == {
        "uuid": "MIG-b002",
        "gpu_uuid": "GPU-bbbb",
        "index": "1",
        "name": "NVIDIA A100-SXM4-80GB",
        "mig": "true",
    }
    assert info["GPU-aaaa"]["mig"] == "false"
    total = {s.labels["uuid"]: s.value for s in f["stellarbase_gpu_memory_total_bytes"].samples}
    assert total["MIG-b003"] == 40 * GIB and total["GPU-aaaa"] == 48 * GIB
    assert len(f["stellarbase_gpu_memory_used_bytes"].samples) == 5
    assert _value(f["stellarbase_gpu_utilization_ratio"], uuid="GPU-aaaa") == 0.5
    assert _value(f["stellarbase_gpu_temperature_celsius"], uuid="GPU-aaaa") == 61
    assert _value(f["stellarbase_gpu_power_watts"], uuid="GPU-aaaa") == 210.5
    assert _value(f["stellarbase_gpu_xid_errors"], uuid="GPU-aaaa") == 2
    assert _value(f["stellarbase_gpu_ecc_errors"], uuid="GPU-aaaa") == 0


def test_a_failing_collector_leaves_its_families_out_and_says_so(
    tmp_path: Path,
    fake_api: int,
    fake_helper: tuple[Path, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(units: list[str]) -> dict[str, UnitSample]:
        raise RuntimeError("systemctl: Failed to connect to bus")

    monkeypatch.setattr(collectors, "unit_states", broken)
    agent = _agent(tmp_path, fake_api, fake_helper[0])
    agent.collect_once()
    f = _families(agent)
    assert "stellarbase_unit_active" not in f
    assert _value(f["stellarbase_collector_success"], collector="units") == 0
    assert _value(f["stellarbase_collector_success"], collector="host") == 1
    assert _value(f["stellarbase_host_ready"]) == 0
    code, body, _ = agent.readyz({"verbose": [""]})
    assert code == 503
    assert "[-]unit:stellarbase-api.service failed: unit states unknown: systemctl" in body.decode()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_finds_nothing_to_complain_about(
    tmp_path: Path,
    fake_api: int,
    fake_helper: tuple[Path, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        collectors,
        "unit_states",
        lambda units: {u: UnitSample("active", "running", 0, 1 << 20, 0.5) for u in units},
    )
    agent = _agent(tmp_path, fake_api, fake_helper[0])
    agent.collect_once()
    scrape = generate_latest(agent.registry)
    lint = subprocess.run(
        ["promtool", "check", "metrics"], input=scrape, capture_output=True, check=False
    )
    assert lint.returncode == 0 and lint.stdout + lint.stderr == b"", lint.stdout + lint.stderr
