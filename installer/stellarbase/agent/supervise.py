"""Health-aware supervision: when to restart a service, and asking root to do it.

systemd restarts a service whose process dies or stops pinging the watchdog; it cannot see
a process that lives on while its /healthz fails. The agent probes /healthz every round and,
after K failures in a row, asks for a restart, with a doubling pause between restarts of one
unit (capped). A unit that is not active — stopped by an admin, failed, stopping, starting —
is never started or restarted: its failures are not even counted.

The agent runs as the unprivileged `stellarbase` user with no capabilities and
NoNewPrivileges, so it cannot restart a system unit itself (polkit would be needed for
that over D-Bus, and hosts without polkit exist). Instead it writes one request to the
socket of `stellarbase-supervise.socket`, owned by root and group stellarbase (0660).
systemd starts one `stellarbase-supervise@.service` per connection, as root: it accepts
only a service of the agent's units file and runs `systemctl try-restart`, which restarts
a running unit and leaves a stopped one alone, so even a racing admin's stop wins.
"""

from __future__ import annotations

import enum
import json
import socket
from dataclasses import dataclass
from pathlib import Path

from stellarbase.service_settings import AgentSettings


class Action(enum.StrEnum):
    NONE = "none"  # healthy, or failing fewer than K times
    LEAVE = "leave"  # not active: an admin's (or systemd's) business
    BACKOFF = "backoff"  # would restart, but the last restart was too recent
    RESTART = "restart"


@dataclass(frozen=True)
class Policy:
    failures: int  # K
    backoff: float  # seconds between the first and second restart; doubles after
    backoff_max: float

    @classmethod
    def of(cls, s: AgentSettings) -> Policy:
        return cls(
            s.restart_after_failures, s.restart_backoff_seconds, s.restart_backoff_max_seconds
        )

    def pause(self, streak: int) -> float:
        """Least time since the last restart before the next, after `streak` restarts."""
        if streak == 0:
            return 0.0
        return float(min(self.backoff * 2 ** (streak - 1), self.backoff_max))


@dataclass
class Track:
    failures: int = 0  # failed probes in a row while active
    streak: int = 0  # restarts since the unit was last steadily healthy
    last_restart: float | None = None
    healthy_since: float | None = None


@dataclass(frozen=True)
class Decision:
    action: Action
    failures: int
    wait: float = 0.0  # BACKOFF: seconds until a restart is allowed


class Supervisor:
    """The decisions alone, with time passed in: no probing, no restarting."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.tracks: dict[str, Track] = {}

    def observe(self, unit: str, *, active: bool, healthy: bool, now: float) -> Decision:
        t = self.tracks.setdefault(unit, Track())
        if not active:
            t.failures, t.healthy_since = 0, None
            return Decision(Action.LEAVE, 0)
        if healthy:
            t.failures = 0
            if t.healthy_since is None:
                t.healthy_since = now
            # Steadily healthy for as long as the longest pause: the next trouble starts over.
            if t.streak and now - t.healthy_since >= self.policy.backoff_max:
                t.streak = 0
            return Decision(Action.NONE, 0)
        t.healthy_since = None
        t.failures += 1
        if t.failures < self.policy.failures:
            return Decision(Action.NONE, t.failures)
        if t.last_restart is not None:
            wait = self.policy.pause(t.streak) - (now - t.last_restart)
            if wait > 0:
                return Decision(Action.BACKOFF, t.failures, wait)
        failures = t.failures
        t.failures, t.streak, t.last_restart = 0, t.streak + 1, now
        return Decision(Action.RESTART, failures)

    def consecutive_failures(self) -> dict[str, int]:
        return {unit: t.failures for unit, t in self.tracks.items()}


def request_restart(path: Path, unit: str, timeout: float = 30.0) -> tuple[bool, str]:
    """Ask the root helper to restart `unit`: (done, its message)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"restart": unit}).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError as exc:
        return False, f"supervise socket {path}: {exc}"
    try:
        reply = json.loads(data)
        return bool(reply["ok"]), str(reply["message"])
    except (ValueError, KeyError, TypeError):
        return False, f"unreadable answer from the supervise helper: {data[:200]!r}"
