"""A tampered repository is refused before recovery starts, naming the object.

With backup.encryption_key set, a writer with bucket access but without the key plants
a plaintext object, swaps objects between names (WAL segments, base backup parts),
edits a manifest or edits WAL metadata. Restore, drill and verify all refuse, and the
restore writes nothing: its data directory is never created. The repository is a
`file://` one, copied for each case, so every case starts from the same authentic
repository; a copy in another place still restores (the names are relative to it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stellarbase.backup import catalog, codec, restore, verify
from stellarbase.backup.repo import repository_from
from stellarbase.backup.store import Repository
from stellarbase.config import BackupConfig, S3Config
from stellarbase.errors import StellarError
from tests import servers
from tests.integration.test_backup_restore import (
    BINDIR,
    KEY,
    RUN_AS,
    count_t,
    start_primary,
)

pytestmark = pytest.mark.integration

RAW_KEY = base64.b64decode(KEY)


@dataclass(frozen=True)
class Written:
    root: Path  # the authentic repository's directory (prefix included)
    manifests: list[dict[str, Any]]  # oldest first
    wal: list[str]  # segments archived after the newest backup, in order


@pytest.fixture(scope="module")
def scratch_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sb-tamper-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def written(scratch_dir: Path) -> Written:
    config = BackupConfig(repository=f"file://{scratch_dir}/repo", prefix="pg", encryption_key=KEY)
    repo = repository_from(config, None)
    primary = start_primary(scratch_dir, repo, config)
    try:
        primary.query(
            "CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g"
        )
        first = primary.backup(part_bytes=256 * 1024)
        primary.query("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g")
        primary.switch_and_wait()
        second = primary.backup(part_bytes=256 * 1024)
        names = []
        for _ in range(3):
            primary.query("INSERT INTO t SELECT g, 'y' FROM generate_series(1, 100) g")
            names.append(primary.switch_and_wait())
    finally:
        primary.close()
    return Written(scratch_dir / "repo" / "pg", [first, second], names)


@pytest.fixture
def copy(written: Written) -> Iterator[tuple[Repository, Path]]:
    """A copy of the authentic repository somewhere else: (repository, its directory)."""
    where = Path(tempfile.mkdtemp(prefix="sb-tamper-case-"))
    where.chmod(0o755)
    shutil.copytree(written.root, where / "repo" / "moved")
    config = BackupConfig(repository=f"file://{where}/repo", prefix="moved", encryption_key=KEY)
    yield repository_from(config, None), where
    shutil.rmtree(where, ignore_errors=True)


def swap(a: Path, b: Path) -> None:
    temp = a.with_name(a.name + "-swap")
    a.rename(temp)
    b.rename(a)
    temp.rename(b)


def swap_objects(root: Path, a: str, b: str, *, with_metadata: bool) -> None:
    swap(root / a, root / b)
    if with_metadata and (root / f"{a}.meta.json").exists():
        swap(root / f"{a}.meta.json", root / f"{b}.meta.json")


def edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def refused(repo: Repository, where: Path, *names: str) -> None:
    """Restore, drill and verify all refuse, naming one of `names` (every one for verify);
    restore writes nothing."""
    data_dir = where / "restored"
    with pytest.raises(StellarError) as exc:
        restore.restore_into(
            repo,
            RAW_KEY,
            restore.Target.latest(),
            data_dir=data_dir,
            bindir=BINDIR,
            run_as=RUN_AS,
        )
    assert any(n in exc.value.message for n in names), exc.value.message
    assert exc.value.hint
    assert not data_dir.exists(), "refused before the data directory was touched"
    drill_dir = where / "drill"
    drill_dir.mkdir(mode=0o755)
    with pytest.raises(StellarError) as drilled:
        restore.drill(repo, RAW_KEY, BINDIR, RUN_AS, drill_dir)
    assert any(n in drilled.value.message for n in names), drilled.value.message
    report = verify.verify(repo, RAW_KEY)
    assert set(names) <= {p.subject for p in report.problems}, report.messages
    assert report.authenticated


def test_an_authentic_repository_moved_elsewhere_restores(
    copy: tuple[Repository, Path], written: Written
) -> None:
    repo, where = copy
    report = verify.verify(repo, RAW_KEY)
    assert report.ok, report.messages
    result = restore.restore_into(
        repo,
        RAW_KEY,
        restore.Target.latest(),
        data_dir=where / "restored",
        bindir=BINDIR,
        run_as=RUN_AS,
        keep_running=True,
    )
    assert result.cluster is not None
    try:
        url = (
            f"postgresql://postgres@/stellarbase?host={result.cluster.socket_dir}"
            f"&port={result.cluster.port}"
        )
        assert count_t(url) == 20400
    finally:
        result.cluster.stop()


def test_a_plaintext_wal_object_is_refused_with_a_key(
    copy: tuple[Repository, Path], written: Written
) -> None:
    """Anyone can write zstd: a stand-in with consistent plaintext metadata is refused."""
    repo, where = copy
    name = f"wal/{written.wal[1]}"
    meta = dict(repo.head(name).meta)  # type: ignore[union-attr]
    forged = b"\0" * int(meta["size"])  # recovery would take it for the end of WAL
    plain = {"size": meta["size"], "sysid": meta["sysid"], "mtime": meta["mtime"]}
    plain.update(sha256=hashlib.sha256(forged).hexdigest(), codec=codec.ZSTD)
    repo.put(name, codec.encode(forged, 3, None), plain)
    refused(repo, where, name)


def test_wal_segments_swapped_between_names_are_refused(
    copy: tuple[Repository, Path], written: Written
) -> None:
    repo, where = copy
    a, b = (f"wal/{n}" for n in written.wal[:2])
    swap_objects(where / "repo" / "moved", a, b, with_metadata=True)
    refused(repo, where, a, b)


def test_wal_bodies_moved_under_other_metadata_are_refused(
    copy: tuple[Repository, Path], written: Written
) -> None:
    repo, where = copy
    a, b = (f"wal/{n}" for n in written.wal[:2])
    swap_objects(where / "repo" / "moved", a, b, with_metadata=False)
    refused(repo, where, a, b)


def test_parts_swapped_between_backups_are_refused(
    copy: tuple[Repository, Path], written: Written
) -> None:
    """The consistent attacker: the newest backup's part replaced by the older backup's,
    its manifest entry edited to match (sha256 and sizes), so no size check can tell."""
    repo, where = copy
    root = where / "repo" / "moved"
    older, newer = written.manifests
    stolen, target = older["parts"][0], newer["parts"][0]
    shutil.copyfile(root / stolen["key"], root / target["key"])
    manifest = root / "backups" / newer["id"] / "manifest.json"

    def match(doc: dict[str, Any]) -> None:
        doc["parts"][0] = {**stolen, "key": target["key"]}
        doc["stored_bytes"] = sum(p["stored_bytes"] for p in doc["parts"])
        doc["raw_bytes"] = sum(p["raw_bytes"] for p in doc["parts"])

    edit_json(manifest, match)
    refused(repo, where, f"backups/{newer['id']}/manifest.json")


def test_parts_swapped_within_a_backup_are_refused(
    copy: tuple[Repository, Path], written: Written
) -> None:
    """Named, nothing written. (Without --backup, restore takes the older backup instead,
    whose objects and WAL are authentic: the same data, a longer replay.)"""
    repo, where = copy
    newer = written.manifests[1]
    a, b = (p["key"] for p in newer["parts"][:2])
    swap_objects(where / "repo" / "moved", a, b, with_metadata=True)
    data_dir = where / "restored"
    with pytest.raises(StellarError) as exc:
        restore.restore_into(
            repo,
            RAW_KEY,
            restore.Target.latest(),
            data_dir=data_dir,
            bindir=BINDIR,
            run_as=RUN_AS,
            backup_id=newer["id"],
        )
    assert a in exc.value.message and not data_dir.exists()
    assert {a, b} <= {p.subject for p in verify.verify(repo, RAW_KEY).problems}


def test_an_edited_manifest_is_refused(copy: tuple[Repository, Path], written: Written) -> None:
    """A later stop time would make --to-time pick this backup for a moment it lacks."""
    repo, where = copy
    newer = written.manifests[1]
    name = f"backups/{newer['id']}/manifest.json"
    edit_json(where / "repo" / "moved" / name, lambda d: d.update(stop_time="2020-01-01T00:00:00Z"))
    refused(repo, where, name)


def test_edited_wal_metadata_is_refused(copy: tuple[Repository, Path], written: Written) -> None:
    """The completion time decides where --to-time stops: an edit is refused."""
    repo, where = copy
    name = f"wal/{written.wal[0]}"
    edit_json(
        where / "repo" / "moved" / f"{name}.meta.json", lambda m: m.update(mtime="1000000000.0")
    )
    refused(repo, where, name)


def test_backup_now_stores_older_history_files_again_from_pg_wal(scratch_dir: Path) -> None:
    """The upgrade path: every restore reads every history file, so `backup now` stores the
    ones an older release archived again, authenticated, from the cluster's pg_wal; a
    history file that is not the cluster's own stays refused."""
    import os
    import pwd

    base = scratch_dir / "upgrade"
    base.mkdir(mode=0o755)
    config = BackupConfig(repository=f"file://{base}/repo", prefix="pg", encryption_key=KEY)
    repo = repository_from(config, None)
    ours, planted = "00000002.history", "00000003.history"
    text = {ours: b"1\t0/1000000\tno recovery target specified\n", planted: b"2\t0/1\tx\n"}
    primary = start_primary(base, repo, config)
    try:
        postgres = pwd.getpwnam(RUN_AS)
        for name, data in text.items():
            local = primary.server.data_dir / "pg_wal" / name
            local.write_bytes(data if name == ours else b"1\t0/1\tlocal\n")
            os.chown(local, postgres.pw_uid, postgres.pw_gid)
            meta = {"sha256": hashlib.sha256(data).hexdigest(), "size": str(len(data))}
            repo.put(f"wal/{name}", codec.encode(data, 3, None), {**meta, "codec": codec.ZSTD})
        with pytest.raises(StellarError, match=f"wal/{ours}"):
            catalog.load_catalog(repo, RAW_KEY).histories()
        primary.backup()
    finally:
        primary.close()
    assert "mac" in repo.head(f"wal/{ours}").meta  # type: ignore[union-attr]
    report = verify.verify(repo, RAW_KEY)
    assert f"wal/{planted}" in {p.subject for p in report.problems}
    assert all(f"wal/{planted}" in str(p) for p in report.problems), report.messages


