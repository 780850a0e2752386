"""sd_notify: a notify socket that vanishes (systemd re-executing, a test harness gone)
costs one log line, not the service."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import structlog

from stellarbase import notify


def test_a_vanished_socket_is_logged_once_and_survived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    with structlog.testing.capture_logs() as logs:
        assert notify.notify("READY=1") is True
        sock.close()
        path.unlink()
        assert notify.notify("WATCHDOG=1") is False
        assert notify.notify("WATCHDOG=1") is False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        assert notify.notify("WATCHDOG=1") is True
    sock.close()
    assert [entry["event"] for entry in logs] == [
        "cannot notify systemd; going on without it",
        "notifying systemd again",
    ]
