"""What the verbs that change the host check first, and the audit row each one leaves."""

from __future__ import annotations

import os
from typing import Any, Literal

from stellarbase import audit
from stellarbase.errors import ExitCode, StellarError
from stellarbase.paths import HostPaths


def require_root(paths: HostPaths) -> None:
    if paths.live and os.geteuid() != 0:
        raise StellarError(
            "this command changes the host and must run as root",
            hint="run it with sudo, or aim it at a test root with --root DIR",
            code=ExitCode.HOST,
        )


def require_systemd(paths: HostPaths) -> None:
    """A live host must run systemd as its service manager: every step after talks to it."""
    from stellarbase.preflight.host import NOT_BOOTED_HINT, init_problem

    problem = init_problem() if paths.live else None
    if problem:
        raise StellarError(f"this host is {problem}", hint=NOT_BOOTED_HINT, code=ExitCode.HOST)


def record_audit(
    database: tuple[str, str | None] | None,
    action: str,
    outcome: Literal["success", "failure"],
    details: dict[str, Any],
) -> None:
    """One audit row per operation; a database that cannot take it is logged, not fatal."""
    if database is not None:
        audit.try_record(
            *database,
            action=action,
            outcome=outcome,
            details=details,
            correlation_id=audit.current_correlation_id(),
        )
