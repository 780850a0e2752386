"""WAL archiving, base backup and restore: stellarbase's engine beside pgBackRest 2.45.

Each tool gets its own PostgreSQL 15 cluster (same settings, same pgbench scale, same
write load) and its own repository of the same kind, a local directory (pgBackRest 2.45
speaks only HTTPS to S3, so a plain-HTTP moto store would not be equal footing). Both
compress with zstd level 3 and move up to PROCESS_MAX files at once; pgBackRest archives
asynchronously (`archive-async=y`, a spool), as our agent uploads ahead of Postgres.

Per tool and run, in this order:

1. backlog: `pgbench -i` runs with archiving paused (empty archive_command), then
   archiving is switched on and timed until the last of that WAL is archived: the
   archiver's throughput, which the target compares;
2. load: `pgbench -T` for a fixed time while `.ready` files are sampled, then
   `pg_switch_wal()` and the drain until `pg_stat_archiver` reaches that segment (both
   archivers keep up, so this rate mostly shows how much WAL pgbench wrote: lag and
   drain are what it says of the archiver);
3. base backup of the whole cluster;
4. a shorter write load after the backup, archived, so that restore has WAL to replay;
5. restore to the latest point into a new data directory, start it, and time until it
   is promoted (`pg_is_in_recovery()` false); the row count of `pgbench_history` there
   must equal the source's.

    sudo .venv/bin/python bench/backup.py [--runs 1] [--scale 70] [--load-seconds 60]

Needs root (the servers run as the `postgres` account), the PostgreSQL 15 server and
pgbench, and Debian's `pgbackrest` package.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "installer"))

from tests import servers  # noqa: E402

PROCESS_MAX = 4
ZSTD_LEVEL = 3
STANZA = "bench"
SEGMENT_BYTES = 16 * 1024 * 1024
PG_ACCOUNT = "postgres"
TARGET_ARCHIVE = 1.0  # ours/theirs archive throughput, at least
TARGET_RESTORE = 1.0  # ours/theirs restore time, at most
DRAIN_DEADLINE_S = 900.0
PROMOTE_DEADLINE_S = 900.0
SAMPLE_EVERY_S = 0.1
PROMOTE_POLL_S = 0.2  # as often as our restore asks, so neither side sees promotion sooner
CHILD_FLAG = "--archiver-child"
HISTORY_ROWS = "SELECT count(*) FROM pgbench_history"

# The WAL-heavy half of the write load: 500 rows (about 60 kB of WAL) per transaction.
BULK_SCRIPT = """\\set aid random(1, 100000 * :scale)
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
  SELECT 1, 1, :aid, g, now() FROM generate_series(1, 500) AS g;
