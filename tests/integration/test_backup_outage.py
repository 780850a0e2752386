"""A bad day for the WAL archive: the store unreachable under write load until PostgreSQL has
failed to archive and a backlog of segments waits, and the archiver killed with SIGKILL while
it uploads that backlog. Nothing may be missing afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import yaml

from stellarbase.backup import restore, verify
from stellarbase.backup.repo import repository_from
from stellarbase.backup.store import Repository
from stellarbase.config import BackupConfig, S3Config
from tests import servers
from tests.integration.test_backup_restore import (
    BINDIR,
    RUN_AS,
    counts,
    restore_key,
    scratch,  # noqa: F401 -- a fixture
)
from tests.proxy import Proxy

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTAGE_MAX_S = 90.0  # the outage lasts until its effects show, at most this long
BACKLOG = 2  # segments waiting when the store comes back


class ArchiverProcess:
    """`stellarbase backup archiver` as its own process, the way the agent runs the loop."""

    def __init__(self, site: Path, pg_wal: Path, spool: Path, env: dict[str, str]) -> None:
        self.argv = [
            sys.executable, "-m", "stellarbase", "backup", "archiver",
            "--config", str(site), "--pg-wal", str(pg_wal), "--spool", str(spool),
        ]  # fmt: skip
        self.env = env
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        with tempfile.TemporaryFile() as errf:
            proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL, stderr=errf)
            # An archiver that refuses its config exits at once, and a base backup would
            # then wait for WAL archiving forever: fail here, with its reason, instead.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
                errf.seek(0)
                raise AssertionError(
                    f"the archiver exited with {proc.returncode}: {errf.read().decode()[-2000:]}"
                )
        return proc

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.proc = self._start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def ready_files(pg_wal: Path) -> int:
    return sum(1 for n in os.listdir(pg_wal / "archive_status") if n.endswith(".ready"))


class Load:
    """pgbench in short rounds until stopped, so the write load lasts exactly as long as the
    test needs it; every round must succeed."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgbench-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run([*self.argv, "-T", "2"], env=self.env, capture_output=True,
                                 text=True, check=False, timeout=60)  # fmt: skip
            if out.returncode != 0:
                self.failures.append(out.stderr[-2000:])
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def wait_until(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s: {what}"
        time.sleep(0.1)


def test_outage_and_sigkill_lose_no_wal(s3_server: servers.S3Server, scratch: Path) -> None:  # noqa: F811
    proxy = Proxy("127.0.0.1", int(s3_server.endpoint.rsplit(":", 1)[1]))
    prefix = f"outage/{scratch.name}"
    s3 = {"endpoint": proxy.url, "bucket": s3_server.bucket, "region": s3_server.region}
    site = scratch / "site.yaml"
    site.write_text(
        yaml.safe_dump(
            {"tier": "pilot", "backup": {"repository": "s3", "prefix": prefix}, "s3": s3}
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "installer"), str(REPO_ROOT)]),
        "STELLARBASE_S3__ACCESS_KEY": s3_server.access_key,
        "STELLARBASE_S3__SECRET_KEY": s3_server.secret_key,
    }
    config = BackupConfig(repository="s3", prefix=prefix)
    direct = S3Config(
        endpoint=s3_server.endpoint,
        bucket=s3_server.bucket,
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    repo: Repository = repository_from(config, direct)  # the test's own view, no proxy

    spool = scratch / "spool"
    spool.mkdir(mode=0o755)
    from stellarbase.backup.archiver import archive_command

    server = servers.start_postgres(
        scratch / "primary",
        extra={
            "archive_mode": "on",
            "archive_command": archive_command(spool),
            "archive_timeout": "10s",
            "max_wal_size": "512MB",
        },
    )
    pg_wal = server.data_dir / "pg_wal"
    archiver = ArchiverProcess(site, pg_wal, spool, env)
    url = f"postgresql://postgres:{server.admin_password}@{server.host}:{server.port}/"
    bench_env = {**os.environ, "PGPASSWORD": server.admin_password}
    bench = ["pgbench", "-h", server.host, "-p", str(server.port), "-U", "postgres"]
    load: Load | None = None
    try:
        assert subprocess.run([*bench, "-i", "-s", "2", "-q", "stellarbase"], env=bench_env,
                              capture_output=True, timeout=120).returncode == 0  # fmt: skip
        from stellarbase.backup.basebackup import take_backup

        take_backup(repo, url + "postgres", BINDIR, config, "before the outage")

        load = Load([*bench, "-n", "-c", "2", "-R", "300", "stellarbase"], bench_env)

        def stat(query: str) -> int:
            with psycopg.connect(url + "stellarbase", autocommit=True) as conn:
                row = conn.execute(query).fetchone()
            assert row is not None
            return int(row[0])

        wait_until("the load to write", lambda: stat("SELECT count(*) FROM pgbench_history") > 0,
                   timeout=30)  # fmt: skip
        with proxy.outage():
            stat("SELECT 1 FROM pg_switch_wal()")  # at least one segment must wait
            # PostgreSQL gives up on a segment once archive_command has waited its 10 s for
            # the marker; the load and archive_timeout then finish more segments behind it.
            wait_until(
                "PostgreSQL to fail archiving while a backlog builds up",
                lambda: (
                    stat("SELECT failed_count FROM pg_stat_archiver") >= 1
                    and ready_files(pg_wal) >= BACKLOG
                ),
                timeout=OUTAGE_MAX_S,
            )
            waiting = ready_files(pg_wal)
        assert waiting >= BACKLOG, "the outage held nothing back: it did not cut the store off"

        # Kill the archiver mid-way through the backlog: once uploads have resumed and
        # files are still waiting.
        before = sum(1 for _ in repo.list("wal/"))
        wait_until(
            "archiving to resume after the outage",
            lambda: sum(1 for _ in repo.list("wal/")) > before,
            timeout=60,
        )
        assert ready_files(pg_wal) >= 1
        archiver.kill()
        archiver.restart()
        # The restarted archiver takes over under the same load: let it archive one more.
        resumed = sum(1 for _ in repo.list("wal/"))
        wait_until(
            "the restarted archiver to upload",
            lambda: sum(1 for _ in repo.list("wal/")) > resumed,
            timeout=60,
        )
        load.stop()
        assert load.failures == [], load.failures[0]

        with psycopg.connect(url + "stellarbase", autocommit=True) as conn:
            final = counts(conn)
            last = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        assert last is not None
        wait_until(
            f"{last[0]} archived after the outage",
            lambda: repo.head(f"wal/{last[0]}") is not None,
            timeout=180,
        )
    finally:
        if load is not None:
            load.stop()
        archiver.stop()
        proxy.close()
        server.stop()

    report = verify.verify(repo, None)
    assert report.ok, report.messages
    result = restore.restore_into(
        repo,
        restore_key(config),
        restore.Target.latest(),
        data_dir=scratch / "restored",
        bindir=BINDIR,
        run_as=RUN_AS,
        keep_running=True,
    )
    assert result.cluster is not None
    try:
        with psycopg.connect(**result.cluster.conninfo(dbname="stellarbase")) as conn:
            assert counts(conn) == final
    finally:
        result.cluster.stop()
