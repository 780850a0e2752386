"""The audit log in PostgreSQL: who did what on which host, and whether it worked."""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack

import structlog

from stellarbase import db
from stellarbase.errors import ExitCode, StellarError

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow

log = structlog.get_logger()

Outcome = Literal["success", "failure"]

# A key naming a secret is dropped from details wherever it sits; "key" only as a whole word
# (access_key, apiKey) so that names like "keyboard" or "monkey" stay.
_SECRET_WORDS = ("password", "passwd", "passphrase", "secret", "token", "credential", "apikey")
_SECRET_PARTS = frozenset({"key", "pwd"})
_AGE = re.compile(r"(\d+)([smhdw])")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    host: str
    action: str
    outcome: Outcome
    details: dict[str, Any]
    correlation_id: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "host": self.host,
            "action": self.action,
            "outcome": self.outcome,
            "details": self.details,
            "correlation_id": self.correlation_id,
        }


def record(
    conninfo: str,
    password: str | None,
    *,
    action: str,
    outcome: Outcome,
    details: Mapping[str, Any],
    correlation_id: str,
    actor: str | None = None,
    connect_timeout: float = 5,
) -> None:
    """Append one row; a StellarError when the database or the audit_log table is missing."""
    row = (
        actor or invoking_user(),
        socket.gethostname(),
        action,
        outcome,
        json.dumps(scrub(details), default=str),
        correlation_id,
    )
    hint = "the role in postgres.url must be allowed to insert into audit_log"
    with _audit_log(conninfo, password, connect_timeout, doing="write", hint=hint) as conn:
        conn.execute(
            "INSERT INTO audit_log (actor, host, action, outcome, details, correlation_id)"
            " VALUES (%s, %s, %s, %s, %s::jsonb, %s)",
            row,
        )


@contextmanager
def _audit_log(
    conninfo: str, password: str | None, connect_timeout: float, *, doing: str, hint: str
) -> Iterator[psycopg.Connection[TupleRow]]:
    """A connection whose errors name the audit log: a missing table (MIGRATION: not
    created yet), or what the server refused."""
    import psycopg

    with (
        db.connect(conninfo, password, connect_timeout=connect_timeout, purpose="audit") as conn,
        db.server_errors(
            f"cannot {doing} the audit log at {db.where(conninfo)}",
            hint=hint,
            code=ExitCode.DEPENDENCY,
        ),
    ):
        try:
            yield conn
        except psycopg.errors.UndefinedTable:
            raise _no_table(conninfo) from None


class Entry(TypedDict):
    """What one row says (the rest, who and where, `record` finds itself)."""

    action: str
    outcome: Outcome
    details: Mapping[str, Any]
    correlation_id: str


def try_record(conninfo: str, password: str | None, **entry: Unpack[Entry]) -> StellarError | None:
    """`record` for callers that must not fail on the audit log: the error, or None.

    The error of a missing table has code MIGRATION: the migrations have not created it yet.
    """
    action, outcome = entry["action"], entry["outcome"]
    try:
        record(conninfo, password, **entry)
    except StellarError as exc:
        # A missing table means the migrations have not run yet; a failed operation often
        # failed for want of this very database, and its own error already says so.
        quiet = exc.code == ExitCode.MIGRATION or outcome == "failure"
        (log.debug if quiet else log.warning)(
            "audit log not written", action=action, error=exc.message
        )
        return exc
    return None


def read(
    conninfo: str,
    password: str | None,
    *,
    since: datetime | None = None,
    limit: int = 1000,
    connect_timeout: float = 5,
) -> list[AuditRow]:
    """The newest `limit` rows at or after `since` (naive means local time), oldest first."""
    if limit < 1:
        raise StellarError(
            f"--limit {limit}: must be 1 or more",
            hint="for example --limit 50",
            code=ExitCode.USAGE,
        )
    if since is not None and since.tzinfo is None:
        since = since.astimezone()
    hint = "the role in postgres.url must be allowed to read audit_log"
    with _audit_log(conninfo, password, connect_timeout, doing="read", hint=hint) as conn:
        rows = conn.execute(
            """
            SELECT id, at, actor, host, action, outcome, details, correlation_id FROM (
                SELECT * FROM audit_log
                 WHERE %(since)s::timestamptz IS NULL OR at >= %(since)s::timestamptz
                 ORDER BY at DESC, id DESC
                 LIMIT %(limit)s
            ) newest ORDER BY at, id
            """,
            {"since": since, "limit": limit},
        ).fetchall()
    return [AuditRow(*row) for row in rows]


# The audit detail of an install or upgrade whose bundle was verified with the keys of
# STELLARBASE_RELEASE_PUBKEY (file, key fingerprints): named so that scrub keeps it.
RELEASE_KEY_OVERRIDE = "release_pubkey_override"


def release_key_details(key_override: Mapping[str, Any] | None) -> dict[str, Any]:
    """Audit details of a bundle's keys: none with the built-in keys."""
    return {RELEASE_KEY_OVERRIDE: dict(key_override)} if key_override is not None else {}


def scrub(details: Mapping[str, Any]) -> dict[str, Any]:
    """A copy without the keys that name a secret, at any depth."""
    return {str(k): _scrub_value(v) for k, v in details.items() if not is_secret_name(str(k))}


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    if any(word in lowered for word in _SECRET_WORDS):
        return True
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    return any(word in _SECRET_PARTS for word in words)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return scrub(value)
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    return value


def invoking_user() -> str:
    """The person behind the command: the sudo caller, else the real user."""
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user:
        return sudo_user
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def current_correlation_id() -> str:
    """The id the CLI bound for this operation's log lines, or a fresh one."""
    bound = structlog.contextvars.get_contextvars().get("correlation_id")
    return str(bound) if bound else uuid.uuid4().hex


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive means local) or an age such as 30m, 1h, 2d, 1w."""
    age = _AGE.fullmatch(text.strip())
    if age:
        seconds = int(age[1]) * _AGE_SECONDS[age[2]]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise StellarError(
            f"--since {text!r}: neither an ISO 8601 time nor an age",
            hint="for example --since 2h, --since 3d or --since 2025-05-01T12:00:00Z",
            code=ExitCode.USAGE,
        ) from None
    return value if value.tzinfo else value.astimezone()


def _no_table(conninfo: str) -> StellarError:
    return StellarError(
        f"the audit_log table does not exist yet at {db.where(conninfo)}",
        hint="run `stellarbase migrate up` first",
        code=ExitCode.MIGRATION,
    )
