"""`backup now`: a pg_basebackup tar stream, encoded on the fly into the repository.

The stream goes from pg_basebackup's stdout, cut into parts between files, through the
codec into uploads (see `parts`); nothing is staged on local disk. WAL is not included
(`-X none`): the archiver already holds it. The manifest is written last, so a backup
without one is visibly incomplete.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import structlog

from stellarbase.backup import auth, codec, walnames
from stellarbase.backup.manifest import ID_FORMAT, Manifest, manifest_key
from stellarbase.backup.parts import PART_BYTES, store_parts
from stellarbase.backup.repo import ClusterIdentity, ensure_identity
from stellarbase.backup.store import Repository
from stellarbase.config import BackupConfig
from stellarbase.errors import ExitCode, StellarError
from stellarbase.proc import BASE_ENV

log = structlog.get_logger()

_READ = 1024 * 1024
_WANTED = ("backup_label", "backup_manifest")
_HISTORY_MAX = 1024 * 1024  # bytes read of a timeline history file (they are a few lines)
_LABEL_START = re.compile(r"^START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+)", re.M)
_LABEL_TLI = re.compile(r"^START TIMELINE: (\d+)", re.M)


class BackupError(StellarError):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(
            message,
            hint=hint or "look at the PostgreSQL log; run again with --debug for details",
            code=ExitCode.BACKUP,
        )


def cluster_identity(conninfo: str) -> tuple[ClusterIdentity, list[str]]:
    """The cluster's identity and the names of its extra tablespaces."""
    import psycopg

    try:
        with psycopg.connect(conninfo, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT (pg_control_system()).system_identifier::text, "
                "current_setting('server_version_num')::int, "
                # pg_settings gives the size in bytes (unit B) since PostgreSQL 11.
                "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')"
            ).fetchone()
            spaces = conn.execute(
                "SELECT spcname FROM pg_tablespace "
                "WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1"
            ).fetchall()
    except psycopg.Error as exc:
        raise BackupError(
            f"cannot query PostgreSQL for the backup: {str(exc).strip().splitlines()[0]}",
            hint="the backup connects as the local superuser; check that PostgreSQL runs",
        ) from None
    assert row is not None  # a SELECT without FROM always returns one row
    return ClusterIdentity(str(row[0]), int(row[1]), int(row[2])), [s[0] for s in spaces]


