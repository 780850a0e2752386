"""The root side of supervision: one request on stdin, one answer on stdout.

Run by `stellarbase-supervise@.service` (socket-activated, Accept=yes) as root: the
connection is its stdin and stdout. It restarts only a service the agent probes (from the
agent's units file) and only while it runs: `systemctl try-restart` leaves a stopped unit
stopped. Anything else is refused, so the group that may write to the socket can do no
more than the agent's own supervision would.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import BinaryIO

import structlog

from stellarbase import systemd
from stellarbase.agent.targets import Targets, TargetsReader, targets_file
from stellarbase.paths import HostPaths
from stellarbase.run import CommandError, run

log = structlog.get_logger()

MAX_REQUEST = 4096


def answer(
    request: bytes,
    targets: Targets,
    restart: Callable[[str], None],
    active: Callable[[str], bool],
) -> tuple[bool, str]:
    """Check the request and act on it; the reason when refused."""
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


def serve_connection(
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    paths: HostPaths | None = None,
    restart: Callable[[str], None] = try_restart,
    active: Callable[[str], bool] = is_active,
) -> bool:
    reader = stdin or sys.stdin.buffer
    writer = stdout or sys.stdout.buffer
    request = reader.readline(MAX_REQUEST)
    targets = TargetsReader(targets_file(paths or HostPaths())).read()
    ok, message = answer(request, targets, restart, active)
    (log.info if ok else log.warning)("supervise request", ok=ok, message=message)
    writer.write(json.dumps({"ok": ok, "message": message}).encode() + b"\n")
    writer.flush()
    return ok