"""

# The same on both clusters. archive_command stays out of here: a `-c` setting would win
# over ALTER SYSTEM, and initdb's empty one pauses archiving until a tool takes over.
# full_page_writes is back on (the test servers turn it off) for a real WAL volume.
CLUSTER_SETTINGS = {
    "archive_mode": "on",
    "wal_level": "replica",
    "full_page_writes": "on",
    "max_wal_size": "8GB",
    "shared_buffers": "256MB",
    "max_connections": "50",
}


class NotAvailable(Exception):
    """A part of our engine that is not in the tree yet."""


# --------------------------------------------------------------------------- clusters


@dataclass
class Cluster:
    server: servers.PostgresServer

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir

    @property
    def socket_dir(self) -> Path:
        return self.server.data_dir.parent / "run"

    @property
    def archive_status(self) -> Path:
        return self.data_dir / "pg_wal" / "archive_status"

    def conninfo(self, port: int | None = None) -> dict[str, Any]:
        return {
            "host": servers.LOOPBACK,
            "port": port or self.server.port,
            "user": servers.PG_SUPERUSER,
            "password": self.server.admin_password,
            "dbname": "postgres",
            "connect_timeout": 2,
            "autocommit": True,
        }

    def query(self, sql: str, port: int | None = None) -> Any:
        import psycopg

        with psycopg.connect(**self.conninfo(port)) as conn:
            cur = conn.execute(sql)
            row = cur.fetchone() if cur.description else None
            return None if row is None else row[0]

    def set_archive_command(self, command: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(**self.conninfo()) as conn:
            conn.execute(
                sql.SQL("ALTER SYSTEM SET archive_command = {}").format(sql.Literal(command))
            )
            conn.execute("SELECT pg_reload_conf()")

    def switch_wal(self) -> str:
        """Close the current segment; the name of the last one that must be archived."""
        return str(self.query("SELECT pg_walfile_name(pg_switch_wal())"))

    def wait_archived(self, segment: str, deadline_s: float = DRAIN_DEADLINE_S) -> float:
        """Seconds until pg_stat_archiver reports `segment` (or a later one) archived."""
        import psycopg

        start = time.monotonic()
        with psycopg.connect(**self.conninfo()) as conn:
            while True:
                row = conn.execute(
                    "SELECT last_archived_wal, last_failed_wal FROM pg_stat_archiver"
                ).fetchone()
                last = (row[0] or "")[:24] if row else ""
                if last >= segment:
                    return time.monotonic() - start
                if time.monotonic() - start > deadline_s:
                    raise RuntimeError(
                        f"{segment} not archived after {deadline_s:.0f} s "
                        f"(last archived {last or 'none'}, last failed {row[1] if row else '?'})"
                    )
                time.sleep(0.02)

    def ready_files(self) -> list[float]:
        """mtimes of the `.ready` files: segments Postgres has not seen archived yet."""
        mtimes = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.archive_status) as it:
            for entry in it:
                if entry.name.endswith(".ready"):
                    with contextlib.suppress(FileNotFoundError):
                        mtimes.append(entry.stat().st_mtime)
        return mtimes


def start_cluster(base: Path) -> Cluster:
    return Cluster(servers.start_postgres(base, extra=CLUSTER_SETTINGS))


def pg_env(cluster: Cluster) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "PGPASSWORD": cluster.server.admin_password,
    }


def pgbench(cluster: Cluster, *args: str) -> str:
    argv = [
        shutil.which("pgbench") or "pgbench",
        "-h",
        servers.LOOPBACK,
        "-p",
        str(cluster.server.port),
        "-U",
        servers.PG_SUPERUSER,
        *args,
        "postgres",
    ]
    out = subprocess.run(
        argv,
        env=pg_env(cluster),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"pgbench {' '.join(args)} exited {out.returncode}: {out.stderr[-2000:]}"
        )
    return out.stdout


def tps(pgbench_output: str) -> float:
    for line in pgbench_output.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    return float("nan")


def account() -> pwd.struct_passwd:
    return pwd.getpwnam(PG_ACCOUNT)


def owned_dir(path: Path) -> Path:
    """A directory the postgres account owns (repositories, spools, restore targets)."""
    path.mkdir(parents=True, exist_ok=True)
    acct = account()
    os.chown(path, acct.pw_uid, acct.pw_gid)
    path.chmod(0o750)
    return path


@dataclass
class Restored:
    """A restored data directory running as its own postmaster, until promoted."""

    proc: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def restored_settings() -> dict[str, str]:
    """The source's settings for a restored copy (they were `-c` options, not in a file).

    archive_mode=off keeps the promoted copy from archiving into the repository under
    test; command-line settings win over what a restore writes to postgresql.auto.conf.
    """
    return {
        "fsync": "off",
        "synchronous_commit": "off",
        **CLUSTER_SETTINGS,
        "archive_mode": "off",
    }


def start_restored(data_dir: Path, log_file: Path) -> Restored:
    """Start a postmaster on a data dir pgBackRest restored, as our restore starts its own."""

    acct = account()
    sock_dir = owned_dir(data_dir.parent / f"{data_dir.name}-run")
    port = servers.free_port()
    settings = {
        "listen_addresses": servers.LOOPBACK,
        "port": str(port),
        "unix_socket_directories": str(sock_dir),
        "logging_collector": "off",
        **restored_settings(),
    }
    argv = [str(servers._pg_bindir() / "postgres"), "-D", str(data_dir)]
    for name, value in settings.items():
        argv += ["-c", f"{name}={value}"]
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data_dir.parent,
            user=acct.pw_uid,
            group=acct.pw_gid,
            extra_groups=[],
        )
    return Restored(proc, port)


def wait_promoted(cluster: Cluster, restored: Restored, log_file: Path) -> None:
    import psycopg

    deadline = time.monotonic() + PROMOTE_DEADLINE_S
    while time.monotonic() < deadline:
        if restored.proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"restored server exited {restored.proc.returncode}:\n{tail}")
        with contextlib.suppress(psycopg.OperationalError):
            if cluster.query("SELECT pg_is_in_recovery()", port=restored.port) is False:
                return
        time.sleep(PROMOTE_POLL_S)
    raise RuntimeError(f"restored server not promoted after {PROMOTE_DEADLINE_S:.0f} s")


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                total += (Path(dirpath) / name).stat().st_size
    return total


# --------------------------------------------------------------------------- lag sampler


class ReadySampler:
    """Samples the `.ready` backlog in a thread: the most files and the oldest one's age."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.max_count = 0
        self.max_age = 0.0

    def _loop(self) -> None:
        while not self._stop.is_set():
            mtimes = self._cluster.ready_files()
            if mtimes:
                self.max_count = max(self.max_count, len(mtimes))
                self.max_age = max(self.max_age, time.time() - min(mtimes))
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> ReadySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- the tools


