"""The write side of backups against real servers: repositories on moto S3 and on disk,
WAL archiving from a real PostgreSQL through the shell archive_command, base backups."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stellarbase.backup import codec, walnames
from stellarbase.backup.archiver import Archiver, archive_command, file_identity
from stellarbase.backup.basebackup import BackupError, take_backup
from stellarbase.backup.filerepo import FileRepository
from stellarbase.backup.repo import (
    PART_SIZE,
    ClusterIdentity,
    ensure_identity,
    read_identity,
    repository_from,
)
from stellarbase.backup.store import ObjectNotFound, Repository, RepositoryError
from stellarbase.config import BackupConfig, S3Config
from stellarbase.errors import StellarError
from tests import servers

pytestmark = pytest.mark.integration

KEY = os.urandom(32)
PARTS = 2 * 1024 * 1024  # base backup parts small enough that a test cluster has several
SMALL_SEGMENT = 1024 * 1024  # a valid wal_segment_size; keeps synthetic segments cheap


def s3_config(server: servers.S3Server, endpoint: str | None = None) -> S3Config:
    return S3Config(
        endpoint=endpoint or server.endpoint,
        bucket=server.bucket,
        region=server.region,
        access_key=server.access_key,  # type: ignore[arg-type]
        secret_key=server.secret_key,  # type: ignore[arg-type]
    )


def backup_config(repository: str, encrypted: bool = False) -> BackupConfig:
    return BackupConfig(
        repository=repository,
        prefix=f"t/{uuid.uuid4().hex[:12]}",
        encryption_key=base64.b64encode(KEY).decode() if encrypted else None,  # type: ignore[arg-type]
    )


@pytest.fixture(params=["s3", "file"])
def repo(request: pytest.FixtureRequest, s3_server: servers.S3Server, tmp_path: Path) -> Repository:
    if request.param == "s3":
        return repository_from(backup_config("s3"), s3_config(s3_server), timeout=5)
    return repository_from(backup_config(f"file://{tmp_path / 'repo'}"), None)


# --------------------------------------------------------------------------- repositories


def test_put_head_get_list_delete(repo: Repository) -> None:
    repo.put("wal/000000010000000000000002", b"two", {"sha256": "b" * 64, "size": "3"})
    repo.put("wal/000000010000000000000001", b"one", {"sha256": "a" * 64, "size": "3"})
    repo.put("backups/x/manifest.json", b"{}", {})

    head = repo.head("wal/000000010000000000000001")
    assert head is not None and head.size == 3
    assert head.meta["sha256"] == "a" * 64
    assert repo.head("wal/000000010000000000000009") is None
    assert repo.get("wal/000000010000000000000002") == b"two"
    with pytest.raises(ObjectNotFound):
        repo.get("wal/000000010000000000000009")

    assert [o.key for o in repo.list("wal/")] == [
        "wal/000000010000000000000001",
        "wal/000000010000000000000002",
    ]
    assert [o.key for o in repo.list("")] == [  # no sidecars, no temp files
        "backups/x/manifest.json",
        "wal/000000010000000000000001",
        "wal/000000010000000000000002",
    ]

    repo.delete(["wal/000000010000000000000001", "wal/does-not-exist"])
    assert [o.key for o in repo.list("wal/")] == ["wal/000000010000000000000002"]
    with pytest.raises(ValueError):
        repo.put("../escape", b"", {})


def test_streaming_write_and_read(repo: Repository) -> None:
    data = os.urandom(PART_SIZE + PART_SIZE // 2)  # two parts on S3
    writer = repo.open_write("backups/b/base.tar.zst", {"codec": "zstd"})
    for i in range(0, len(data), 1 << 20):
        writer.write(data[i : i + (1 << 20)])
    assert repo.head("backups/b/base.tar.zst") is None  # invisible until commit
    assert writer.commit() == len(data)

    head = repo.head("backups/b/base.tar.zst")
    assert head is not None and head.size == len(data) and head.meta["codec"] == "zstd"
    with repo.open_read("backups/b/base.tar.zst") as reader:
        assert hashlib.sha256(reader.read()).digest() == hashlib.sha256(data).digest()

    aborted = repo.open_write("backups/c/base.tar.zst", {})
    aborted.write(os.urandom(PART_SIZE + 1))
    aborted.abort()
    assert repo.head("backups/c/base.tar.zst") is None
    assert [o.key for o in repo.list("backups/c/")] == []


def test_s3_sends_content_md5_on_every_write(s3_server: servers.S3Server) -> None:
    repo = repository_from(backup_config("s3"), s3_config(s3_server), timeout=5)
    sent: list[str] = []

    def capture(request: Any, **_: Any) -> None:
        md5 = request.headers.get("Content-MD5")
        sent.append(md5.decode() if isinstance(md5, bytes) else str(md5))

    repo._client.meta.events.register("before-send.s3.PutObject", capture)  # type: ignore[attr-defined]
    repo._client.meta.events.register("before-send.s3.UploadPart", capture)  # type: ignore[attr-defined]
    repo.put("wal/a", b"payload", {})
    part = os.urandom(PART_SIZE + 10)
    writer = repo.open_write("backups/a/base.tar.zst", {})
    writer.write(part)
    writer.commit()

    def md5(data: bytes) -> str:
        return base64.b64encode(hashlib.md5(data).digest()).decode()

    assert sent == [md5(b"payload"), md5(part[:PART_SIZE]), md5(part[PART_SIZE:])]
    uploads = repo._client.list_multipart_uploads(Bucket=s3_server.bucket)  # type: ignore[attr-defined]
    assert not uploads.get("Uploads")


def test_unreachable_store_names_it(s3_server: servers.S3Server, dead_port: int) -> None:
    config = s3_config(s3_server, endpoint=f"http://127.0.0.1:{dead_port}")
    repo = repository_from(backup_config("s3"), config, timeout=2)
    with pytest.raises(RepositoryError, match=r"^s3://stellarbase-test/t/\w+: put wal/a failed"):
        repo.put("wal/a", b"x", {})


def test_repo_json_refuses_another_cluster(repo: Repository) -> None:
    ours = ClusterIdentity("7000000000000000001", 150004, 16 * 1024 * 1024)
    ensure_identity(repo, ours)
    ensure_identity(repo, ours)
    assert read_identity(repo) == ours
    with pytest.raises(RepositoryError, match="7000000000000000001") as info:
        ensure_identity(repo, ClusterIdentity("7000000000000000002", 150004, ours.wal_segment_size))
    assert "use another backup.prefix" in info.value.hint


# ---------------------------------------------------------------- archiver, synthetic WAL


def fake_segment(name: str, sysid: int, size: int = SMALL_SEGMENT) -> bytes:
    seg = walnames.parse_segment(name, size)
    header = struct.pack(
        "<HHIQI4xQII", 0xD110, 0x0002, seg.timeline, seg.start_lsn(size), 0, sysid, size, 8192
    )
    return header + os.urandom(64) + bytes(size - len(header) - 64)


@pytest.fixture
def fake_wal(tmp_path: Path) -> Callable[[str, bytes], Path]:
    pg_wal = tmp_path / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)

    def add(name: str, data: bytes) -> Path:
        (pg_wal / name).write_bytes(data)
        (pg_wal / "archive_status" / f"{name}.ready").touch()
        return pg_wal

    return add


def archiver_for(repo: Repository, pg_wal: Path, spool: Path, sysid: int = 1) -> Archiver:
    identity = ClusterIdentity(str(sysid), 150000, SMALL_SEGMENT)
    return Archiver(repo, pg_wal, spool, key=KEY, concurrency=2, identity=identity)


def test_archiver_refuses_foreign_and_conflicting_segments(
    repo: Repository, fake_wal: Callable[[str, bytes], Path], tmp_path: Path
) -> None:
    ours, foreign, clash, same = (
        "000000010000000000000001",
        "000000010000000000000002",
        "000000010000000000000003",
        "000000010000000000000004",
    )
    fake_wal(ours, fake_segment(ours, sysid=1))
    fake_wal(foreign, fake_segment(foreign, sysid=2))
    clash_data = fake_segment(clash, sysid=1)
    fake_wal(clash, clash_data)
    same_data = fake_segment(same, sysid=1)
    pg_wal = fake_wal(same, same_data)
    other = fake_segment(clash, sysid=1)
    repo.put(f"wal/{clash}", other, {"sha256": hashlib.sha256(other).hexdigest()})
    repo.put(f"wal/{same}", b"x", {"sha256": hashlib.sha256(same_data).hexdigest()})

    archiver = archiver_for(repo, pg_wal, tmp_path / "spool")
    result = archiver.run_once()
    archiver.close()

    assert (result.archived, result.failed) == (2, 2)
    markers = tmp_path / "spool" / "archived"
    assert sorted(os.listdir(markers)) == [ours, same]
    assert repo.head(f"wal/{foreign}") is None
    info = repo.head(f"wal/{ours}")
    assert info is not None
    assert info.meta["sha256"] == hashlib.sha256((pg_wal / ours).read_bytes()).hexdigest()
    assert (markers / ours).read_text().strip() == file_identity((pg_wal / ours).stat())
    assert info.meta["codec"] == "zstd+aes256gcm" and info.meta["sysid"] == "1"
    assert (
        codec.decode(repo.get(f"wal/{ours}"), info.meta["codec"], KEY, name=f"wal/{ours}")
        == (pg_wal / ours).read_bytes()
    )
    # The stand-in for `same` matched its checksum but carried no MAC: with a key, the
    # archiver stores the authentic file over it rather than take it as archived.
    same_info = repo.head(f"wal/{same}")
    assert same_info is not None and "mac" in same_info.meta
    assert codec.decode(repo.get(f"wal/{same}"), codec.ZSTD_AES, KEY, name=f"wal/{same}") == (
        same_data
    )
    stats = archiver.stats()
    assert (stats.pending, stats.uploads_total, stats.failures_total) == (2, 2, 2)
    assert stats.lag_seconds >= 0 and stats.last_error is not None
    assert "already holds" in stats.last_error or "belongs to cluster 2" in stats.last_error
    assert all((pg_wal / "archive_status" / f"{n}.ready").exists() for n in (ours, same))


def test_archiver_keeps_retrying_through_an_outage(
    fake_wal: Callable[[str, bytes], Path], tmp_path: Path
) -> None:
    name = "000000010000000000000001"
    pg_wal = fake_wal(name, fake_segment(name, sysid=1))
    store = tmp_path / "store"
    store.write_text("not a directory: every write fails")
    archiver = archiver_for(FileRepository(store / "prefix"), pg_wal, tmp_path / "spool")
    stop = threading.Event()
    thread = threading.Thread(target=archiver.run, args=(stop, 0.05))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while archiver.stats().failures_total < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert archiver.stats().failures_total >= 2
        assert archiver.stats().pending == 1
        store.unlink()  # the store comes back
        while archiver.stats().pending and time.monotonic() < deadline + 30:
            time.sleep(0.1)
        assert archiver.stats().pending == 0
        assert (tmp_path / "spool" / "archived" / name).exists()
    finally:
        stop.set()
        thread.join(timeout=10)


def test_archiver_drops_markers_of_removed_files(
    repo: Repository, fake_wal: Callable[[str, bytes], Path], tmp_path: Path
) -> None:
    name = "000000010000000000000001"
    pg_wal = fake_wal(name, fake_segment(name, sysid=1))
    archiver = archiver_for(repo, pg_wal, tmp_path / "spool")
    archiver.run_once()
    marker = tmp_path / "spool" / "archived" / name
    assert marker.exists()
    (pg_wal / name).unlink()
    (pg_wal / "archive_status" / f"{name}.ready").unlink()
    archiver.run_once()
    archiver.close()
    assert not marker.exists()


def test_archive_command_checks_the_marker(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "archived").mkdir(parents=True)
    data_dir = tmp_path / "data"
    (data_dir / "pg_wal").mkdir(parents=True)
    name = "000000010000000000000001"
    (data_dir / "pg_wal" / name).write_bytes(b"wal bytes")
    # As PostgreSQL substitutes: the placeholders, and `%%` as one `%`.
    values = {"p": f"pg_wal/{name}", "f": name, "%": "%"}
    command = re.sub(r"%(.)", lambda m: values[m.group(1)], archive_command(spool))

    def run() -> int:
        return subprocess.run(["sh", "-c", command], cwd=data_dir, timeout=30).returncode

    wal = data_dir / "pg_wal" / name
    (spool / "archived" / name).write_text(file_identity(wal.stat()) + "\n")
    assert run() == 0
    os.utime(wal, (0, wal.stat().st_mtime + 5))  # rewritten since the upload
    assert run() == 1
    wal.unlink()
    wal.write_bytes(b"wal bytes")  # recreated: another file under the same name
    os.utime(wal, (0, wal.stat().st_mtime - 5))
    assert run() == 1
    with pytest.raises(StellarError, match="cannot be placed in a PostgreSQL command"):
        archive_command(Path("/var/lib/spool\nwith a line break"))


# --------------------------------------------------------------------------- a real PostgreSQL


@pytest.fixture(scope="module")
def spool() -> Iterator[Path]:
    # The postgres account must reach it; pytest's tmp dirs are root-only.
    path = Path(tempfile.mkdtemp(prefix="stellarbase-spool-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_repo_config(s3_server: servers.S3Server) -> tuple[BackupConfig, S3Config]:
    return backup_config("s3", encrypted=True), s3_config(s3_server)


@dataclass
class Cluster:
    pg: servers.PostgresServer
    archiver: Archiver


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    spool: Path,
    s3_repo_config: tuple[BackupConfig, S3Config],
) -> Iterator[Cluster]:
    """PostgreSQL archiving through archive_command, with the agent's archiver running."""
    pg = servers.start_postgres(
        tmp_path_factory.mktemp("pg-archiving"),
        extra={
            "archive_mode": "on",
            "archive_command": archive_command(spool),
            "wal_level": "replica",
        },
    )
    backup, s3 = s3_repo_config
    archiver = Archiver(
        repository_from(backup, s3, timeout=10),
        pg.data_dir / "pg_wal",
        spool,
        key=codec.encryption_key(backup),
        concurrency=backup.upload_concurrency,
    )
    stop = threading.Event()
    thread = threading.Thread(target=archiver.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield Cluster(pg, archiver)
    finally:
        pg.stop()  # first: a shutdown archives what is left, which needs the archiver
        stop.set()
        thread.join(timeout=30)


def admin_conninfo(pg: servers.PostgresServer) -> str:
    return (
        f"host={pg.host} port={pg.port} user=postgres dbname=postgres password={pg.admin_password}"
    )


def sql(pg: servers.PostgresServer, query: str) -> Any:
    with psycopg.connect(admin_conninfo(pg), autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchone() if cur.description else None


def wait_archived(pg: servers.PostgresServer, name: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = sql(pg, "SELECT last_archived_wal FROM pg_stat_archiver")
        if row[0] is not None and row[0] >= name:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} not archived after {timeout:.0f}s")


def pgbench(pg: servers.PostgresServer, *args: str) -> None:
    bindir = Path(servers._pg_bindir())
    subprocess.run(
        [str(bindir / "pgbench"), "-h", pg.host, "-p", str(pg.port), "-U", "postgres", *args],
        env={**os.environ, "PGPASSWORD": pg.admin_password},
        check=True,
        capture_output=True,
        timeout=60,
        user="postgres",
    )


def switch_wal(pg: servers.PostgresServer) -> str:
    with psycopg.connect(admin_conninfo(pg), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS tick (n int)")
        conn.execute("INSERT INTO tick VALUES (1)")
    return str(sql(pg, "SELECT pg_walfile_name(pg_switch_wal())")[0])


def test_archiver_uploads_every_segment_of_a_real_cluster(
    cluster: Cluster, s3_repo_config: tuple[BackupConfig, S3Config]
) -> None:
    pg, running_archiver = cluster.pg, cluster.archiver
    pgbench(pg, "-i", "-s", "2", "postgres")
    pgbench(pg, "-T", "5", "-c", "2", "postgres")
    last = switch_wal(pg)
    wait_archived(pg, last)

    repo = running_archiver.repo
    sysid = str(sql(pg, "SELECT system_identifier FROM pg_control_system()")[0])
    assert read_identity(repo) is not None
    assert read_identity(repo).system_identifier == sysid  # type: ignore[union-attr]
    stored = {o.key.removeprefix("wal/") for o in repo.list("wal/")}
    first = walnames.parse_segment(min(s for s in stored if walnames.is_segment(s)))
    expected = {
        walnames.Segment(1, n).name()
        for n in range(first.number, walnames.parse_segment(last).number + 1)
    }
    assert expected <= stored  # no gap from the first archived segment to the last switch

    pg_wal = pg.data_dir / "pg_wal"
    key = codec.encryption_key(s3_repo_config[0])
    checked = 0
    for name in sorted(expected):
        info = repo.head(f"wal/{name}")
        assert info is not None and info.meta["sysid"] == sysid
        original = codec.decode(
            repo.get(f"wal/{name}"), info.meta["codec"], key, name=f"wal/{name}"
        )
        assert hashlib.sha256(original).hexdigest() == info.meta["sha256"]
        if (pg_wal / name).exists():  # not yet recycled: compare with the source
            assert hashlib.sha256((pg_wal / name).read_bytes()).hexdigest() == info.meta["sha256"]
            checked += 1
    assert checked >= 1
    failed = sql(pg, "SELECT failed_count FROM pg_stat_archiver")[0]
    assert failed == 0
    stats = running_archiver.stats()
    assert stats.failures_total == 0 and stats.uploads_total >= len(expected)


def test_postgresql_18_archives_through_archive_command(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """PostgreSQL 16+ refuse a `%x` they do not know when archive_command runs: `stat`'s
    format and a `%` in the spool path must reach them as `%%`. Set as `install` sets it
    (ALTER SYSTEM), into a spool whose path needs quoting and escaping."""
    spool = Path(tempfile.mkdtemp(prefix="stellarbase-spool 100%i-"))
    spool.chmod(0o755)
    pg = servers.start_postgres(
        tmp_path_factory.mktemp("pg18-archiving"),
        major=18,
        auto_conf={"archive_mode": "on", "archive_command": archive_command(spool)},
    )
    repo = FileRepository(tmp_path / "repo")
    archiver = Archiver(repo, pg.data_dir / "pg_wal", spool, concurrency=2)
    stop = threading.Event()
    thread = threading.Thread(target=archiver.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert pg.major == 18
        names = [switch_wal(pg) for _ in range(3)]
        wait_archived(pg, names[-1], timeout=20)
        archived, failed = sql(pg, "SELECT archived_count, failed_count FROM pg_stat_archiver")
    finally:
        pg.stop()
        stop.set()
        thread.join(timeout=30)
        shutil.rmtree(spool, ignore_errors=True)
    assert (failed, archived >= 3) == (0, True)
    assert {f"wal/{n}" for n in names} <= {o.key for o in repo.list("wal/")}


def test_archive_throughput(cluster: Cluster) -> None:
    pg = cluster.pg
    wait_archived(pg, switch_wal(pg))
    count = 30
    started = time.monotonic()
    with psycopg.connect(admin_conninfo(pg), autocommit=True) as conn:
        for _ in range(count):  # a burst: Postgres hands over segments faster than one by one
            conn.execute("INSERT INTO tick VALUES (1)")
            row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
    assert row is not None
    wait_archived(pg, str(row[0]))
    seconds = time.monotonic() - started
    print(f"\narchived {count} segments in {seconds:.2f} s: {count / seconds:.1f} segments/s")
    assert sql(pg, "SELECT failed_count FROM pg_stat_archiver")[0] == 0


def test_base_backup(cluster: Cluster, s3_repo_config: tuple[BackupConfig, S3Config]) -> None:
    pg = cluster.pg
    backup, _ = s3_repo_config
    repo = cluster.archiver.repo
    bindir = Path(servers._pg_bindir())
    manifest = take_backup(repo, admin_conninfo(pg), bindir, backup, "nightly", part_bytes=PARTS)

    assert manifest["label"] == "nightly" and manifest["timeline"] == 1
    start = walnames.parse_lsn(manifest["start_lsn"])
    stop = walnames.parse_lsn(manifest["stop_lsn"])
    assert start <= stop
    assert manifest["start_wal"] == walnames.segment_of(start, 1).name()
    assert manifest["stop_wal"] >= manifest["start_wal"]
    assert manifest["codec"] == "zstd+aes256gcm"
    assert manifest["system_identifier"] == str(
        sql(pg, "SELECT system_identifier FROM pg_control_system()")[0]
    )
    assert manifest["pg_version"] // 10000 == 15
    stored = repo.get(f"backups/{manifest['id']}/manifest.json")
    assert json_load(stored) == manifest
    # pg_basebackup -X none waits until the stop segment is archived.
    assert repo.head(f"wal/{manifest['stop_wal']}") is not None

    # Several parts, each a tar of whole files with its own checksum; together the cluster.
    parts = manifest["parts"]
    assert len(parts) > 3
    assert sum(p["raw_bytes"] for p in parts) == manifest["raw_bytes"]
    assert sum(p["stored_bytes"] for p in parts) == manifest["stored_bytes"]
    names: list[str] = []
    label = b""
    for part in parts:
        with codec.decoding_reader(
            repo.open_read(part["key"]),
            manifest["codec"],
            KEY,
            name=part["key"],
            backup_id=manifest["id"],
        ) as reader:
            raw = reader.read()
        assert len(raw) == part["raw_bytes"]
        assert hashlib.sha256(raw).hexdigest() == part["sha256"]
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            names += tar.getnames()
            if "backup_label" in tar.getnames():
                member = tar.extractfile("backup_label")
                assert member is not None
                label = member.read()
    assert f"START WAL LOCATION: {manifest['start_lsn']}" in label.decode()
    assert "PG_VERSION" in names and "global/pg_control" in names
    assert len(names) == len(set(names))


def json_load(data: bytes) -> Any:
    import json

    return json.loads(data)


def test_base_backup_failure_leaves_nothing(cluster: Cluster, s3_server: servers.S3Server) -> None:
    pg = cluster.pg
    backup = backup_config("s3")
    repo = repository_from(backup, s3_config(s3_server), timeout=5)
    # The application role may query but has no REPLICATION: pg_basebackup itself fails.
    conninfo = (
        f"host={pg.host} port={pg.port} user={pg.user} dbname={pg.database} password={pg.password}"
    )
    bindir = Path(servers._pg_bindir())
    with pytest.raises(BackupError, match="pg_basebackup failed"):
        take_backup(repo, conninfo, bindir, backup, "doomed")
    assert [o.key for o in repo.list("backups/")] == []
    uploads = repo._client.list_multipart_uploads(Bucket=s3_server.bucket)  # type: ignore[attr-defined]
    assert not [u for u in uploads.get("Uploads", []) if backup.prefix in u["Key"]]


def test_base_backup_failing_late_removes_the_parts_it_stored(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stellarbase.backup import basebackup

    stored: list[str] = []
    real_store = basebackup.store_parts

    def store_then_look(*args: Any, **kwargs: Any) -> Any:
        def refuse(files: dict[str, bytes]) -> None:
            stored.extend(o.key for o in repo.list("backups/"))
            raise BackupError("the backup stream has no backup_label")

        return real_store(*args, **{**kwargs, "check": refuse})

    monkeypatch.setattr(basebackup, "store_parts", store_then_look)
    repo = FileRepository(tmp_path / "repo")
    with pytest.raises(BackupError, match="no backup_label"):
        take_backup(
            repo, admin_conninfo(cluster.pg), Path(servers._pg_bindir()), BackupConfig(), "x", PARTS
        )
    assert stored, "parts were committed before the failure"
    assert list(repo.list("backups/")) == []


def test_base_backup_refuses_tablespaces(cluster: Cluster, tmp_path: Path) -> None:
    pg = cluster.pg
    location = Path(tempfile.mkdtemp(prefix="stellarbase-ts-"))
    try:
        shutil.chown(location, "postgres", "postgres")
        sql(pg, f"CREATE TABLESPACE elsewhere LOCATION '{location}'")
        repo = FileRepository(tmp_path / "repo")
        with pytest.raises(BackupError, match="elsewhere") as info:
            take_backup(repo, admin_conninfo(pg), Path(servers._pg_bindir()), BackupConfig(), "x")
        assert "pg_default" in info.value.hint
        assert list(repo.list("backups/")) == []
    finally:
        sql(pg, "DROP TABLESPACE IF EXISTS elsewhere")
        shutil.rmtree(location, ignore_errors=True)
