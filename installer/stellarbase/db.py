"""The installer's own PostgreSQL connections (migrations, audit log, the agent's reads):
connect, and turn a server's refusal into one StellarError line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from stellarbase import errors, pgwire
from stellarbase.errors import ExitCode, StellarError

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow

APPLICATION_NAME = "stellarbase"


@contextmanager
def connect(
    conninfo: str, password: str | None, *, connect_timeout: float = 5, purpose: str = ""
) -> Iterator[psycopg.Connection[TupleRow]]:
    """An autocommit connection; a failure to connect is a StellarError (DEPENDENCY)."""
    import psycopg

    with server_errors(
        f"cannot connect to PostgreSQL at {where(conninfo)}",
        hint="check postgres.url, the password (STELLARBASE_POSTGRES__PASSWORD) "
        "and that the server is up",
        code=ExitCode.DEPENDENCY,
    ):
        conn = psycopg.connect(
            conninfo,
            password=password,
            connect_timeout=max(1, round(connect_timeout)),
            autocommit=True,
            application_name=f"{APPLICATION_NAME} {purpose}".strip(),
        )
    with conn:
        yield conn


def where(conninfo: str) -> str:
    """host:port/db of a URL, for messages (never the user or a password)."""
    parts = urlsplit(conninfo)
    if not parts.hostname:
        return "the configured server"
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


@contextmanager
def server_errors(what: str, *, hint: str, code: ExitCode) -> Iterator[None]:
    """A psycopg error inside the block becomes a StellarError "<what>: <server's line>"."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        raise StellarError(f"{what}: {one_line(exc)}", hint=hint, code=code) from None


def one_line(exc: BaseException) -> str:
    """The server's primary message and SQLSTATE (psycopg or pgwire), else the exception
    text on one line."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, pgwire.ServerError) and exc.sqlstate:
        primary = exc.message
    if primary:
        return f"{primary} (SQLSTATE {sqlstate})" if sqlstate else str(primary)
    return errors.one_line(exc)
