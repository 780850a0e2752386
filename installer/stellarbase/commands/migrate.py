"""`migrate up` and `migrate status`: the versioned PostgreSQL schema.

Both commands leave a row in the audit log once its table exists; on failure that is
best effort, so the original error is the one the user sees.
"""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

from stellarbase import audit
from stellarbase.errors import ExitCode, StellarError
from stellarbase.migrate import (
    BUILTIN_DIR,
    Migration,
    MigrationState,
    migrate_up,
    migration_status,
)
from stellarbase.result import Result, Status, StepResult


def migrate_up_command(
    conninfo: str,
    password: str | None,
    *,
    to: int | None,
    correlation_id: str,
    directory: Path = BUILTIN_DIR,
) -> Result:
    done: list[Migration] = []
    try:
        migrate_up(conninfo, password, to=to, directory=directory, on_applied=done.append)
    except StellarError as exc:
        details = {"to": to, "applied": [m.version for m in done], "error": exc.message}
        audit.try_record(
            conninfo,
            password,
            action="migrate up",
            outcome="failure",
            details=details,
            correlation_id=correlation_id,
        )
        if done:
            exc.details = [*exc.details, f"applied before it: {_names(done)}"]
        raise
    states = migration_status(conninfo, password, directory=directory)
    version = _version(states)
    pending = sum(1 for s in states if s.state == "pending")
    audit_error = audit.try_record(
        conninfo,
        password,
        action="migrate up",
        outcome="success",
        details={"to": to, "applied": [m.version for m in done], "version": version},
        correlation_id=correlation_id,
    )
    note, more = _audit_note(audit_error)
    applied = [m.version for m in done]
    summary = ("" if done else "nothing to apply: ") + f"database at version {version}"
    return Result(
        "migrate up",
        {"applied": applied, "version": version, "pending": pending, "audit": note},
        (f"{summary}; {pending} pending", *more),
        steps=tuple(StepResult(f"migration {m.filename}", Status.CHANGED, "applied") for m in done),
    )


def migrate_status_command(
    conninfo: str, password: str | None, *, correlation_id: str, directory: Path = BUILTIN_DIR
) -> Result:
    try:
        states = migration_status(conninfo, password, directory=directory)
    except StellarError as exc:
        audit.try_record(
            conninfo,
            password,
            action="migrate status",
            outcome="failure",
            details={"error": exc.message},
            correlation_id=correlation_id,
        )
        raise
    version = _version(states)
    applied = [s.version for s in states if s.applied_at is not None]
    pending = [s.version for s in states if s.state == "pending"]
    lines = [f"{'VERSION':<8} {'NAME':<24} {'STATE':<8} APPLIED AT"]
    lines += [
        f"{s.version:04d}     {s.name:<24} {s.state:<8} "
        + (f"{s.applied_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC" if s.applied_at else "-")
        for s in states
    ]
    lines.append(f"database at version {version}; {len(pending)} pending")
    if any(s.state in ("changed", "unknown") for s in states):
        lines.append(
            "`migrate up` refuses to run: restore a changed file; "
            "an unknown version needs the newer stellarbase that applied it"
        )
    audit_error = audit.try_record(
        conninfo,
        password,
        action="migrate status",
        outcome="success",
        details={"version": version, "applied": applied, "pending": pending},
        correlation_id=correlation_id,
    )
    note, more = _audit_note(audit_error)
    data = {"version": version, "pending": pending,
            "migrations": [s.as_dict() for s in states], "audit": note}  # fmt: skip
    return Result("migrate status", data, (*lines, *more))


def _version(states: list[MigrationState]) -> int:
    return max((s.version for s in states if s.applied_at is not None), default=0)


def _names(migrations: list[Migration]) -> str:
    return ", ".join(m.filename for m in migrations)


def _audit_note(error: StellarError | None) -> tuple[str, tuple[str, ...]]:
    """The result's "audit" field, and a line for people when it failed unexpectedly."""
    if error is None:
        return "recorded", ()
    if error.code == ExitCode.MIGRATION:  # no audit_log table before its migration ran
        return "not recorded: no audit_log table yet", ()
    return f"not recorded: {error.message}", (f"audit log: not recorded ({error.message})",)