def _split_password(conninfo: str) -> tuple[str, dict[str, str]]:
    """The conninfo without its password, and the env that carries it instead (not argv)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(conninfo)
    password = params.pop("password", None)
    env = {"PGPASSWORD": str(password)} if password is not None else {}
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None}), env


def _reseal_histories(
    repo: Repository, conninfo: str, key: bytes, sysid: str, backup: BackupConfig
) -> None:
    """History files an older release archived are stored again, authenticated, from the
    server's pg_wal (see `archiver.reseal_histories`): `backup now` is the upgrade step."""
    import psycopg

    from stellarbase.backup.archiver import reseal_histories

    def read_local(name: str) -> bytes | None:
        row = conn.execute(
            "SELECT pg_read_binary_file(%s, 0, %s, true)", (f"pg_wal/{name}", _HISTORY_MAX)
        ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    try:
        with psycopg.connect(conninfo, connect_timeout=10) as conn:
            done = reseal_histories(repo, key, sysid, read_local, level=backup.compression_level)
    except psycopg.Error as exc:
        raise BackupError(
            f"cannot read the timeline history files: {str(exc).strip().splitlines()[0]}"
        ) from None
    if done:
        log.info("history files stored again, authenticated", wal=done)


def _new_id(repo: Repository) -> tuple[str, dt.datetime]:
    while True:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        backup_id = now.strftime(ID_FORMAT)
        if repo.head(manifest_key(backup_id)) is None:
            return backup_id, now
        time.sleep(1.0)  # two backups in one second: the id is the start time


def _positions(files: dict[str, bytes]) -> tuple[int, int, int, int]:
    """(start LSN, start timeline, stop LSN, stop timeline) from backup_label and manifest."""
    label = files.get("backup_label", b"").decode(errors="replace")
    start = _LABEL_START.search(label)
    start_tli = _LABEL_TLI.search(label)
    if start is None or start_tli is None:
        raise BackupError("the backup stream has no backup_label with its WAL start point")
    try:
        ranges = json.loads(files["backup_manifest"])["WAL-Ranges"]
        last = ranges[-1]
        stop_lsn, stop_tli = walnames.parse_lsn(last["End-LSN"]), int(last["Timeline"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise BackupError(
            f"the backup stream has no usable backup_manifest WAL range ({exc!r})",
            hint="pg_basebackup must not run with --no-manifest",
        ) from None
    start_lsn = walnames.parse_lsn(start.group(1))
    if stop_lsn < start_lsn:
        raise BackupError("the backup's WAL end point lies before its start point")
    return start_lsn, int(start_tli.group(1)), stop_lsn, stop_tli


def _tail(stream: IO[bytes]) -> str:
    stream.seek(0)
    return stream.read().decode(errors="replace")


def _basebackup_stream(argv: list[str], env: dict[str, str]) -> Iterator[bytes]:
    """Run pg_basebackup and yield its stdout; raises BackupError when it fails."""
    with tempfile.TemporaryFile() as errf:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errf,
                env={**BASE_ENV, "LC_ALL": "C", **env},
            )
        except OSError as exc:
            raise BackupError(
                f"cannot run {argv[0]}: {exc}",
                hint="install the PostgreSQL client binaries of the server's version",
            ) from None
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(_READ):
                yield chunk
            code = proc.wait(timeout=60)
            stderr = _tail(errf)
            if code != 0:
                last = [line for line in stderr.splitlines() if line.strip()][-1:] or ["?"]
                raise BackupError(f"pg_basebackup failed with exit code {code}: {last[0]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def take_backup(
    repo: Repository,
    conninfo: str,
    bindir: Path,
    backup: BackupConfig,
    label: str,
    part_bytes: int = PART_BYTES,
) -> dict[str, Any]:
    """Take a full base backup into the repository and return its manifest document as
    stored (`Manifest.to_json`, with its MAC when a key is set: what `backup now` reports).

    The tar stream is cut into parts of about `part_bytes` (whole files each), which are
    compressed and written at once, up to `backup.upload_concurrency` of them; restore
    extracts them in parallel in the same way.
    """
    ident, spaces = cluster_identity(conninfo)
    if spaces:
        raise BackupError(
            f"the cluster has tablespaces outside the data directory: {', '.join(spaces)}",
            hint="a tar stream to stdout carries only the main data directory; move those "
            "tables to pg_default (ALTER TABLE … SET TABLESPACE pg_default) and drop them",
        )
    ensure_identity(repo, ident)
    key = codec.encryption_key(backup)
    if key is not None:
        _reseal_histories(repo, conninfo, key, ident.system_identifier, backup)
    codec_name = codec.codec_name(key)
    backup_id, started = _new_id(repo)
    meta = {"codec": codec_name, "sysid": ident.system_identifier}
    safe_conninfo, env = _split_password(conninfo)
    argv = [
        str(bindir / "pg_basebackup"),
        "-d",
        safe_conninfo,
        "-D",
        "-",
        "-Ft",
        "-X",
        "none",
        "-c",
        "fast",
        "-v",
        "-l",
        f"stellarbase {backup_id}",
    ]
    log.info("base backup starting", id=backup_id, repo=repo.description)
    stored = store_parts(
        repo,
        f"backups/{backup_id}/",
        _basebackup_stream(argv, env),
        meta,
        level=backup.compression_level,
        key=key,
        backup_id=backup_id,
        part_bytes=part_bytes,
        concurrency=backup.upload_concurrency,
        wanted=_WANTED,
        check=_positions,
    )
    parts = stored.parts
    start_lsn, timeline, stop_lsn, stop_tli = _positions(stored.files)
    finished = dt.datetime.now(dt.UTC).replace(microsecond=0)
    size = ident.wal_segment_size
    manifest = Manifest(
        id=backup_id,
        label=label,
        timeline=timeline,
        start_lsn=start_lsn,
        stop_lsn=stop_lsn,
        start_wal=walnames.segment_of(start_lsn, timeline, size).name(size),
        # The last segment the backup needs holds the byte before the end point.
        stop_wal=walnames.segment_of(max(stop_lsn - 1, start_lsn), stop_tli, size).name(size),
        system_identifier=ident.system_identifier,
        pg_version=ident.pg_version,
        wal_segment_size=size,
        start_time=started,
        stop_time=finished,
        raw_bytes=sum(p.raw_bytes for p in parts),
        stored_bytes=sum(p.stored_bytes for p in parts),
        codec=codec_name,
        parts=tuple(parts),
    )
    name = manifest_key(backup_id)
    doc = manifest.to_json()
    if key is not None:
        doc = auth.sign_manifest(key, name, doc)
    repo.put(name, (json.dumps(doc, indent=2) + "\n").encode(), {})
    log.info(
        "base backup done",
        id=backup_id,
        parts=len(parts),
        raw_bytes=manifest.raw_bytes,
        stored_bytes=manifest.stored_bytes,
    )
    return doc
