"""A base backup's files put in place: its parts fetched, decoded, checked and extracted
at once, then synced to disk before anything uses them.

Each part is a tar of whole files, so parts extract independently into the same
directory. Per part, one thread fetches, decrypts and decompresses while another hashes
and writes; zstd, AES-GCM, sha256 and os.write all release the GIL, so the threads of
several parts keep every core busy. A part whose checksum or size differs from the
manifest fails the restore, which names the part: the directory then holds a damaged
copy that nothing has started on.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from stellarbase.backup import codec
from stellarbase.backup.codec import CodecError
from stellarbase.backup.manifest import Manifest, Part
from stellarbase.backup.store import Repository
from stellarbase.backup.tarstream import TarError, TarExtractor
from stellarbase.errors import ExitCode, StellarError
from stellarbase.files import fsync_dir

EXTRACT_WORKERS = 4  # parts extracted at once
_DEPTH = 8  # decoded pieces held per part between its decoder and its writer
_PUT_WAIT_S = 0.1


class _Cancelled(Exception):
    """Another part failed; this one stops early."""


class _ReadAhead:
    """Runs an iterator of decoded pieces in a thread, a bounded queue ahead of the caller.

    close() stops the thread even when the caller gave up half-way (an error elsewhere).
    """

    def __init__(self, pieces: Iterator[bytes], depth: int = _DEPTH) -> None:
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._pump, args=(pieces,), daemon=True)
        self._thread.start()

    def _pump(self, pieces: Iterator[bytes]) -> None:
        try:
            for piece in pieces:
                if not self._put(piece):
                    return
            self._put(None)
        except BaseException as exc:  # handed to the reader, raised there
            self._put(exc)

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_PUT_WAIT_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __enter__(self) -> _ReadAhead:
        return self

    def __exit__(self, *_: object) -> None:
        self._closed.set()
        self._thread.join()


def _mismatch(backup: Manifest, part: Part, data_dir: Path) -> StellarError:
    return StellarError(
        f"backup {backup.id}: {part.key} does not match its manifest (sha256 or size); "
        f"{data_dir} holds a damaged copy",
        hint="restore another backup; `stellarbase backup verify` checks them all",
        code=ExitCode.BACKUP,
    )


def extract_part(
    repo: Repository,
    key: bytes | None,
    backup: Manifest,
    part: Part,
    data_dir: Path,
    cancel: threading.Event | None = None,
) -> int:
    """Extract one part into `data_dir`, checking it against the manifest; raw bytes."""
    extractor = TarExtractor(data_dir)
    digest = hashlib.sha256()
    size = 0
    try:
        with (
            repo.open_read(part.key) as raw,
            _ReadAhead(
                codec.decoded_chunks(raw, backup.codec, key, name=part.key, backup_id=backup.id)
            ) as pieces,
        ):
            for piece in pieces:
                if cancel is not None and cancel.is_set():
                    raise _Cancelled
                digest.update(piece)
                size += len(piece)
                extractor.feed(piece)
        extractor.finish()
    except (CodecError, TarError) as exc:
        raise StellarError(
            f"backup {backup.id}: {part.key} cannot be extracted: {exc.message}; "
            f"{data_dir} holds a damaged copy",
            hint=exc.hint,
            code=ExitCode.BACKUP,
        ) from None
    finally:
        extractor.close()
    if digest.hexdigest() != part.sha256 or size != part.raw_bytes:
        raise _mismatch(backup, part, data_dir)
    return size


def extract_backup(
    repo: Repository,
    key: bytes | None,
    backup: Manifest,
    data_dir: Path,
    workers: int = EXTRACT_WORKERS,
) -> int:
    """Extract every part of `backup` into `data_dir`, durably (fsynced); raw bytes.

    The first failure stops the other parts and is raised.
    """
    cancel = threading.Event()
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(backup.parts)))) as pool:
        futures = [
            pool.submit(extract_part, repo, key, backup, part, data_dir, cancel)
            for part in backup.parts
        ]
        wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.done() and f.exception() is not None for f in futures):
            cancel.set()
            for future in futures:
                future.cancel()
            wait(futures)
            errors = [
                error
                for f in futures
                if not f.cancelled()
                and (error := f.exception()) is not None
                and not isinstance(error, _Cancelled)
            ]
            raise errors[0]
    total = sum(f.result() for f in futures)
    sync_dirs(data_dir)
    return total


def sync_dirs(path: Path) -> None:
    """fsync every directory under `path` (and it): their entries are then durable too."""
    for dirpath, _, _ in os.walk(path):
        fsync_dir(Path(dirpath))
