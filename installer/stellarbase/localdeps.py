"""Local PostgreSQL and Redis for a pilot: find the host's server binaries, prepare the
cluster, and make sure its database, role and extensions exist.

Finding is read-only (facts); `init_cluster` and `ensure_database` are executor helpers.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stellarbase.errors import ExitCode, StellarError
from stellarbase.files import fsync_dir

if TYPE_CHECKING:
    import psycopg
from stellarbase.proc import run

MIN_POSTGRES = 14
MIN_REDIS = 7
APP_ROLE = "stellarbase"
APP_DATABASE = "stellarbase"
ADMIN_ROLE = "postgres"
# The local superuser's password in postgres-admin.env (root only; never given to services).
ADMIN_PASSWORD = "STELLARBASE_LOCAL_POSTGRES_ADMIN_PASSWORD"
EXTENSIONS = ("vector",)  # created when the host has them; semantic search needs vector

# Where distributions put PostgreSQL's server binaries: Debian/Ubuntu, PGDG RPMs, RHEL.
POSTGRES_LAYOUTS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/bin")
PACKAGES = {
    "postgres": {"apt-get": "postgresql", "dnf": "postgresql-server"},
    "redis": {"apt-get": "redis-server", "dnf": "redis"},
}


@dataclass(frozen=True)
class ServerBinary:
    path: Path  # PostgreSQL: the bin directory; Redis: the redis-server executable
    version: tuple[int, ...]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


def _version(text: str) -> tuple[int, ...]:
    match = re.search(r"(?:PostgreSQL\)|v=)\s*(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in match.group(1).split(".")) if match else ()


def postgres_candidates() -> list[Path]:
    dirs: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = run([pg_config, "--bindir"], check=False)
        if out.returncode == 0 and out.stdout.strip():
            dirs.append(Path(out.stdout.strip()))
    for pattern in POSTGRES_LAYOUTS:
        dirs += [Path(d) for d in sorted(glob.glob(pattern))]
    postgres = shutil.which("postgres")
    if postgres:
        dirs.append(Path(postgres).resolve().parent)
    unique = dict.fromkeys(
        d for d in dirs if (d / "postgres").is_file() and (d / "initdb").is_file()
    )
    return list(unique)


def find_postgres() -> tuple[ServerBinary | None, list[ServerBinary]]:
    """The newest usable server, and every server found (for the error message)."""
    found = []
    for bindir in postgres_candidates():
        out = run([str(bindir / "postgres"), "--version"], check=False)
        found.append(ServerBinary(bindir, _version(out.stdout)))
    usable = [b for b in found if b.version and b.version[0] >= MIN_POSTGRES]
    return max(usable, key=lambda b: b.version, default=None), found


def find_redis() -> tuple[ServerBinary | None, list[ServerBinary]]:
    found = []
    for path in dict.fromkeys(p for p in (shutil.which("redis-server"),) if p):
        out = run([path, "--version"], check=False)
        found.append(ServerBinary(Path(path), _version(out.stdout)))
    usable = [b for b in found if b.version and b.version[0] >= MIN_REDIS]
    return max(usable, key=lambda b: b.version, default=None), found


def package_manager() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        text = ""
    ids = " ".join(re.findall(r'^(?:ID|ID_LIKE)="?([^"\n]*)"?', text, flags=re.M))
    if re.search(r"\b(rhel|fedora|centos|rocky|almalinux)\b", ids):
        return "dnf"
    return "apt-get"


def missing_error(dep: str, found: list[ServerBinary], minimum: int) -> StellarError:
    manager = package_manager()
    name = "PostgreSQL" if dep == "postgres" else "Redis"
    old = ", ".join(f"{b.version_text or '?'} at {b.path}" for b in found)
    what = f"only {name} {old} found" if found else f"no {name} server binaries found"
    return StellarError(
        f"local {dep}: {what}; {name} {minimum} or newer is needed",
        hint=f"install it with `{manager} install {PACKAGES[dep][manager]}`, "
        f"or point at a server with dependencies.{dep}=external and {dep}.url",
        code=ExitCode.HOST,
    )


def new_password() -> str:
    return secrets.token_urlsafe(24)


# --- executor helpers ---------------------------------------------------------------------


def cluster_ready(data_dir: Path) -> bool:
    return (data_dir / "PG_VERSION").is_file() and (data_dir / "global" / "pg_control").is_file()


def init_cluster(bindir: Path, data_dir: Path, user: str, admin_password: str) -> None:
    """initdb with data checksums and scram-sha-256, as the PostgreSQL user; with group
    access, so that the agent (in that user's group) reads the WAL it archives.

    Never over files: a data directory that holds anything is refused. initdb writes into a
    scratch directory beside it, renamed onto the empty data directory once complete, so a
    crash leaves either no cluster or a whole one (a scratch left by a crash never ran a
    server and is started over). A data directory that is a mount point cannot be renamed
    onto: initdb then writes into it directly.
    """
    if holds_files(data_dir):
        raise StellarError(
            f"{data_dir} holds files but no PostgreSQL cluster: initdb never runs over them",
            hint="move them aside if they are not needed, or restore the cluster into it; "
            "then run install again",
            code=ExitCode.HOST,
        )
    target = data_dir
    if not os.path.ismount(data_dir):
        target = data_dir.with_name(f".{data_dir.name}.initdb")
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(mode=0o700)
        shutil.chown(target, user=user, group=user)
        os.chmod(target, 0o700)
    with tempfile.NamedTemporaryFile("w", dir=data_dir.parent, prefix=".pw-", delete=False) as f:
        f.write(admin_password + "\n")
    try:
        shutil.chown(f.name, user=user)
        os.chmod(f.name, 0o400)
        run(
            [
                "runuser",
                "-u",
                user,
                "--",
                str(bindir / "initdb"),
                f"--pgdata={target}",
                f"--username={ADMIN_ROLE}",
                f"--pwfile={f.name}",
                "--auth=scram-sha-256",
                "--data-checksums",
                "--allow-group-access",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
            timeout=300,
        )
    finally:
        Path(f.name).unlink(missing_ok=True)
    if target != data_dir:
        os.rename(target, data_dir)  # replaces the empty directory in one step
        fsync_dir(data_dir.parent)


def holds_files(path: Path) -> bool:
    """Whether anything lies in the directory (something else in its place counts too)."""
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is not None
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return True


def ensure_database(
    port: int, admin_password: str, app_password: str, timeout: float
) -> tuple[list[str], bool]:
    """Role, database and extensions; returns (what changed, whether vector is there)."""
    import psycopg
    from psycopg import sql

    admin = _connect_when_up(port, admin_password, "postgres", timeout)
    changed: list[str] = []
    with admin:
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,)).fetchone():
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(APP_ROLE)))
            changed.append(f"role {APP_ROLE}")
        if not _can_login(port, app_password):
            # The server gets a SCRAM-SHA-256 verifier (RFC 5803) made here by libpq, as
            # psql's \password does: a logged statement never holds the password itself.
            verifier = admin.pgconn.encrypt_password(
                app_password.encode(), APP_ROLE.encode(), b"scram-sha-256"
            )
            admin.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(APP_ROLE), sql.Literal(verifier.decode("ascii"))
                )
            )
            changed.append(f"password of {APP_ROLE}")
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (APP_DATABASE,))
        if not exists.fetchone():
            admin.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(APP_DATABASE), sql.Identifier(APP_ROLE)
                )
            )
            changed.append(f"database {APP_DATABASE}")
    vector = False
    with psycopg.connect(local_conninfo(port, ADMIN_ROLE, admin_password, APP_DATABASE)) as db:
        db.autocommit = True
        for ext in EXTENSIONS:
            available = db.execute(
                "SELECT installed_version FROM pg_available_extensions WHERE name = %s", (ext,)
            ).fetchone()
            if available is None:
                continue
            if available[0] is None:
                db.execute(sql.SQL("CREATE EXTENSION {}").format(sql.Identifier(ext)))
                changed.append(f"extension {ext}")
            vector = vector or ext == "vector"
    return changed, vector


def local_conninfo(
    port: int, user: str, password: str, dbname: str, connect_timeout: int = 3
) -> str:
    """A connection string to the local server on loopback."""
    from psycopg.conninfo import make_conninfo

    return make_conninfo(
        host="127.0.0.1",
        port=port,
        user=user,
        password=password,
        dbname=dbname,
        connect_timeout=connect_timeout,
    )


def _can_login(port: int, password: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(local_conninfo(port, APP_ROLE, password, "postgres")):
            return True
    except psycopg.OperationalError:
        return False


def _connect_when_up(port: int, password: str, dbname: str, timeout: float) -> psycopg.Connection:
    """The local server was just started with --no-block: wait for it to take connections."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = psycopg.connect(local_conninfo(port, ADMIN_ROLE, password, dbname))
            conn.autocommit = True
            return conn
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise StellarError(
                    f"local postgres on port {port} did not accept connections: {exc}".strip(),
                    hint="see `journalctl -u stellarbase-postgres`",
                    code=ExitCode.UNHEALTHY,
                ) from None
            time.sleep(0.2)


def wait_until_up(port: int, admin_password: str, timeout: float) -> None:
    _connect_when_up(port, admin_password, "postgres", timeout).close()


def configure_settings(
    port: int, admin_password: str, settings: tuple[tuple[str, str], ...], timeout: float
) -> tuple[list[str], list[str]]:
    """ALTER SYSTEM what differs, reload; returns (what changed, what needs a restart).

    A value of "" resets the setting to PostgreSQL's default.
    """
    from psycopg import sql

    changed: list[str] = []
    with _connect_when_up(port, admin_password, "postgres", timeout) as admin:
        for name, value in settings:
            row = admin.execute(
                "SELECT setting, unit, boot_val, source FROM pg_settings WHERE name = %s", (name,)
            ).fetchone()
            if row is None:
                continue
            if _same_setting(row, value):
                continue
            if value:
                admin.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)
                    )
                )
                changed.append(f"{name}={value}" if name != "archive_command" else name)
            else:
                admin.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
                changed.append(f"{name} to its default")
        if changed:
            admin.execute("SELECT pg_reload_conf()")
            time.sleep(0.2)  # the postmaster applies the reload asynchronously
        names = [name for name, _ in settings]
        pending = admin.execute(
            "SELECT name FROM pg_settings WHERE pending_restart AND name = ANY(%s)", (names,)
        ).fetchall()
    return changed, [row[0] for row in pending]


def _same_setting(row: tuple[str, str | None, str, str], wanted: str) -> bool:
    setting, unit, boot_val, source = row
    if not wanted:
        return source in ("default", "override") or setting == boot_val
    if unit == "s" and wanted.endswith("s") and wanted[:-1].isdigit():
        return setting == wanted[:-1]
    return setting == wanted