def test_on_s3_segments_copied_over_each_other_are_refused(
    s3_server: servers.S3Server, scratch_dir: Path
) -> None:
    """The store's own copy carries an object's metadata along (MetadataDirective COPY):
    the sealed name, not the metadata, tells the copy from the original."""
    config = BackupConfig(repository="s3", prefix="tamper", encryption_key=KEY)
    s3 = S3Config(
        endpoint=s3_server.endpoint,
        bucket=s3_server.bucket,
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    repo = repository_from(config, s3)
    base = scratch_dir / "s3"
    base.mkdir(mode=0o755)
    primary = start_primary(base, repo, config)
    try:
        primary.query("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        primary.backup()
        names = []
        for _ in range(2):
            primary.query("INSERT INTO t SELECT g FROM generate_series(1, 100) g")
            names.append(primary.switch_and_wait())
    finally:
        primary.close()
    client = servers.s3_client(s3_server)
    prefix = config.prefix.strip("/")
    a, b = (f"{prefix}/wal/{n}" for n in names)
    for source, target in ((a, f"{a}.swap"), (b, a), (f"{a}.swap", b)):
        client.copy_object(
            Bucket=s3_server.bucket,
            Key=target,
            CopySource={"Bucket": s3_server.bucket, "Key": source},
        )
    client.delete_object(Bucket=s3_server.bucket, Key=f"{a}.swap")
    refused(repo, base, *(f"wal/{n}" for n in names))
