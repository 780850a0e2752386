"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

Used by the services' and the agent's loops (`service`, `agent.runtime`). A notification
that cannot be sent (the socket vanished, systemd is restarting, its queue is full) must
not end the loop that sends it: it is logged once, until one gets through again, and the
caller goes on. systemd's watchdog is what notices a service that stays silent.
"""

from __future__ import annotations

import os
import socket
import threading

import structlog

_SEND_TIMEOUT = 1.0  # a full queue must not hold the watchdog loop
_log = structlog.get_logger()
_failing = threading.Event()  # set while notifications fail: log the first failure only


def notify(*fields: str) -> bool:
    """Send `READY=1`-style fields; False when not run by systemd (no socket) or when the
    notification could not be sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        if not _failing.is_set():
            _failing.set()
            _log.warning(
                "cannot notify systemd; going on without it",
                socket=os.environ.get("NOTIFY_SOCKET"),
                error=exc.strerror or type(exc).__name__,
            )
        return False
    if _failing.is_set():
        _failing.clear()
        _log.info("notifying systemd again", socket=os.environ.get("NOTIFY_SOCKET"))
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when not asked for.

    WATCHDOG_PID is not compared with our PID on purpose: a one-file binary runs as a
    bootloader parent (the unit's MainPID) and this Python child. The child must not take
    over with MAINPID=: systemd cannot wait() on a process that is not its child, so a
    killed child would count as a clean exit and never be restarted. The bootloader
    instead re-raises the child's fatal signal, which systemd sees on the MainPID.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 2_000_000
