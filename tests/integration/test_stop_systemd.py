"""A stop or restart of a service unit signals its one-file binary once, and is quick.

The one-file binary runs as a bootloader (the unit's MainPID) that forwards every signal to
its Python child. Had systemd also signalled the child itself (KillMode=control-group),
the child would get two SIGTERMs a moment apart; the second could interrupt the handler of
the first inside the stop event's lock, deadlocking the child until TimeoutStopSec= (30 s)
killed it: an install that restarted a service then took 30 s longer, now and then.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from stellarbase import config as cfg
from stellarbase import configload, layout, render
from stellarbase.paths import GROUP, SERVICE_USERS, HostPaths
from tests.integration.conftest import copy_binary, free_port_block, ready, wait_for
from tests.systemd_sandbox import SystemdSandbox

pytestmark = [pytest.mark.systemd]

WORKER = "stellarbase-worker@1.service"
TEMPLATE = "stellarbase-worker@.service"
RESTARTS = 3  # with the first start, under the unit's StartLimitBurst=

# Stands in for the one-file binary: a parent (MainPID) that forwards SIGTERM to its child,
# as PyInstaller's bootloader does, and a child that says who signalled it.
FORWARDER = r"""
import os, signal, socket, sys, time

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
child = os.fork()
if child == 0:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.connect(os.environ["NOTIFY_SOCKET"].replace("@", "\0", 1))
    sock.send(b"READY=1")
    senders = []
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, 1.0 if senders else 600.0)
        if info is None:
            break
        senders.append(info.si_pid)
    who = {1: "systemd", os.getppid(): "parent"}
    print("child got SIGTERM from " + ",".join(who.get(p, str(p)) for p in senders), flush=True)
    sys.exit(0)
signal.sigwait({signal.SIGTERM})
time.sleep(0.5)  # a SIGTERM systemd sent the child itself comes first, and is told apart
os.kill(child, signal.SIGTERM)
os.waitpid(child, 0)
"""


def _config(port: int) -> cfg.Config:
    sets = [f"api.port={port}", f"agent.port={port + 1}", f"worker.port={port + 2}"]
    return configload.load_config(tier="pilot", sets=sets, env={}).config


def _install_worker_unit(sandbox: SystemdSandbox, config: cfg.Config, exec_start: str) -> None:
    """The worker unit as install renders it, with no dependency units and another command."""
    unit = render.render_units(config, HostPaths(), layout.LocalServers())[TEMPLATE]
    unit = re.sub(r"(?m)^ExecStart=.*$", lambda _: f"ExecStart={exec_start}", unit)
    unit = re.sub(r"(?m)^EnvironmentFile=.*\n", "", unit)
    sandbox.path(f"/etc/systemd/system/{TEMPLATE}").write_text(unit)
    sandbox.systemctl("daemon-reload")


def _add_users(sandbox: SystemdSandbox) -> None:
    """The accounts the worker unit names: its own user, and the group of the site config."""
    user = SERVICE_USERS["worker"]
    sandbox.run(["systemd-sysusers", "--inline", f"u {user} - -", f"g {GROUP} -"])


def _journal(sandbox: SystemdSandbox, unit: str) -> str:
    return sandbox.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit]).stdout


def test_a_stop_signals_the_child_once_through_its_parent(systemd_sandbox: SystemdSandbox) -> None:
    sandbox = systemd_sandbox
    sandbox.path("/usr/local/bin/forwarder.py").write_text(FORWARDER)
    _add_users(sandbox)
    _install_worker_unit(sandbox, _config(20000), "/usr/bin/python3 /usr/local/bin/forwarder.py")
    sandbox.systemctl("start", WORKER)
    sandbox.systemctl("stop", WORKER)
    said = [line for line in _journal(sandbox, WORKER).splitlines() if "child got" in line]
    assert said == ["child got SIGTERM from parent"], _journal(sandbox, WORKER)


def test_restarts_of_the_real_binary_stop_cleanly_and_quickly(
    systemd_sandbox: SystemdSandbox, binary: Path
) -> None:
    """The real bootloader forwards the stop to its child, which exits on its own."""
    sandbox = systemd_sandbox
    inside = copy_binary(sandbox, binary)
    _add_users(sandbox)
    port = free_port_block(3)
    config = _config(port)
    settings = sandbox.path("/etc/stellarbase-test/worker.json")
    settings.parent.mkdir(parents=True)
    settings.write_text(render.render_service_settings(config, "worker"))
    settings.chmod(0o644)
    command = f"{inside} run worker --instance %i --settings /etc/stellarbase-test/worker.json"
    _install_worker_unit(sandbox, config, command)
    url = f"http://127.0.0.1:{port + 2}"
    sandbox.systemctl("start", WORKER)
    wait_for("the worker to answer", lambda: ready(url))
    for _ in range(RESTARTS):
        start = time.monotonic()
        sandbox.systemctl("restart", WORKER)
        took = time.monotonic() - start
        assert took < 10, f"a restart took {took:.1f}s:\n{_journal(sandbox, WORKER)[-3000:]}"
        wait_for("the worker to answer", lambda: ready(url))
    journal = _journal(sandbox, WORKER)
    assert journal.count('"service stopping"') == RESTARTS, journal[-3000:]
    assert "timed out" not in journal and "SIGKILL" not in journal, journal[-3000:]