@dataclass(frozen=True)
class RestoreTiming:
    files_s: float  # until the data directory is written (ours: extracted)
    total_s: float  # until the restored cluster is promoted
    rows: int  # in pgbench_history there


class Tool(Protocol):
    name: str

    def archive_command(self) -> str: ...

    def start_archiving(self) -> None:
        """Everything up to (not including) archive_command taking effect."""
        ...

    def stop_archiving(self) -> None: ...

    def backup(self) -> None: ...

    def restore(self, target: Path) -> RestoreTiming:
        """Restore the latest point into `target`, recover until promoted, count rows."""
        ...

    def repository_bytes(self) -> int: ...

    def problems(self) -> list[str]:
        """What went wrong on the way without stopping the run (failed uploads)."""
        ...


class PgBackRest:
    name = "pgBackRest 2.45"

    def __init__(self, workdir: Path, cluster: Cluster) -> None:
        self.workdir = owned_dir(workdir)
        self.repo = owned_dir(workdir / "repo")
        self.cluster = cluster
        self.config = workdir / "pgbackrest.conf"
        settings = {
            "repo1-path": self.repo,
            "repo1-retention-full": 2,
            "compress-type": "zst",
            "compress-level": ZSTD_LEVEL,
            "process-max": PROCESS_MAX,
            "archive-async": "y",
            "spool-path": owned_dir(workdir / "spool"),
            "lock-path": owned_dir(workdir / "lock"),
            "log-path": owned_dir(workdir / "log"),
            "log-level-console": "warn",
            "start-fast": "y",
        }
        stanza = {
            "pg1-path": cluster.data_dir,
            "pg1-port": cluster.server.port,
            "pg1-socket-path": cluster.socket_dir,
            "pg1-user": servers.PG_SUPERUSER,
        }
        lines = ["[global]", *(f"{k}={v}" for k, v in settings.items())]
        lines += ["", f"[{STANZA}]", *(f"{k}={v}" for k, v in stanza.items()), ""]
        self.config.write_text("\n".join(lines))
        self.config.chmod(0o644)

    def _argv(self, *args: str) -> list[str]:
        return ["pgbackrest", f"--config={self.config}", f"--stanza={STANZA}", *args]

    def run(self, *args: str) -> str:
        argv = ["runuser", "-u", PG_ACCOUNT, "--", *self._argv(*args)]
        out = subprocess.run(
            argv,
            env=pg_env(self.cluster),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=3600,
            cwd=self.workdir,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"pgbackrest {' '.join(args)} exited {out.returncode}: "
                f"{(out.stderr or out.stdout)[-2000:]}"
            )
        return out.stdout

    def archive_command(self) -> str:
        return " ".join(self._argv("archive-push", "%p"))

    def start_archiving(self) -> None:
        self.run("stanza-create")

    def stop_archiving(self) -> None:
        pass  # the async process exits by itself once its queue is empty

    def backup(self) -> None:
        self.run("--type=full", "backup")

    def restore(self, target: Path) -> RestoreTiming:
        owned_dir(target).chmod(0o700)
        log_file = target.parent / "restored.log"
        start = time.monotonic()
        self.run(f"--pg1-path={target}", "--type=default", "restore")
        files_s = time.monotonic() - start
        restored = start_restored(target, log_file)
        try:
            wait_promoted(self.cluster, restored, log_file)
            total_s = time.monotonic() - start
            rows = self.cluster.query(HISTORY_ROWS, port=restored.port)
        finally:
            restored.stop()
        return RestoreTiming(files_s, total_s, int(rows))

    def repository_bytes(self) -> int:
        return tree_bytes(self.repo)

    def problems(self) -> list[str]:
        return []  # a failed archive-push shows as a drain that never ends


