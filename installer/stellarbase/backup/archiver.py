"""Continuous WAL archiving: the agent uploads ahead, archive_command only confirms.

PostgreSQL marks each finished WAL file with `pg_wal/archive_status/<name>.ready` and
calls archive_command for it, one at a time. Starting Python per file costs far more than
the upload, so the command is a few lines of `sh`: it waits for the marker
`<spool>/archived/<name>` and succeeds only when the marker holds the sha256 of the file
Postgres handed it. This loop, meanwhile, uploads every `.ready` file in parallel and
writes a marker only after the repository acknowledged the bytes. Nothing in
archive_status is ever renamed here: acknowledgement is archive_command's exit status.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import structlog

from stellarbase.backup import auth, codec, walnames
from stellarbase.backup.pgcommand import command_path
from stellarbase.backup.repo import ClusterIdentity, ensure_identity, read_identity, repository_from
from stellarbase.backup.store import Repository
from stellarbase.errors import ExitCode, StellarError, one_line

if TYPE_CHECKING:
    from stellarbase.config import Config

log = structlog.get_logger()

MARKERS = "archived"
WAIT_STEPS = 100  # archive_command waits WAIT_STEPS * 0.1 s for the marker
BACKOFF_CAP_S = 5.0

# XLogLongPageHeaderData (access/xlog_internal.h), little-endian on the hosts we support:
# magic u16, info u16, tli u32, pageaddr u64, rem_len u32, pad, sysid u64, seg_size u32,
# blcksz u32.
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
_XLP_LONG_HEADER = 0x0002


class ArchiveError(StellarError):
    """A WAL file that must not be archived as it is (foreign, damaged, conflicting)."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message, hint=hint, code=ExitCode.BACKUP)


def archive_command(spool_dir: Path) -> str:
    """The archive_command: confirm the agent's marker for %f against the identity of %p.

    The marker holds the inode, size and mtime (seconds) the file had when the agent read
    it for the upload, whose bytes the store verified. A file Postgres hands to
    archive_command is complete and no longer written, so the same identity means the same
    bytes; a recycled or recreated file has another inode or mtime. Hashing 16 MiB here
    instead would cost ~0.1 s per segment, and Postgres archives one segment at a time.

    Runs as the postgres user with the data directory as cwd (%p is relative to it), so
    the spool must be readable by that user. `stat`'s own `%` are written `%%`: PostgreSQL
    16+ refuse any other `%x` (see `pgcommand`).
    """
    markers = command_path(spool_dir / MARKERS, "WAL spool path")
    return (
        f"m={markers}/%f; i=0; "
        f'while [ ! -f "$m" ]; do [ $i -ge {WAIT_STEPS} ] && exit 1; i=$((i+1)); sleep 0.1; done; '
        '[ "$(cat "$m")" = "$(stat -c \'%%i %%s %%Y\' "%p")" ]'
    )


SEGMENT_HEADER_LEN = _LONG_HEADER.size
_READ = 1024 * 1024  # bytes per read of a WAL file


def check_segment_header(name: str, head: bytes, size: int, sysid: str) -> None:
    """Refuse a segment of another cluster, of another position, or of the wrong size,
    from its first SEGMENT_HEADER_LEN bytes and its size."""
    if len(head) < _LONG_HEADER.size:
        raise ArchiveError(
            f"WAL segment {name} is {size} bytes: too short for a page header",
            hint="the file is damaged; look at the PostgreSQL log",
        )
    _magic, info, _tli, pageaddr, _rem, file_sysid, seg_size, _blcksz = _LONG_HEADER.unpack_from(
        head
    )
    if not info & _XLP_LONG_HEADER:
        raise ArchiveError(
            f"WAL segment {name} does not start with a long page header",
            hint="the file is damaged; look at the PostgreSQL log",
        )
    if str(file_sysid) != sysid:
        raise ArchiveError(
            f"WAL segment {name} belongs to cluster {file_sysid}, the repository to {sysid}",
            hint="a file from another cluster is in pg_wal, or backup.prefix is shared; "
            "use another backup.prefix for a new cluster",
        )
    if seg_size == 0 or size != seg_size:
        raise ArchiveError(
            f"WAL segment {name} is {size} bytes, its header says {seg_size}",
            hint="the file is damaged; look at the PostgreSQL log",
        )
    expected = walnames.parse_segment(name, seg_size).start_lsn(seg_size)
    if pageaddr != expected:
        raise ArchiveError(
            f"WAL segment {name} starts at {walnames.format_lsn(pageaddr)}, "
            f"its name says {walnames.format_lsn(expected)}",
            hint="the file was renamed or damaged",
        )


