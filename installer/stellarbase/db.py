"""The installer's own PostgreSQL connections (migrations, audit log): connect and explain."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

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

    try:
        conn = psycopg.connect(
            conninfo,
            password=password,
            connect_timeout=max(1, round(connect_timeout)),
            autocommit=True,
            application_name=f"{APPLICATION_NAME} {purpose}".strip(),
        )
    except psycopg.Error as exc:
        raise StellarError(
            f"cannot connect to PostgreSQL at {where(conninfo)}: {one_line(exc)}",
            hint="check postgres.url, the password (STELLARBASE_POSTGRES__PASSWORD) "
            "and that the server is up",
            code=ExitCode.DEPENDENCY,
        ) from None
    with conn:
        yield conn


def where(conninfo: str) -> str:
    """host:port/db of a URL, for messages (never the user or a password)."""
    parts = urlsplit(conninfo)
    if not parts.hostname:
        return "the configured server"
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


def one_line(exc: BaseException) -> str:
    """The server's primary message and SQLSTATE, or the exception text on one line."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    sqlstate = getattr(exc, "sqlstate", None)
    if primary:
        return f"{primary} (SQLSTATE {sqlstate})" if sqlstate else str(primary)
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text[:300]