class Ours:
    name = "stellarbase"

    def __init__(self, workdir: Path, cluster: Cluster) -> None:
        for module in ("archiver", "basebackup", "restore", "prefetch"):
            if importlib.util.find_spec(f"stellarbase.backup.{module}") is None:
                raise NotAvailable(f"stellarbase.backup.{module} is not available yet")
        from stellarbase.backup.repo import repository_from
        from stellarbase.config import BackupConfig

        self.workdir = owned_dir(workdir)
        self.cluster = cluster
        self.root = owned_dir(workdir / "repo")
        self.spool = owned_dir(workdir / "spool")
        self.config = BackupConfig(
            repository=f"file://{self.root}",
            prefix=STANZA,
            compression_level=ZSTD_LEVEL,
            upload_concurrency=PROCESS_MAX,
        )
        self.repo = repository_from(self.config, None)
        self.child: subprocess.Popen[str] | None = None
        self.stats: dict[str, Any] = {}

    def archive_command(self) -> str:
        from stellarbase.backup.archiver import archive_command

        return archive_command(self.spool)

    def start_archiving(self) -> None:
        """The agent's loop in a process of its own, as on a host; it starts on `go`."""
        spec = {
            "root": str(self.root),
            "pg_wal": str(self.cluster.data_dir / "pg_wal"),
            "spool": str(self.spool),
        }
        path = os.pathsep.join([str(REPO / "installer"), str(REPO)])
        self.child = subprocess.Popen(
            [sys.executable, __file__, CHILD_FLAG],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
        )
        assert self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write(json.dumps(spec) + "\n")
        self.child.stdin.flush()
        if self.child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the archiver process exited {self.child.wait()} before it ran")
        self.child.stdin.write("go\n")
        self.child.stdin.flush()

    def stop_archiving(self) -> None:
        child, self.child = self.child, None
        if child is None:
            return
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=120)
        with contextlib.suppress(ValueError, IndexError):
            self.stats = json.loads(out.strip().splitlines()[-1])

    def backup(self) -> None:
        from psycopg.conninfo import make_conninfo

        from stellarbase.backup.basebackup import take_backup

        info = {k: v for k, v in self.cluster.conninfo().items() if k != "autocommit"}
        take_backup(self.repo, make_conninfo(**info), servers._pg_bindir(), self.config, "bench")

    def restore(self, target: Path) -> RestoreTiming:
        import psycopg

        from stellarbase.backup import restore

        start = time.monotonic()
        result = restore.restore_into(
            self.repo,
            None,
            restore.Target.latest(),
            data_dir=target,
            bindir=servers._pg_bindir(),
            run_as=PG_ACCOUNT,
            keep_running=True,
            settings=restored_settings(),
        )
        total_s = time.monotonic() - start
        assert result.cluster is not None
        try:
            with psycopg.connect(**result.cluster.conninfo()) as conn:
                row = conn.execute(HISTORY_ROWS).fetchone()
        finally:
            result.cluster.stop()
        return RestoreTiming(result.extract_seconds, total_s, int(row[0]) if row else -1)

    def repository_bytes(self) -> int:
        return tree_bytes(self.root)

    def problems(self) -> list[str]:
        failures = int(self.stats.get("failures_total") or 0)
        if not failures:
            return []
        return [f"{failures} archiver failure(s), the last: {self.stats.get('last_error')}"]


