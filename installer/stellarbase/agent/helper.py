"""The root side of supervision: one request on stdin, one answer on stdout.

Run by `stellarbase-supervise@.service` (socket-activated, Accept=yes) as root: the
connection is its stdin and stdout. It restarts only a service the agent probes (from the
agent's units file) and only while it runs: `systemctl try-restart` leaves a stopped unit
stopped. Anything else is refused, so the group that may write to the socket can do no
more than the agent's own supervision would, and even the agent's uid cannot do more:

- only the agent's user (or root) may ask: the peer's uid comes from SO_PEERCRED;
- the request must arrive within READ_SECONDS, in at most MAX_REQUEST bytes;
- a unit is restarted at most RATE_LIMIT times per RATE_WINDOW seconds, so a caller that
  asks in a loop cannot push it into its start limit (StartLimitBurst=5 in 300 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import socket
import struct
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import BinaryIO

import structlog

from stellarbase import systemd
from stellarbase.agent.targets import Targets, TargetsReader, targets_file
from stellarbase.paths import AGENT_USER, HostPaths
from stellarbase.proc import CommandError, run

log = structlog.get_logger()

MAX_REQUEST = 4096
READ_SECONDS = 5.0
RATE_LIMIT = 3  # restarts of one unit …
RATE_WINDOW = 300.0  # … per this many seconds
# RuntimeDirectory= of the helper's unit (root's, kept between requests, gone at reboot).
RATE_STATE = Path("/run/stellarbase-supervise/restarts.json")


def answer(
    request: bytes,
    targets: Targets,
    restart: Callable[[str], None],
    active: Callable[[str], bool],
    allow: Callable[[str], str | None] = lambda _: None,
) -> tuple[bool, str]:
    """Check the request and act on it; the reason when refused. `allow` is the rate
    limit: the reason a restart of that unit must wait, or None."""
    try:
        unit = json.loads(request)["restart"]
    except (ValueError, KeyError, TypeError):
        return False, 'bad request: expected {"restart": UNIT}'
    if not isinstance(unit, str):
        return False, "bad request: the unit must be a string"
    allowed = {t.unit for t in targets.probed()}
    if unit not in allowed:
        return False, f"{unit} is not a service the agent supervises"
    if not active(unit):
        return False, f"{unit} is not active: left alone"
    if (wait := allow(unit)) is not None:
        return False, wait
    try:
        restart(unit)
    except CommandError as exc:
        return False, exc.message
    return True, f"try-restart {unit} queued"


def is_active(unit: str) -> bool:
    return systemd.show([unit])[unit].active


def try_restart(unit: str) -> None:
    # --no-block: the answer does not wait for a slow stop; try-restart: not running, no-op.
    run(["systemctl", "try-restart", "--no-block", "--", unit], timeout=20)


def agent_uids() -> frozenset[int]:
    """Who may ask: root, and the agent's user where it exists."""
    try:
        return frozenset({0, pwd.getpwnam(AGENT_USER).pw_uid})
    except KeyError:
        return frozenset({0})


def peer_uid(sock: socket.socket) -> int | None:
    """The connecting process's uid, from the kernel (SO_PEERCRED); None if not known."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def read_request(sock: socket.socket, seconds: float = READ_SECONDS) -> bytes | None:
    """One line of at most MAX_REQUEST bytes, within `seconds` in all; None if not."""
    deadline = time.monotonic() + seconds
    data = b""
    while b"\n" not in data and len(data) < MAX_REQUEST:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(MAX_REQUEST - len(data))
        except TimeoutError:
            return None
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


class RateLimit:
    """Restarts per unit in a sliding window, kept in a root-owned file across requests
    (each request is a process of its own); the lock serializes concurrent requests."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock

    def take(self, unit: str) -> str | None:
        """Count a restart of `unit` now, or say why it must wait."""
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                seen = json.loads(f.read() or "{}")
                stamps = [float(t) for t in seen.get(unit, [])]
            except (ValueError, TypeError, AttributeError):
                seen, stamps = {}, []  # unreadable: start over rather than refuse forever
            now = self.clock()
            stamps = [t for t in stamps if 0 <= now - t < RATE_WINDOW]
            if len(stamps) >= RATE_LIMIT:
                wait = RATE_WINDOW - (now - stamps[0])
                return (
                    f"{unit} was restarted {len(stamps)} times in {RATE_WINDOW:.0f} s: "
                    f"the next restart in {wait:.0f} s at the earliest"
                )
            seen[unit] = [*stamps, now]
            f.seek(0)
            f.truncate()
            f.write(json.dumps(seen))
        return None


def serve_connection(
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    paths: HostPaths | None = None,
    restart: Callable[[str], None] = try_restart,
    active: Callable[[str], bool] = is_active,
    *,
    allowed_uids: Collection[int] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    reader = stdin or sys.stdin.buffer
    writer = stdout or sys.stdout.buffer
    paths = paths or HostPaths()
    limit = RateLimit(paths.at(RATE_STATE), clock)
    ok, message = _handle(reader, paths, restart, active, allowed_uids or agent_uids(), limit)
    (log.info if ok else log.warning)("supervise request", ok=ok, message=message)
    with contextlib.suppress(OSError):  # a caller that left does not need the answer
        writer.write(json.dumps({"ok": ok, "message": message}).encode() + b"\n")
        writer.flush()
    return ok


def _handle(
    reader: BinaryIO,
    paths: HostPaths,
    restart: Callable[[str], None],
    active: Callable[[str], bool],
    allowed_uids: Collection[int],
    limit: RateLimit,
) -> tuple[bool, str]:
    try:
        sock = socket.socket(fileno=os.dup(reader.fileno()))
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return False, "refused: the request did not come over a socket"
    with sock:
        uid = peer_uid(sock)
        if uid is None or uid not in allowed_uids:
            return False, f"refused: uid {uid} is not the agent's"
        request = read_request(sock)
        if request is None:
            return False, f"refused: no request within {READ_SECONDS:.0f} s"
    targets = TargetsReader(targets_file(paths)).read()
    return answer(request, targets, restart, active, limit.take)
