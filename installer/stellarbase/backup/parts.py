"""A base backup's tar stream stored as parts: cut between files, encoded and written at once.

Each part is a complete tar of whole files, so restore can fetch, decode and extract
the parts in parallel, and each has its own sha256 and sizes in the manifest. The
stream is never staged on disk: a part's worker hashes, compresses and writes the
pieces the reader hands it through a bounded queue, while earlier parts finish (their
last compression, the commit of their upload) beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from stellarbase.backup import codec
from stellarbase.backup.manifest import Part
from stellarbase.backup.store import ObjectWriter, Repository, RepositoryError
from stellarbase.backup.tarstream import END_OF_ARCHIVE, TarScanner
from stellarbase.errors import ExitCode, StellarError

log = structlog.get_logger()

PART_BYTES = 64 * 1024 * 1024  # a new part begins at the first file boundary past this
_QUEUE = 8  # pieces waiting per part
_PUT_WAIT_S = 0.1


class _Abandoned(Exception):
    """The stream failed elsewhere; this part is not committed."""


class _PartUpload:
    """One part: a worker hashes, compresses and writes what put() queues, then commits."""

    def __init__(
        self,
        writer: ObjectWriter,
        key: str,
        pool: ThreadPoolExecutor,
        level: int,
        encryption_key: bytes | None,
        backup_id: str,
    ) -> None:
        self.key = key
        self._backup_id = backup_id
        self.queued = 0  # raw bytes handed over so far
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUE)
        self._abandoned = threading.Event()
        self._future: Future[Part] = pool.submit(self._run, writer, level, encryption_key)

    def _put(self, item: bytes | None) -> bool:
        """Queue `item`; False when the worker has ended (its result says why)."""
        while True:
            try:
                self._queue.put(item, timeout=_PUT_WAIT_S)
                return True
            except queue.Full:
                if self._future.done():
                    return False

    def put(self, data: bytes) -> None:
        """Queue `data`; raises the worker's error if it failed."""
        self.queued += len(data)
        if not self._put(data):
            self._future.result()  # raises what ended the worker
            raise StellarError(f"the upload of {self.key} ended early", code=ExitCode.BACKUP)

    def end(self) -> None:
        self._put(None)

    def abandon(self) -> None:
        """Stop the worker without committing the object, and wait for it."""
        self._abandoned.set()
        self._put(None)
        with contextlib.suppress(BaseException):
            self._future.result()

    def result(self) -> Part:
        return self._future.result()

    def _run(self, writer: ObjectWriter, level: int, key: bytes | None) -> Part:
        sha = hashlib.sha256()
        raw = 0
        # zstd's own threads as well: parts arrive one after the other, so the part being
        # read is the one that must compress at the speed of the stream.
        encoder = codec.StreamEncoder(
            level, key, threads=-1, name=self.key, backup_id=self._backup_id
        )
        try:
            while (chunk := self._queue.get()) is not None and not self._abandoned.is_set():
                sha.update(chunk)
                raw += len(chunk)
                writer.write(encoder.write(chunk))
            if self._abandoned.is_set():
                raise _Abandoned(self.key)
            writer.write(encoder.finish())
            stored = writer.commit()
        except BaseException:
            writer.abort()
            raise
        return Part(self.key, sha.hexdigest(), raw, stored, encoder.header.hex())


@dataclass(frozen=True)
class Stored:
    parts: list[Part]
    files: dict[str, bytes]  # the `wanted` small files, as the stream carried them


def part_key(prefix: str, number: int) -> str:
    return f"{prefix}base.{number:04d}.tar.zst"


def store_parts(
    repo: Repository,
    prefix: str,
    stream: Iterable[bytes],
    meta: Mapping[str, str],
    *,
    level: int,
    key: bytes | None,
    backup_id: str = "",
    part_bytes: int = PART_BYTES,
    concurrency: int = 4,
    wanted: tuple[str, ...] = (),
    check: Callable[[dict[str, bytes]], object] | None = None,
) -> Stored:
    """Store the tar `stream` as parts `<prefix>base.NNNN.tar.zst`, up to `concurrency` at once.

    A part ends at the first member boundary past `part_bytes`: two zero blocks close it
    and the next member opens the next part; the last part keeps the stream's own end.
    `check` sees the `wanted` files before the last part is committed. When anything
    fails (the stream, `check`, a write), no part stays behind. With `key`, each part is
    sealed to its own key and `backup_id`.
    """
    scanner = TarScanner(wanted)
    uploads: list[_PartUpload] = []
    with ThreadPoolExecutor(max_workers=concurrency) as pool:

        def new_part() -> _PartUpload:
            name = part_key(prefix, len(uploads) + 1)
            upload = _PartUpload(repo.open_write(name, meta), name, pool, level, key, backup_id)
            uploads.append(upload)
            return upload

        try:
            current = new_part()
            for chunk in stream:
                pos = 0
                for start in scanner.feed(chunk):
                    if start > pos and current.queued + start - pos >= part_bytes:
                        current.put(chunk[pos:start])
                        current.put(END_OF_ARCHIVE)
                        current.end()
                        current = new_part()
                        pos = start
                if pos < len(chunk):
                    current.put(chunk[pos:] if pos else chunk)
            if check is not None:
                check(scanner.files)
            current.end()
            parts = [u.result() for u in uploads]
        except BaseException:
            if isinstance(stream, Generator):
                stream.close()  # ends pg_basebackup rather than leave it blocked on its pipe
            for upload in uploads:
                upload.abandon()
            _discard(repo, [u.key for u in uploads])
            raise
    return Stored(parts, dict(scanner.files))


def _discard(repo: Repository, keys: list[str]) -> None:
    """Remove the parts a failed backup had committed (best effort: expire finds the rest)."""
    try:
        repo.delete(keys)
    except RepositoryError as exc:
        log.warning("cannot remove the parts of a failed backup", error=exc.message)