def archiver_child() -> None:
    """Our archiver until SIGTERM: prints `ready`, waits for `go`, ends with its stats."""
    import dataclasses

    from stellarbase import log
    from stellarbase.backup.archiver import Archiver
    from stellarbase.backup.repo import repository_from
    from stellarbase.config import BackupConfig

    log.setup("warning")
    spec = json.loads(sys.stdin.readline())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    config = BackupConfig(repository=f"file://{spec['root']}", prefix=STANZA)
    archiver = Archiver(
        repository_from(config, None),
        Path(spec["pg_wal"]),
        Path(spec["spool"]),
        level=ZSTD_LEVEL,
        concurrency=PROCESS_MAX,
    )
    print("ready", flush=True)
    sys.stdin.readline()
    archiver.run(stop)
    print(json.dumps(dataclasses.asdict(archiver.stats())), flush=True)


# --------------------------------------------------------------------------- one run


@dataclass
class Sample:
    load_seconds: float = 0.0
    db_bytes: int = 0
    init_s: float = 0.0
    backlog_segments: int = 0
    backlog_s: float = 0.0
    load_tps: float = 0.0
    load_segments: float = 0.0  # WAL written during the load, in segments
    archived_during_load: int = 0
    drain_s: float = 0.0
    max_ready: int = 0
    max_ready_age_s: float = 0.0
    backup_s: float = 0.0
    restore_files_s: float = 0.0
    restore_total_s: float = 0.0
    repo_bytes: int = 0
    rows_match: bool = False
    pg_version: str = "?"
    notes: list[str] = field(default_factory=list)

    @property
    def backlog_rate(self) -> float:
        return self.backlog_segments / self.backlog_s if self.backlog_s else float("nan")

    @property
    def restore_recovery_s(self) -> float:
        """From the files in place until promoted: start, WAL replay, promotion."""
        return self.restore_total_s - self.restore_files_s

    @property
    def load_rate(self) -> float:
        """Segments per second from the start of the load until the last one is archived."""
        return self.load_segments / (self.load_seconds + self.drain_s)


def archived_count(cluster: Cluster) -> int:
    return int(cluster.query("SELECT archived_count FROM pg_stat_archiver"))


