"""What a network peer can do to the agent: its token-free listener stays on loopback, and
no connection to the remote listener, however idle or slow, holds up a scrape."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stellarbase.agent.remote import CONNECTION_SECONDS, MAX_CONNECTIONS
from stellarbase.commands.install import make_plan
from stellarbase.configload import load_config
from stellarbase.paths import HostPaths
from tests.servers import free_port
from tests.unit.test_agent_remote import TOKEN, _get, _self_signed

LISTEN = "0A"


class RunningAgent:
    def __init__(self, proc: subprocess.Popen[bytes], local: int, remote: int | None) -> None:
        self.proc, self.local, self.remote = proc, local, remote

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))


def _start(tmp_path: Path, *, bind: str, remote: bool = False, tls: bool = False) -> RunningAgent:
    local = free_port()
    agent: dict[str, Any] = {
        "interval_seconds": 1,
        "restart_after_failures": 3,
        "restart_backoff_seconds": 10,
        "restart_backoff_max_seconds": 600,
    }
    remote_port = free_port() if remote else None
    if remote_port:
        agent.update(remote_port=remote_port, remote_bind="127.0.0.1")
    if tls:
        cert, key = _self_signed(tmp_path)
        agent.update(tls_cert=str(cert), tls_key=str(key))
    settings = tmp_path / "agent.json"
    settings.write_text(
        json.dumps(
            {
                "service": "agent",
                "bind": bind,
                "port": local,
                "log_level": "warning",
                "check_timeout_seconds": 1,
                "agent": agent,
            }
        )
    )
    env = {**os.environ, "STELLARBASE_AGENT__METRICS_TOKEN": TOKEN}
    argv = [sys.executable, "-m", "stellarbase", "run", "agent", "--settings", str(settings)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    running = RunningAgent(proc, local, remote_port)
    deadline = time.monotonic() + 30
    while not (_healthy(local) and (remote_port is None or _accepting(remote_port))):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the agent never answered"
        time.sleep(0.2)
    return running


def _accepting(port: int) -> bool:
    """The remote listener opens after the local one: wait for it too."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _healthy(port: int) -> bool:
    try:
        return _get(f"http://127.0.0.1:{port}/healthz") == 200
    except OSError:
        return False


@pytest.fixture
def agents() -> Iterator[list[RunningAgent]]:
    started: list[RunningAgent] = []
    yield started
    for a in started:
        a.proc.terminate()
        a.proc.wait(timeout=30)


def _listening(port: int) -> set[str]:
    """Local addresses of the host's TCP sockets listening on `port` (hex, as /proc has them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hexport = local.split(":")
                if int(hexport, 16) == port and state == LISTEN:
                    found.add(address)
    return found


def test_bind_all_leaves_the_agents_plain_listener_on_loopback(
    tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agent = _start(tmp_path, bind="0.0.0.0")
    agents.append(agent)
    assert _listening(agent.local) == {"0100007F"}  # 127.0.0.1, and nothing else


@pytest.mark.host_commands  # the plan looks for the local server binaries
def test_the_install_gate_reaches_the_agent_on_loopback(tmp_path: Path) -> None:
    binary = tmp_path / "stellarbase-bin"
    binary.write_bytes(b"#!/bin/sh\n")
    for bind, api in (("0.0.0.0", "127.0.0.1"), ("192.0.2.7", "192.0.2.7")):
        loaded = load_config(sets=[f"bind={bind}"], env={})
        plan = make_plan(loaded, HostPaths(tmp_path / bind), binary)
        endpoints = dict(plan.endpoints)
        assert endpoints["stellarbase-agent.service"].startswith("http://127.0.0.1:"), bind
        assert endpoints["stellarbase-api.service"].startswith(f"http://{api}:"), bind


def test_an_idle_connection_does_not_block_a_tls_scrape(
    tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agent = _start(tmp_path, bind="127.0.0.1", remote=True, tls=True)
    agents.append(agent)
    base = f"https://127.0.0.1:{agent.remote}"
    with socket.create_connection(("127.0.0.1", agent.remote or 0)):  # says nothing at all
        time.sleep(0.5)
        started = time.monotonic()
        assert _get(f"{base}/metrics", TOKEN) == 200
        assert time.monotonic() - started < 2


def test_idle_connections_beyond_the_cap_neither_add_threads_nor_linger(
    tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agent = _start(tmp_path, bind="127.0.0.1", remote=True)
    agents.append(agent)
    time.sleep(2.0)  # a few rounds: the collectors' threads are all there
    before = agent.threads()
    extra = 10
    conns = [
        socket.create_connection(("127.0.0.1", agent.remote or 0), timeout=5)
        for _ in range(MAX_CONNECTIONS + extra)
    ]
    try:
        time.sleep(1.0)
        # One worker per connection up to the cap (a collector thread or two of slack).
        assert agent.threads() <= before + MAX_CONNECTIONS + 2, (before, agent.threads())
        closed = 0
        for conn in conns:
            conn.settimeout(0.05)
            try:
                closed += conn.recv(1) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= extra  # over the cap: closed at once, not queued
    finally:
        for conn in conns:
            conn.close()
    # Once the idle ones are gone, scrapes are served again.
    deadline = time.monotonic() + CONNECTION_SECONDS + 5
    while _get(f"http://127.0.0.1:{agent.remote}/metrics", TOKEN) != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_request_dripped_a_byte_at_a_time_is_cut_at_the_deadline(
    tmp_path: Path, agents: list[RunningAgent]
) -> None:
    agent = _start(tmp_path, bind="127.0.0.1", remote=True)
    agents.append(agent)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", agent.remote or 0), timeout=5) as conn:
        conn.sendall(b"GET /metrics HTTP/1.0\r\n")
        cut = None
        while time.monotonic() - started < CONNECTION_SECONDS + 5:
            try:
                conn.sendall(b"X")  # a header that never ends, one byte each half second
                conn.settimeout(0.5)
                if conn.recv(1) == b"":
                    cut = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                cut = time.monotonic() - started
                break
    assert cut is not None, "the dripping request was never cut"
    assert cut <= CONNECTION_SECONDS + 1.0, cut
