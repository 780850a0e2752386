"""Versioned schema migrations: `NNNN_name.sql` files applied once each, in order.

Migrations are additive by default: the release before keeps running against the new
schema, so an upgrade can roll back without touching the database. A migration that breaks
older code says so in a header line `-- compatible-from: N`: only releases whose newest
migration is N or later run against the schema from then on. The database keeps that
number with each applied migration, so any binary can tell whether it may run there.

A run holds a session-level advisory lock from start to end, so hosts that migrate the same
database at once apply every migration exactly once: the others wait, then find nothing to
do. Each migration commits together with its row in `stellarbase_migrations`, or not at all.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from stellarbase import db
from stellarbase.errors import ExitCode, StellarError

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow

    Connection = psycopg.Connection[TupleRow]

log = structlog.get_logger()

# Beside this module in the source tree; the binary bundles the files at the same place.
BUILTIN_DIR = Path(__file__).parent / "migrations"
TABLE = "stellarbase_migrations"
LOCK_NAME = "stellarbase.migrate"
# pg_advisory_lock takes a signed 64-bit key: derive it from a name instead of a magic number.
LOCK_KEY = int.from_bytes(hashlib.sha256(LOCK_NAME.encode()).digest()[:8], "big", signed=True)
LOCK_WAIT_S = 120.0
_LOCK_POLL_S = 0.2
_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9][a-z0-9_]*)\.sql")
_COMPATIBLE_FROM = re.compile(r"^-- compatible-from: *(\d+) *$", re.MULTILINE)

_CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
# Added after the first release; rows written before it (or by older binaries) read 0.
_ADD_COMPATIBLE_FROM = (
    f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS compatible_from integer NOT NULL DEFAULT 0"
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    checksum: str  # sha256 of the file's bytes
    sql: str
    compatible_from: int = 0  # oldest newest-migration of a release that runs after this one

    @property
    def filename(self) -> str:
        return f"{self.version:04d}_{self.name}.sql"


@dataclass(frozen=True)
class AppliedRow:
    """One row of stellarbase_migrations."""

    version: int
    name: str
    checksum: str
    applied_at: datetime
    compatible_from: int = 0


@dataclass(frozen=True)
class MigrationState:
    version: int
    name: str
    applied_at: datetime | None
    checksum_matches: bool  # False once the file changed after it was applied, or is gone
    shipped: bool = True  # False: applied by a newer stellarbase, no such file here

    @property
    def state(self) -> str:
        if not self.shipped:
            return "unknown"
        if self.applied_at is None:
            return "pending"
        return "applied" if self.checksum_matches else "changed"

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "state": self.state,
            "applied_at": self.applied_at.isoformat() if self.applied_at else None,
            "checksum_matches": self.checksum_matches,
        }


# --- the migration files -------------------------------------------------------------------


def load_migrations(directory: Path = BUILTIN_DIR) -> list[Migration]:
    """Every `NNNN_name.sql` in the directory, by version; other `.sql` names are an error."""
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix == ".sql" and p.is_file())
    except OSError as exc:
        raise StellarError(
            f"{directory}: cannot read the migrations ({exc.strerror or exc})",
            hint="the stellarbase binary looks incomplete: install it again",
            code=ExitCode.MIGRATION,
        ) from None
    found: dict[int, Migration] = {}
    for path in files:
        match = _FILE_NAME.fullmatch(path.name)
        if match is None or int(match[1]) == 0:
            raise StellarError(
                f"{path}: not a migration file name",
                hint="name migrations NNNN_name.sql: four digits from 0001, then a-z, 0-9 or _",
                code=ExitCode.MIGRATION,
            )
        version, data = int(match[1]), path.read_bytes()
        if version in found:
            raise StellarError(
                f"{path}: version {version} is taken by {found[version].filename} too",
                hint="give every migration its own number",
                code=ExitCode.MIGRATION,
            )
        try:
            sql = data.decode()
        except UnicodeDecodeError:
            raise StellarError(
                f"{path}: not UTF-8 text", hint="save the file as UTF-8", code=ExitCode.MIGRATION
            ) from None
        header = _COMPATIBLE_FROM.search(sql)
        compatible_from = int(header[1]) if header else 0
        if compatible_from > version:
            raise StellarError(
                f"{path}: compatible-from {compatible_from} lies above its own version {version}",
                hint="name the oldest schema version whose releases still run after it",
                code=ExitCode.MIGRATION,
            )
        digest = hashlib.sha256(data).hexdigest()
        found[version] = Migration(version, match[2], digest, sql, compatible_from)
    return [found[v] for v in sorted(found)]


@dataclass(frozen=True)
class SchemaRange:
    """What a release says about the schema: it migrates to `newest`; releases whose newest
    migration is below `floor` cannot run against the schema it leaves."""

    floor: int
    newest: int

    def as_dict(self) -> dict[str, int]:
        return {"min": self.floor, "max": self.newest}


def schema_range(migrations: list[Migration]) -> SchemaRange:
    newest = max((m.version for m in migrations), default=0)
    return SchemaRange(max((m.compatible_from for m in migrations), default=0), newest)


def schema_floor(applied: dict[int, AppliedRow]) -> int:
    """The oldest newest-migration a release needs to run against this database."""
    return max((row.compatible_from for row in applied.values()), default=0)


# --- planning (pure) -----------------------------------------------------------------------


def pending_migrations(
    migrations: list[Migration], applied: dict[int, AppliedRow], to: int | None = None
) -> list[Migration]:
    """What `up` would apply, or a StellarError when the database and files disagree."""
    shipped = {m.version: m for m in migrations}
    unknown = sorted(set(applied) - set(shipped))
    newest_shipped = max(shipped, default=0)
    floor = schema_floor(applied)
    if unknown and floor > newest_shipped:
        row = applied[unknown[-1]]
        raise StellarError(
            f"the database has migration {row.version:04d}_{row.name} from a newer stellarbase, "
            f"which needs a release with schema {floor} or newer; this one ships up to "
            f"{newest_shipped}",
            hint="use that newer stellarbase binary; the schema never goes back",
            code=ExitCode.MIGRATION,
        )
    for m in migrations:
        done = applied.get(m.version)
        if done is not None and done.checksum != m.checksum:
            raise StellarError(
                f"migration {m.filename} changed after it was applied "
                f"on {done.applied_at:%Y-%m-%d %H:%M} (checksum differs); nothing was applied",
                hint="restore the shipped file; changes go in a new migration",
                code=ExitCode.MIGRATION,
            )
    newest = max(applied, default=0)
    if to is not None and to not in shipped:
        known = ", ".join(str(v) for v in shipped) or "none"
        raise StellarError(
            f"--to {to}: no such migration (shipped versions: {known})",
            hint="pick one of the shipped versions; `stellarbase migrate status` lists them",
            code=ExitCode.USAGE,
        )
    if to is not None and to < newest:
        raise StellarError(
            f"--to {to}: the database is already at version {newest}",
            hint="migrations only go forward; downgrading the schema is not supported",
            code=ExitCode.MIGRATION,
        )
    pending = [m for m in migrations if m.version not in applied]
    skipped = [m for m in pending if m.version < newest]
    if skipped:
        raise StellarError(
            f"migration {skipped[0].filename} is not applied but the later version {newest} is",
            hint="restore the shipped files; a new migration needs a number above the newest",
            code=ExitCode.MIGRATION,
        )
    return [m for m in pending if to is None or m.version <= to]


def migration_states(
    migrations: list[Migration], applied: dict[int, AppliedRow]
) -> list[MigrationState]:
    states = [
        MigrationState(
            m.version,
            m.name,
            applied[m.version].applied_at if m.version in applied else None,
            m.version not in applied or applied[m.version].checksum == m.checksum,
        )
        for m in migrations
    ]
    shipped = {m.version for m in migrations}
    states += [
        MigrationState(row.version, row.name, row.applied_at, False, shipped=False)
        for row in applied.values()
        if row.version not in shipped
    ]
    return sorted(states, key=lambda s: s.version)


# --- talking to the database ---------------------------------------------------------------


def migrate_up(
    conninfo: str,
    password: str | None,
    *,
    to: int | None = None,
    directory: Path = BUILTIN_DIR,
    connect_timeout: float = 5,
    lock_wait: float = LOCK_WAIT_S,
    on_applied: Callable[[Migration], None] | None = None,
) -> list[Migration]:
    """Apply every pending migration (up to `to`) and return the ones applied now.

    Refuses before applying anything when an applied file changed, the database is newer
    than this binary, or `to` lies below the applied version. A failing migration leaves
    nothing of itself behind; the ones before it stay applied.
    """
    migrations = load_migrations(directory)
    done: list[Migration] = []
    with (
        db.connect(conninfo, password, connect_timeout=connect_timeout, purpose="migrate") as conn,
        _locked(conn, lock_wait, db.where(conninfo)),
    ):
        with _server_errors("preparing the migrations table"):
            conn.execute(_CREATE_TABLE)
            conn.execute(_ADD_COMPATIBLE_FROM)
            applied = _applied(conn)
        for m in pending_migrations(migrations, applied, to):
            _apply(conn, m)
            done.append(m)
            if on_applied is not None:
                on_applied(m)
    return done


def migration_status(
    conninfo: str,
    password: str | None,
    *,
    directory: Path = BUILTIN_DIR,
    connect_timeout: float = 5,
) -> list[MigrationState]:
    """Every shipped migration and every applied one; creates nothing in the database."""
    migrations = load_migrations(directory)
    with (
        db.connect(conninfo, password, connect_timeout=connect_timeout, purpose="migrate") as conn,
        _server_errors("reading the applied migrations"),
    ):
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,)).fetchone()
        applied = _applied(conn) if row and row[0] else {}
    return migration_states(migrations, applied)


def applied_schema(
    conninfo: str, password: str | None, *, connect_timeout: float = 5
) -> tuple[int, int]:
    """The newest applied migration and the schema floor of the database (0, 0 when new)."""
    with (
        db.connect(conninfo, password, connect_timeout=connect_timeout, purpose="migrate") as conn,
        _server_errors("reading the applied migrations"),
    ):
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,)).fetchone()
        applied = _applied(conn) if row and row[0] else {}
    return max(applied, default=0), schema_floor(applied)


def _applied(conn: Connection) -> dict[int, AppliedRow]:
    has_floor = conn.execute(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = %s::regclass "
        "AND attname = 'compatible_from' AND NOT attisdropped",
        (TABLE,),
    ).fetchone()
    floor = "compatible_from" if has_floor and has_floor[0] else "0"
    rows = conn.execute(
        f"SELECT version, name, checksum, applied_at, {floor} FROM {TABLE}"
    ).fetchall()
    return {int(r[0]): AppliedRow(int(r[0]), str(r[1]), str(r[2]), r[3], int(r[4])) for r in rows}


def _apply(conn: Connection, m: Migration) -> None:
    log.info("applying migration", migration=m.filename)
    failed = db.server_errors(
        f"migration {m.filename} failed",
        hint="nothing of it was applied and earlier migrations stay; "
        "fix the cause and run `stellarbase migrate up` again",
        code=ExitCode.MIGRATION,
    )
    with failed, conn.transaction():
        conn.execute(m.sql)
        conn.execute(
            f"INSERT INTO {TABLE} (version, name, checksum, compatible_from) "
            "VALUES (%s, %s, %s, %s)",
            (m.version, m.name, m.checksum, m.compatible_from),
        )


@contextmanager
def _locked(conn: Connection, wait: float, where: str) -> Iterator[None]:
    """Hold the migration lock; wait for it at most `wait` seconds."""
    import psycopg

    deadline = time.monotonic() + wait
    with _server_errors("taking the migration lock"):
        while not _try_lock(conn):
            if time.monotonic() >= deadline:
                raise StellarError(
                    f"another migration run{_lock_holder(conn)} has held the migration lock "
                    f"on {where} for more than {wait:.0f}s",
                    hint="wait for it to finish and run again; end a stuck session with "
                    "SELECT pg_terminate_backend(PID)",
                    code=ExitCode.MIGRATION,
                )
            log.info("waiting for the migration lock", where=where)
            time.sleep(_LOCK_POLL_S)
    try:
        yield
    finally:
        # Closing the connection frees the lock too, so a broken one needs no unlock.
        with suppress(psycopg.Error):
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def _try_lock(conn: Connection) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
    return bool(row and row[0])


def _lock_holder(conn: Connection) -> str:
    # A bigint advisory key shows in pg_locks split into classid (high) and objid (low).
    unsigned = LOCK_KEY & 0xFFFF_FFFF_FFFF_FFFF
    row = conn.execute(
        """
        SELECT l.pid, coalesce(host(a.client_addr), 'local socket')
          FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid::bigint = %s AND l.objid::bigint = %s
        """,
        (unsigned >> 32, unsigned & 0xFFFF_FFFF),
    ).fetchone()
    return f" (server PID {row[0]}, from {row[1]})" if row else ""


def _server_errors(doing: str) -> AbstractContextManager[None]:
    return db.server_errors(
        f"PostgreSQL refused {doing}",
        hint="the role in postgres.url must own the database (or may create tables in it)",
        code=ExitCode.MIGRATION,
    )
