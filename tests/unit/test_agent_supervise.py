"""Supervision decisions with a fake clock, and the root helper's refusals."""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from stellarbase.agent import helper
from stellarbase.agent.supervise import Action, Policy, Supervisor
from stellarbase.agent.targets import Target, Targets, render_targets, targets_file
from stellarbase.paths import HostPaths

API = "stellarbase-api.service"


def _fail_until_restart(s: Supervisor, now: float) -> tuple[float, list[Action]]:
    actions = []
    while True:
        d = s.observe(API, active=True, healthy=False, now=now)
        actions.append(d.action)
        if d.action == Action.RESTART:
            return now, actions
        now += 5


def test_restart_after_k_failures_in_a_row_only() -> None:
    s = Supervisor(Policy(failures=3, backoff=10, backoff_max=60))
    assert s.observe(API, active=True, healthy=False, now=0).action == Action.NONE
    assert s.observe(API, active=True, healthy=False, now=5).action == Action.NONE
    assert s.consecutive_failures() == {API: 2}
    assert s.observe(API, active=True, healthy=True, now=10).action == Action.NONE  # resets
    assert s.consecutive_failures() == {API: 0}
    s.observe(API, active=True, healthy=False, now=15)
    s.observe(API, active=True, healthy=False, now=20)
    d = s.observe(API, active=True, healthy=False, now=25)
    assert (d.action, d.failures) == (Action.RESTART, 3)
    assert s.consecutive_failures() == {API: 0}


def test_restarts_of_one_unit_back_off_doubling_up_to_the_cap() -> None:
    s = Supervisor(Policy(failures=1, backoff=10, backoff_max=40))
    times = []
    now = 0.0
    for _ in range(5):
        now, _ = _fail_until_restart(s, now)
        times.append(now)
        now += 5  # the next probe
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == [10, 20, 40, 40]
    d = s.observe(API, active=True, healthy=False, now=times[-1] + 5)
    assert d.action == Action.BACKOFF and d.wait == 35


def test_a_unit_that_is_not_active_is_left_alone() -> None:
    s = Supervisor(Policy(failures=2, backoff=10, backoff_max=60))
    for state_now in range(0, 100, 5):
        d = s.observe(API, active=False, healthy=False, now=state_now)
        assert d.action == Action.LEAVE
    assert s.consecutive_failures() == {API: 0}


def test_a_unit_healthy_for_the_longest_pause_starts_over() -> None:
    s = Supervisor(Policy(failures=1, backoff=10, backoff_max=40))
    now, _ = _fail_until_restart(s, 0)
    now, _ = _fail_until_restart(s, now + 5)  # second restart: streak 2
    s.observe(API, active=True, healthy=True, now=now + 5)
    s.observe(API, active=True, healthy=True, now=now + 45)
    d = s.observe(API, active=True, healthy=False, now=now + 50)
    assert d.action == Action.RESTART  # no pause: the streak started over


def _paths(tmp_path: Path) -> HostPaths:
    paths = HostPaths(tmp_path)
    path = targets_file(paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    targets = Targets(
        units=(
            Target(unit="stellarbase-redis.service"),
            Target(unit="stellarbase-agent.service", port=1, probe=True),
            Target(unit=API, port=2, probe=True),
        )
    )
    path.write_text(render_targets(targets))
    return paths


def _ask(
    tmp_path: Path, request: bytes, active: bool = True, **kwargs: Any
) -> tuple[bool, str, list[str]]:
    """One request over a real socket, as the agent's connection reaches the helper."""
    done: list[str] = []
    server, client = socket.socketpair()
    client.sendall(request)
    client.shutdown(socket.SHUT_WR)
    with server, client, server.makefile("rb") as rfile, server.makefile("wb") as wfile:
        ok = helper.serve_connection(
            rfile, wfile, _paths(tmp_path), restart=done.append, active=lambda _: active, **kwargs
        )
        reply = json.loads(client.recv(65536))
    assert reply["ok"] is ok
    return ok, reply["message"], done


def test_the_helper_restarts_a_supervised_service(tmp_path: Path) -> None:
    ok, message, done = _ask(tmp_path, b'{"restart": "stellarbase-api.service"}\n')
    assert ok and done == [API]
    assert "try-restart" in message


def test_the_helper_refuses_anything_else(tmp_path: Path) -> None:
    for request in (
        b'{"restart": "stellarbase-redis.service"}\n',  # a dependency, not a probed service
        b'{"restart": "stellarbase-agent.service"}\n',  # never itself
        b'{"restart": "ssh.service"}\n',
        b'{"restart": ["x"]}\n',
        b"restart ssh\n",
    ):
        ok, _, done = _ask(tmp_path, request)
        assert not ok and done == [], request


def test_the_helper_leaves_a_stopped_service_stopped(tmp_path: Path) -> None:
    ok, message, done = _ask(tmp_path, b'{"restart": "stellarbase-api.service"}\n', active=False)
    assert not ok and done == []
    assert "not active" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="a caller of another uid needs root to make")
def test_the_helper_answers_no_uid_but_the_agents(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    name = f"\0stellarbase-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(name)
        listener.listen(1)
        child = os.fork()
        if child == 0:  # another local user who can reach the socket
            try:
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(name)
                    s.sendall(json.dumps({"restart": API}).encode() + b"\n")
                    s.recv(4096)
            finally:
                os._exit(0)
        conn, _ = listener.accept()
        done: list[str] = []
        with conn, conn.makefile("rb") as rfile, conn.makefile("wb") as wfile:
            ok = helper.serve_connection(
                rfile, wfile, paths, restart=done.append, active=lambda _: True
            )
        os.waitpid(child, 0)
    assert not ok and done == []


@pytest.mark.slow  # waits out the helper's read deadline
def test_a_caller_that_never_finishes_its_request_is_cut(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    server, client = socket.socketpair()
    result: list[bool] = []
    with server, client, server.makefile("rb") as rfile, server.makefile("wb") as wfile:
        worker = threading.Thread(
            target=lambda: result.append(
                helper.serve_connection(rfile, wfile, paths, restart=print, active=bool)
            ),
            daemon=True,
        )
        started = time.monotonic()
        worker.start()
        while worker.is_alive() and time.monotonic() - started < helper.READ_SECONDS + 3:
            client.sendall(b" ")  # a byte now and then, never a whole line
            worker.join(0.5)
        elapsed, waiting = time.monotonic() - started, worker.is_alive()
        client.close()  # whatever happened: frees a helper still blocked in a read
        worker.join(5)
        assert not waiting, "the helper still waits for the request"
        assert elapsed <= helper.READ_SECONDS + 1, elapsed
    assert result == [False]


def test_the_helper_restarts_one_unit_only_so_often(tmp_path: Path) -> None:
    request = json.dumps({"restart": API}).encode() + b"\n"
    answers = [_ask(tmp_path, request) for _ in range(helper.RATE_LIMIT + 2)]
    assert [ok for ok, _, _ in answers] == [True] * helper.RATE_LIMIT + [False, False]
    assert "restarted 3 times" in answers[-1][1]
    later = time.monotonic() + helper.RATE_WINDOW
    ok, _, done = _ask(tmp_path, request, clock=lambda: later)
    assert ok and done == [API]  # the window has passed