def current_lsn_bytes(cluster: Cluster) -> int:
    return int(cluster.query("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))


def write_load(cluster: Cluster, args: argparse.Namespace, seconds: float, script: Path) -> str:
    """pgbench's TPC-B-like transactions mixed 1:1 with bulk inserts into pgbench_history."""
    return pgbench(
        cluster,
        "-n",
        "-c",
        str(args.clients),
        "-j",
        "2",
        "-T",
        str(int(seconds)),
        "-b",
        "tpcb-like@1",
        "-f",
        f"{script}@1",
    )


def one_run(tool: Tool, cluster: Cluster, args: argparse.Namespace, workdir: Path) -> Sample:
    s = Sample()
    step = f"  [{tool.name}]"
    script = workdir / "bulk.sql"
    script.write_text(BULK_SCRIPT)

    print(f"{step} pgbench -i -s {args.scale}, archiving paused", flush=True)
    start = time.monotonic()
    pgbench(cluster, "-i", "-q", "-s", str(args.scale))
    s.init_s = time.monotonic() - start
    s.db_bytes = int(cluster.query("SELECT pg_database_size('postgres')"))
    s.pg_version = str(cluster.query("SHOW server_version")).split()[0]
    last = cluster.switch_wal()
    s.backlog_segments = len(cluster.ready_files())

    print(f"{step} archiving a backlog of {s.backlog_segments} segments", flush=True)
    tool.start_archiving()
    start = time.monotonic()
    cluster.set_archive_command(tool.archive_command())
    cluster.wait_archived(last)
    s.backlog_s = time.monotonic() - start

    print(f"{step} write load for {args.load_seconds:.0f} s", flush=True)
    cluster.query("CHECKPOINT")
    before_lsn, before_count = current_lsn_bytes(cluster), archived_count(cluster)
    with ReadySampler(cluster) as sampler:
        start = time.monotonic()
        out = write_load(cluster, args, args.load_seconds, script)
        s.load_seconds = time.monotonic() - start
        s.archived_during_load = archived_count(cluster) - before_count
        last = cluster.switch_wal()
        s.drain_s = cluster.wait_archived(last)
    s.load_tps = tps(out)
    s.load_segments = (current_lsn_bytes(cluster) - before_lsn) / SEGMENT_BYTES
    s.max_ready, s.max_ready_age_s = sampler.max_count, sampler.max_age

    print(f"{step} base backup", flush=True)
    start = time.monotonic()
    tool.backup()
    s.backup_s = time.monotonic() - start

    print(f"{step} {args.replay_seconds:.0f} s of writes after the backup", flush=True)
    write_load(cluster, args, args.replay_seconds, script)
    cluster.wait_archived(cluster.switch_wal())
    rows = int(cluster.query(HISTORY_ROWS))
    tool.stop_archiving()
    cluster.server.stop()
    s.repo_bytes = tool.repository_bytes()
    s.notes += tool.problems()

    print(f"{step} restore to the latest point", flush=True)
    timing = tool.restore(workdir / "restored")
    s.restore_files_s, s.restore_total_s = timing.files_s, timing.total_s
    s.rows_match = timing.rows == rows
    if not s.rows_match:
        s.notes.append(f"restored pgbench_history has {timing.rows} rows, the source {rows}")
    return s


def run_tool(name: str, args: argparse.Namespace, base: Path) -> Sample | str:
    """One tool's run on a fresh cluster; a string says why there is no sample."""
    workdir = owned_dir(base / name)
    cluster = start_cluster(workdir)
    tool: Tool
    try:
        if name == "theirs":
            tool = PgBackRest(workdir / "pgbackrest", cluster)
        else:
            tool = Ours(workdir / "ours", cluster)
    except NotAvailable as exc:
        cluster.server.stop()
        return str(exc)
    try:
        return one_run(tool, cluster, args, workdir)
    finally:
        tool.stop_archiving()
        cluster.server.stop()


# --------------------------------------------------------------------------- report

ROWS: list[tuple[str, str, str]] = [
    # (label, Sample attribute, format)
    ("database after pgbench -i (MiB)", "db_mib", "{:.0f}"),
    ("pgbench -i, archiving paused (s)", "init_s", "{:.1f}"),
    ("backlog: segments queued", "backlog_segments", "{:.0f}"),
    ("backlog: time to archive all (s)", "backlog_s", "{:.2f}"),
    ("backlog: archive rate (seg/s)", "backlog_rate", "{:.1f}"),
    ("load: pgbench tps", "load_tps", "{:.0f}"),
    ("load: WAL written (segments)", "load_segments", "{:.1f}"),
    ("load: archived while it ran", "archived_during_load", "{:.0f}"),
    ("load: drain after switch (s)", "drain_s", "{:.2f}"),
    ("load+drain: archive rate (seg/s)", "load_rate", "{:.2f}"),
    ("lag: most .ready files at once", "max_ready", "{:.0f}"),
    ("lag: oldest .ready age (s)", "max_ready_age_s", "{:.2f}"),
    ("base backup (s)", "backup_s", "{:.1f}"),
    ("restore: files in place (s)", "restore_files_s", "{:.1f}"),
    ("restore: recovery after that (s)", "restore_recovery_s", "{:.1f}"),
    ("restore: until promoted (s)", "restore_total_s", "{:.1f}"),
    ("repository size (MiB)", "repo_mib", "{:.0f}"),
]


# The figures printed for every run beside the medians: the noisy ones.
PER_RUN = ("backlog_rate", "backup_s", "restore_files_s", "restore_recovery_s", "restore_total_s")


def value(sample: Sample, attr: str) -> float:
    if attr == "db_mib":
        return sample.db_bytes / 2**20
    if attr == "repo_mib":
        return sample.repo_bytes / 2**20
    return float(getattr(sample, attr))


def median_of(samples: list[Sample], attr: str) -> float:
    return statistics.median(value(s, attr) for s in samples)


def cell(samples: list[Sample] | str, attr: str, fmt: str) -> str:
    if isinstance(samples, str):
        return "n/a"
    return fmt.format(median_of(samples, attr))


def runs(samples: list[Sample] | str, attr: str, fmt: str) -> str:
    if isinstance(samples, str):
        return "n/a"
    return " ".join(fmt.format(value(s, attr)) for s in samples)


def ratio_line(
    label: str, ours: list[Sample] | str, theirs: list[Sample], attr: str, target: str
) -> str:
    if isinstance(ours, str):
        return f"{label:<34} not available yet ({ours})"
    theirs_value = median_of(theirs, attr)
    if not theirs_value:  # no .ready file ever waited: nothing to divide by
        return f"{label:<34}    n/a  {target}"
    r = median_of(ours, attr) / theirs_value
    return f"{label:<34} {r:6.2f}x  {target}"


def report(results: dict[str, list[Sample] | str], args: argparse.Namespace) -> None:
    ours, theirs = results["ours"], results["theirs"]
    assert not isinstance(theirs, str)
    print()
    print(
        f"backup bench: pgbench scale {args.scale}, {args.clients} clients for "
        f"{args.load_seconds:.0f} s (+{args.replay_seconds:.0f} s after the backup), "
        f"median of {args.runs} run(s)"
    )
    print(
        f"  PostgreSQL {args.pg_version}, {os.cpu_count()} CPUs; one fresh cluster per tool, "
        "same settings and load\n"
        "  both repositories are local directories (file://): pgBackRest 2.45 has no "
        f"plain-HTTP S3\n  zstd level {ZSTD_LEVEL} on both; {PROCESS_MAX} files at once "
        "(process-max with archive-async, upload_concurrency)"
    )
    print(f"  {'':<34} {'stellarbase':>12} {'pgBackRest':>12}")
    for label, attr, fmt in ROWS:
        print(f"  {label:<34} {cell(ours, attr, fmt):>12} {cell(theirs, attr, fmt):>12}")
    if args.runs > 1:
        print("  each run (in run order; the first tool alternates):")
        for label, attr, fmt in ROWS:
            if attr in PER_RUN:
                print(f"  {label:<34} {runs(ours, attr, fmt):>12} {runs(theirs, attr, fmt):>12}")
    for name, samples in (("stellarbase", ours), ("pgBackRest", theirs)):
        if isinstance(samples, str):
            continue
        matched = sum(s.rows_match for s in samples)
        print(f"  {name}: restored pgbench_history matches the source in {matched}/{len(samples)}")
        for note in (n for s in samples for n in s.notes):
            print(f"  {name}: {note}")
    print("ours/theirs:")
    for label, attr, target in (
        # Throughput is what the archiver can move: the backlog. Under load both keep up,
        # so load+drain follows how much WAL pgbench wrote beside the archiver.
        ("WAL archive rate, backlog", "backlog_rate", f"target >= {TARGET_ARCHIVE:.1f}x"),
        ("WAL archive rate, load+drain", "load_rate", "(higher is better; pgbench-bound)"),
        ("drain after the load", "drain_s", "(lower is better)"),
        ("most .ready files", "max_ready", "(lower is better)"),
        ("oldest .ready age", "max_ready_age_s", "(lower is better)"),
        ("base backup time", "backup_s", "(lower is better)"),
        ("restore time, until promoted", "restore_total_s", f"target <= {TARGET_RESTORE:.1f}x"),
        ("repository size", "repo_mib", "(lower is better)"),
    ):
        print("  " + ratio_line(label, ours, theirs, attr, target))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--scale", type=int, default=70, help="pgbench scale (70: about 1 GB)")
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--replay-seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    args.pg_version = "?"
    from stellarbase import log

    log.setup("warning")  # our engine logs each backup and restore at info
    if os.geteuid() != 0:
        sys.exit("run as root: the servers and pgBackRest run as the postgres account")
    if shutil.which("pgbackrest") is None:
        sys.exit("pgbackrest not found: apt-get install pgbackrest")

    results: dict[str, list[Sample] | str] = {"ours": [], "theirs": []}
    base = Path(tempfile.mkdtemp(prefix="sb-bench-backup-"))
    base.chmod(0o755)  # the postgres account must reach its directories below
    try:
        for run in range(args.runs):
            # Alternate who goes first, so a warm page cache favours neither.
            order = ("theirs", "ours") if run % 2 == 0 else ("ours", "theirs")
            for name in order:
                got = results[name]
                if isinstance(got, str):
                    continue
                print(f"run {run + 1}/{args.runs}: {name}", flush=True)
                sample = run_tool(name, args, base / f"{run}")
                if not isinstance(sample, str):
                    args.pg_version = sample.pg_version
                if isinstance(sample, str):
                    results[name] = sample
                else:
                    got.append(sample)
    finally:
        servers.stop_all()
        shutil.rmtree(base, ignore_errors=True)
    report(results, args)


if __name__ == "__main__":
    if CHILD_FLAG in sys.argv:
        archiver_child()
    else:
        main()