def local_identity(pg_wal: Path) -> ClusterIdentity:
    """The identity of the cluster whose pg_wal this is, read from its data directory.

    pg_control starts with the system identifier. PG_VERSION holds only the major version,
    so pg_version is major * 10000 (base backups record the exact server_version_num).
    """
    data_dir = pg_wal.parent
    try:
        with open(data_dir / "global" / "pg_control", "rb") as f:
            (sysid,) = struct.unpack("<Q", f.read(8))
        major = int((data_dir / "PG_VERSION").read_text().strip())
        segment_size = next(
            (e.stat().st_size for e in os.scandir(pg_wal) if walnames.is_segment(e.name)),
            walnames.DEFAULT_SEGMENT_SIZE,
        )
    except (OSError, ValueError, struct.error) as exc:
        raise StellarError(
            f"cannot read the cluster identity under {data_dir}: {exc}",
            hint="the archiver needs read access to the PostgreSQL data directory",
            code=ExitCode.HOST,
        ) from None
    return ClusterIdentity(str(sysid), major * 10000, segment_size)


def store_wal(
    repo: Repository,
    name: str,
    data: bytes,
    sysid: str,
    mtime: float,
    *,
    level: int,
    key: bytes | None,
) -> int:
    """store_wal_from for a file already in memory (a timeline history file)."""
    digest = hashlib.sha256(data).hexdigest()
    return store_wal_from(
        repo, name, io.BytesIO(data), digest, len(data), sysid, mtime, level=level, key=key
    )


def store_wal_from(
    repo: Repository,
    name: str,
    source: BinaryIO,
    digest: str,
    size: int,
    sysid: str,
    mtime: float,
    *,
    level: int,
    key: bytes | None,
    scratch: Path | None = None,
) -> int:
    """Store one WAL file as `name`; with a key, sealed to that name, its metadata MACed.

    The metadata records the stored size and the sealed header, so restore can tell a
    body moved under another object's metadata from a HEAD and a 12-byte read. The body
    is encoded into a temporary file in `scratch` and sent from there: an upload holds
    one read buffer, not the segment and its encoded copy, whatever the segment size.
    Returns the stored size.
    """
    encoder = codec.StreamEncoder(level, key, size=size, name=name)
    with tempfile.TemporaryFile(dir=scratch) as body:
        while chunk := source.read(_READ):
            body.write(encoder.write(chunk))
        body.write(encoder.finish())
        stored = body.tell()
        body.seek(0)
        header = body.read(codec.HEADER_LEN)
        body.seek(0)
        meta = {
            "sha256": digest,
            "size": str(size),
            "codec": codec.codec_name(key),
            "sysid": sysid,
            "mtime": repr(mtime),
        }
        if key is not None:
            meta["stored"] = str(stored)
            meta["header"] = header.hex()
            meta = auth.seal_meta(key, name, meta)
        repo.put(name, body, meta)
    return stored


