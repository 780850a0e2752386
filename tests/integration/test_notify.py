"""A real service process outlives the notify socket systemd gave it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from stellarbase.verify import probe
from tests.servers import free_port


def test_a_service_outlives_its_notify_socket(tmp_path: Path) -> None:
    port = free_port()
    settings = tmp_path / "worker.json"
    settings.write_text(
        json.dumps(
            {
                "service": "worker",
                "bind": "127.0.0.1",
                "port": port,
                "log_level": "info",
                "check_timeout_seconds": 1,
            }
        )
    )
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
    argv = [sys.executable, "-m", "stellarbase", "run", "worker", "--settings", str(settings)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert b"READY=1" in sock.recv(4096)
        sock.close()
        path.unlink()
        time.sleep(1.5)  # some 15 watchdog pings into the void
        assert proc.poll() is None, "the service died with its notify socket"
        assert probe(f"http://127.0.0.1:{port}/healthz")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        out = proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line)["event"] for line in out.splitlines()]
    assert events.count("cannot notify systemd; going on without it") == 1
