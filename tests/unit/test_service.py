"""The service runtime in-process: endpoints, readiness, sd_notify and clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stellarbase.service_settings import ServiceSettings
from stellarbase.verify import probe
from tests.servers import free_port


def _settings(tmp_path: Path, port: int, **deps: object) -> Path:
    data = {
        "service": "worker",
        "bind": "127.0.0.1",
        "port": port,
        "log_level": "info",
        "check_timeout_seconds": 1,
        **deps,
    }
    path = tmp_path / "worker.json"
    path.write_text(json.dumps(data))
    return path


def test_secrets_come_from_the_environment() -> None:
    settings = ServiceSettings.model_validate(
        {
            "service": "api",
            "bind": "127.0.0.1",
            "port": 1000,
            "log_level": "info",
            "check_timeout_seconds": 1,
            "s3": {"endpoint": "http://127.0.0.1:1", "bucket": "b-1"},
            "redis": {"url": "redis://127.0.0.1:1/0"},
        }
    ).with_secrets(
        {
            "STELLARBASE_S3__ACCESS_KEY": "ak",
            "STELLARBASE_S3__SECRET_KEY": "sk",
            "STELLARBASE_REDIS__PASSWORD": "rp",
        }
    )
    assert settings.s3 and settings.s3.access_key and settings.s3.secret_key
    assert settings.s3.access_key.get_secret_value() == "ak"
    assert settings.s3.secret_key.get_secret_value() == "sk"
    assert settings.redis and settings.redis.password
    assert settings.redis.password.get_secret_value() == "rp"


def test_worker_instance_serves_health_readiness_metrics_and_notifies(
    tmp_path: Path, dead_port: int
) -> None:
    base = free_port()
    settings = _settings(
        tmp_path, base, redis={"url": f"redis://127.0.0.1:{dead_port}/0", "password": None}
    )
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": "400000",  # a ping every 0.2 s
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stellarbase",
            "run",
            "worker",
            "--instance",
            "2",
            "--settings",
            str(settings),
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert b"READY=1" in notify.recv(4096)
        assert b"WATCHDOG=1" in notify.recv(4096)
        url = f"http://127.0.0.1:{base + 1}"  # instance 2 listens on port + 1
        assert probe(f"{url}/healthz")[0] == 200
        code, body = probe(f"{url}/readyz")
        assert code == 503
        check = json.loads(body)["checks"][0]
        assert check["name"] == "redis" and check["status"] == "fail"
        families = {f.name: f for f in text_string_to_metric_families(probe(f"{url}/metrics")[1])}
        up = families["stellarbase_dependency_up"].samples[0]
        assert up.labels == {"dependency": "redis"} and up.value == 0
        assert families["stellarbase_build_info"].samples[0].labels["service"] == "worker"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert b"STOPPING=1" in b"".join(_drain(notify))
        logs = [
            json.loads(line) for line in (proc.stdout.read() if proc.stdout else "").splitlines()
        ]
        assert any(entry["event"] == "service started" for entry in logs)
        assert all("correlation_id" in entry for entry in logs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def _drain(sock: socket.socket) -> list[bytes]:
    sock.settimeout(0.5)
    out = []
    try:
        while True:
            out.append(sock.recv(4096))
    except TimeoutError:
        return out


@pytest.mark.integration
def test_ready_when_dependencies_answer(
    tmp_path: Path, site_deps: dict[str, dict[str, str]]
) -> None:
    port = free_port()
    pg, rd = site_deps["postgres"], site_deps["redis"]
    settings = _settings(tmp_path, port, postgres={"url": pg["url"]}, redis={"url": rd["url"]})
    env = {
        **os.environ,
        "STELLARBASE_POSTGRES__PASSWORD": pg["password"],
        "STELLARBASE_REDIS__PASSWORD": rd["password"],
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "stellarbase", "run", "worker", "--settings", str(settings)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        code, body = 0, ""
        while time.monotonic() < deadline and code != 200:
            code, body = probe(f"http://127.0.0.1:{port}/readyz")
            time.sleep(0.1)
        assert code == 200, body
        assert [c["name"] for c in json.loads(body)["checks"]] == ["postgres", "redis"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_unreadable_settings_is_a_config_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stellarbase", "run", "api", "--settings", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 3 and "no such settings file" in out.stderr


_REENTERED_STOP = """
import os, signal, sys, threading, time
from types import SimpleNamespace
from stellarbase.service_runtime import Service

class SignalledInsideSet(threading.Event):
    # The second SIGTERM lands while set() holds the event's lock, as it did when systemd
    # and the bootloader both signalled the service.
    def set(self):
        with self._cond:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the main thread runs any pending handler meanwhile
            self._flag = True
            self._cond.notify_all()

service = SimpleNamespace(_stop=SignalledInsideSet())
Service._stop_on_signals(service)
os.kill(os.getpid(), signal.SIGTERM)
sys.exit(0 if service._stop.wait(5) else 1)
"""


def test_a_stop_signal_inside_the_stop_itself_does_not_hang() -> None:
    """However many SIGTERMs arrive, and whenever, the service stops: a handler that set the
    Event itself was re-entered inside that Event's lock and hung until SIGKILL."""
    result = subprocess.run(
        [sys.executable, "-c", _REENTERED_STOP], timeout=30, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