def _sha256_of(source: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := source.read(_READ):
        digest.update(chunk)
    return digest.hexdigest()


def reseal_histories(
    repo: Repository,
    key: bytes,
    sysid: str,
    read_local: Callable[[str], bytes | None],
    *,
    level: int = 3,
) -> list[str]:
    """Store again, authenticated, the timeline history files an older release archived.

    Every restore reads every history file, so one that is not authentic would refuse
    them all. The cluster keeps its history files in pg_wal: `read_local(name)` gives
    that copy (None when absent), which is stored only when its checksum is the one the
    repository recorded. Returns the names stored again; the others stay refused.
    """
    resealed: list[str] = []
    for info in repo.list("wal/"):
        name = info.key[len("wal/") :]
        if not walnames.is_history(name):
            continue
        head = repo.head(info.key)
        if head is None:
            continue
        try:
            auth.check_meta(key, info.key, head.meta)
            continue
        except auth.AuthError:
            pass
        data = read_local(name)
        if data is None or hashlib.sha256(data).hexdigest() != head.meta.get("sha256"):
            log.warning("history file not authenticated and not in pg_wal", wal=name)
            continue
        mtime = float(head.meta.get("mtime", time.time()))
        store_wal(repo, info.key, data, sysid, mtime, level=level, key=key)
        resealed.append(name)
    return resealed


@dataclass(frozen=True)
class ArchiverStats:
    pending: int  # .ready files without a marker
    lag_seconds: float  # age of the oldest pending WAL file (mtime), 0 when none
    last_archived: str | None
    last_archived_at: float | None  # Unix time
    bytes_uploaded_total: int  # stored (encoded) bytes
    uploads_total: int
    failures_total: int
    last_error: str | None


@dataclass(frozen=True)
class Round:
    archived: int  # markers written this round (uploads and already-present objects)
    failed: int


def file_identity(st: os.stat_result) -> str:
    """What archive_command compares: `stat -c '%i %s %Y'` of the file."""
    return f"{st.st_ino} {st.st_size} {int(st.st_mtime)}"


def _write_marker(path: Path, identity: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(identity + "\n")
    os.chmod(temp, 0o644)
    os.replace(temp, path)


_M_MMAP_THRESHOLD = -3  # mallopt(3)


def return_freed_buffers() -> None:
    """Have glibc hand freed large buffers back to the system at once.

    glibc raises its mmap threshold after the first large free; from then on the 1 MB
    buffers of every upload thread come from per-thread heaps that keep their peak size.
    With the threshold fixed at 128 KiB they are mapped and unmapped each time: the agent
    with backups on stays near its idle size (bench/agent.py --backups). A C library
    without mallopt is left as it is.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


class Archiver:
    def __init__(
        self,
        repo: Repository,
        pg_wal: Path,
        spool: Path,
        *,
        level: int = 3,
        key: bytes | None = None,
        concurrency: int = 4,
        identity: ClusterIdentity | None = None,
    ) -> None:
        self.repo = repo
        self.pg_wal = pg_wal
        self.status_dir = pg_wal / "archive_status"
        self.spool = spool
        self.markers = spool / MARKERS
        self._level = level
        self._key = key
        self._codec = codec.codec_name(key)
        self._identity = identity
        self._sysid: str | None = None  # set once repo.json is checked
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="wal-upload")
        self._confirmed: set[str] = set()  # markers this process wrote or checked
        self._lock = threading.Lock()
        self._last_archived: str | None = None
        self._last_archived_at: float | None = None
        self._bytes = 0
        self._uploads = 0
        self._failures = 0
        self._last_error: str | None = None
        self.prepare_spool()

    @classmethod
    def from_config(cls, config: Config, pg_wal: Path, spool: Path) -> Archiver:
        backup = config.backup
        return cls(
            repository_from(backup, config.s3),
            pg_wal,
            spool,
            level=backup.compression_level,
            key=codec.encryption_key(backup),
            concurrency=backup.upload_concurrency,
        )

    def prepare_spool(self) -> None:
        # archive_command runs as postgres: it must reach the markers, never write them.
        for d in (self.spool, self.markers):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ----------------------------------------------------------------- scanning

    def _ready(self) -> list[str]:
        try:
            entries = os.listdir(self.status_dir)
        except FileNotFoundError:
            return []
        names = (e.removesuffix(".ready") for e in entries if e.endswith(".ready"))
        return sorted(n for n in names if walnames.is_wal_file(n))

    def _pending(self) -> Iterator[str]:
        for name in self._ready():
            if name not in self._confirmed or not (self.markers / name).exists():
                yield name

    def _check_repository(self) -> str:
        if self._sysid is None:
            identity = self._identity or read_identity(self.repo)
            if identity is None:
                identity = local_identity(self.pg_wal)
            ensure_identity(self.repo, identity)
            self._sysid = identity.system_identifier
        return self._sysid

    # ----------------------------------------------------------------- one file

    def _archive(self, name: str, sysid: str) -> bool:
        """Upload one WAL file and write its marker; False when it vanished meanwhile.

        The file is read in buffers, once to hash it and once to encode it: PostgreSQL
        does not touch a segment before archive_command has succeeded for it.
        """
        try:
            source = (self.pg_wal / name).open("rb")
        except FileNotFoundError:
            return False  # archived and removed by Postgres in the meantime
        with source:
            st = os.fstat(source.fileno())
            identity = file_identity(st)
            marker = self.markers / name
            with contextlib.suppress(FileNotFoundError):
                if marker.read_text().strip() == identity:
                    self._confirm(name, uploaded=0)
                    return True
                marker.unlink()  # from an earlier file of the same name: check the store again
            if walnames.is_segment(name) or walnames.is_partial(name):
                check_segment_header(name, source.read(SEGMENT_HEADER_LEN), st.st_size, sysid)
                source.seek(0)
            digest = _sha256_of(source)
            key = f"wal/{name}"
            existing = self.repo.head(key)
            stored = 0
            if existing is not None and existing.meta.get("sha256") != digest:
                raise ArchiveError(
                    f"{self.repo.description} already holds {key} with other content "
                    f"(sha256 {existing.meta.get('sha256', 'unknown')}, this file {digest})",
                    hint="two clusters archive to one prefix, or a timeline was reused; "
                    "use another backup.prefix for a new cluster",
                )
            if existing is None or not self._authentic(key, existing.meta):
                # Also when the stored copy is of an older format: this file is the original.
                source.seek(0)
                stored = store_wal_from(
                    self.repo,
                    key,
                    source,
                    digest,
                    st.st_size,
                    sysid,
                    st.st_mtime,
                    level=self._level,
                    key=self._key,
                    scratch=self.spool,
                )
        _write_marker(marker, identity)
        self._confirm(name, uploaded=stored)
        return True

    def _authentic(self, key: str, meta: Mapping[str, str]) -> bool:
        if self._key is None:
            return True
        try:
            auth.check_meta(self._key, key, meta)
        except auth.AuthError:
            return False
        return True

    def _confirm(self, name: str, uploaded: int) -> None:
        with self._lock:
            self._confirmed.add(name)
            self._last_archived = name
            self._last_archived_at = time.time()
            if uploaded:
                self._bytes += uploaded
                self._uploads += 1

    def _record_failure(self, name: str, exc: BaseException) -> None:
        message = (
            exc.message
            if isinstance(exc, StellarError)
            else f"{type(exc).__name__}: {one_line(exc)}"
        )
        with self._lock:
            self._failures += 1
            self._last_error = message
        log.error("wal archive failed", wal=name, error=message)

    # ----------------------------------------------------------------- rounds

    def run_once(self) -> Round:
        """Upload every pending WAL file (in parallel), then drop markers of removed files."""
        sysid = self._check_repository()
        names = list(self._pending())
        futures = {name: self._pool.submit(self._archive, name, sysid) for name in names}
        archived = failed = 0
        for name, future in futures.items():
            try:
                archived += int(future.result())
            except Exception as exc:  # one bad file must not stop the others
                failed += 1
                self._record_failure(name, exc)
        self._drop_stale_markers()
        return Round(archived, failed)

    def _drop_stale_markers(self) -> None:
        try:
            markers = os.listdir(self.markers)
        except FileNotFoundError:
            return
        for name in markers:
            if name.startswith(".") or (self.pg_wal / name).exists():
                continue
            with contextlib.suppress(FileNotFoundError):
                (self.markers / name).unlink()
            with self._lock:
                self._confirmed.discard(name)

    def run(self, stop: threading.Event, interval: float = 0.2) -> None:
        """Archive until `stop` is set; on failures, retry with a capped backoff."""
        delay = interval
        try:
            while not stop.is_set():
                try:
                    result = self.run_once()
                    failed = result.failed > 0
                except Exception as exc:  # the store may be down: keep going, keep reporting
                    self._record_failure("-", exc)
                    failed = True
                delay = min(BACKOFF_CAP_S, max(delay * 2, 0.5)) if failed else interval
                if failed:
                    log.warning("wal archiving behind, retrying", retry_in_s=delay)
                stop.wait(delay)
        finally:
            self.close()

    def stats(self) -> ArchiverStats:
        now = time.time()
        pending = [n for n in self._ready() if not (self.markers / n).exists()]
        oldest: float | None = None
        for name in pending:
            with contextlib.suppress(FileNotFoundError):
                mtime = (self.pg_wal / name).stat().st_mtime
                oldest = mtime if oldest is None else min(oldest, mtime)
        with self._lock:
            return ArchiverStats(
                pending=len(pending),
                lag_seconds=0.0 if oldest is None else max(0.0, now - oldest),
                last_archived=self._last_archived,
                last_archived_at=self._last_archived_at,
                bytes_uploaded_total=self._bytes,
                uploads_total=self._uploads,
                failures_total=self._failures,
                last_error=self._last_error,
            )


def run_archiver(config: Config, pg_wal: Path, spool: Path, stop: threading.Event) -> None:
    """The agent's entry: archive `pg_wal` into the configured repository until `stop`."""
    Archiver.from_config(config, pg_wal, spool).run(stop)
