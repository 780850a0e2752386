"""The service runtime without a listener: settings, secrets and a clean stop. A running
service's endpoints and readiness are in tests/integration/test_service.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stellarbase.service_settings import ServiceSettings


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
