"""The WAL spool between recovery and the restore: both its sides, the shell and the thread.

The restore_command (`restore_command`, built here) drops `<name>.want` into the spool and
waits for `<name>` or `<name>.missing`. This thread answers every request, downloads the
next segments of the chain in parallel within a bounded window, checks each file's sha256
after decoding, and touches `.alive` about once a second. A damaged file that recovery
asks for is never answered: the heartbeat stops, restore_command exits 126 and
PostgreSQL aborts recovery instead of treating the damage as the end of WAL.

The spool belongs to the cluster's account, which can plant links in it; this thread
(root) holds the spool by a directory fd and writes only new files through it
(O_EXCL|O_NOFOLLOW, fchown on the fd, renameat), so nothing outside the spool is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from stellarbase import fdops
from stellarbase.backup import codec
from stellarbase.backup.catalog import WAL_PREFIX, Catalog
from stellarbase.backup.pgcommand import command_path
from stellarbase.errors import StellarError

log = structlog.get_logger()

SPOOL_NAME = "stellarbase-restore"
HEARTBEAT = ".alive"
HEARTBEAT_STALE_S = 10  # restore_command gives up on a heartbeat older than this
CONCURRENCY = 8
WINDOW = 32  # segments on disk or in flight ahead of recovery
_POLL_S = 0.02
_BEAT_S = 1.0


def restore_command(spool_dir: Path) -> str:
    """The restore_command: wait for the prefetcher's file (or its `.missing` answer).

    Exit status 126 (a stale heartbeat) makes PostgreSQL abort recovery rather than take
    the missing file as the end of WAL. Every `%` that is not a placeholder, the spool
    path's included, is written `%%` (see `pgcommand`).
    """
    s = command_path(spool_dir, "restore spool path")
    return (
        f's={s}; touch "$s/%f.want" || exit 126; i=0; '
        f'while :; do if [ -f "$s/%f" ]; then rm -f "$s/%f.want"; '
        f'mv -f "$s/%f" "%p" || exit 126; exit 0; fi; '
        f'if [ -f "$s/%f.missing" ]; then rm -f "$s/%f.want"; exit 1; fi; '
        f"i=$((i+1)); if [ $i -ge 20 ]; then i=0; "
        f'a=$(stat -c %%Y "$s/.alive" 2>/dev/null || echo 0); '
        f"if [ $(($(date +%%s)-a)) -gt {HEARTBEAT_STALE_S} ]; then exit 126; fi; fi; "
        f"sleep 0.05; done"
    )


class Damaged(Exception):
    """A WAL file whose stored bytes do not decode to what its metadata promises."""


@dataclass(frozen=True)
class PrefetchStats:
    files: int
    bytes: int  # original bytes written to the spool
    seconds: float  # from the first download's start to the last one's end

    @property
    def files_per_second(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0


class Prefetcher:
    def __init__(
        self,
        catalog: Catalog,
        spool: Path,
        chain: Sequence[str],
        owner: pwd.struct_passwd,
        *,
        concurrency: int = CONCURRENCY,
        window: int = WINDOW,
    ) -> None:
        self._catalog = catalog
        self._spool = spool
        self._chain = list(chain)
        self._index = {name: i for i, name in enumerate(self._chain)}
        self._owner = owner
        self._concurrency = concurrency
        self._window = window
        self._dir_fd = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-prefetch", daemon=True)
        self._lock = threading.Lock()
        self._files = 0
        self._bytes = 0
        self._first: float | None = None
        self._last: float | None = None
        self.error: str | None = None

    def __enter__(self) -> Prefetcher:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        self._dir_fd = fdops.open_dir(self._spool)
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def stats(self) -> PrefetchStats:
        with self._lock:
            seconds = (self._last - self._first) if self._first and self._last else 0.0
            return PrefetchStats(self._files, self._bytes, seconds)

    # ----------------------------------------------------------------------- the loop

    def _run(self) -> None:
        with ThreadPoolExecutor(self._concurrency, thread_name_prefix="wal-fetch") as pool:
            inflight: dict[str, Future[None]] = {}
            fetched: set[str] = set()
            failed: dict[str, str] = {}
            cursor = 0
            beat = time.monotonic()
            while not self._stop.is_set() and self.error is None:
                if time.monotonic() - beat >= _BEAT_S:
                    self._beat()
                    beat = time.monotonic()
                for name, future in list(inflight.items()):
                    if future.done():
                        del inflight[name]
                        problem = future.exception()
                        if problem is None:
                            fetched.add(name)
                        else:
                            failed[name] = str(problem)
                for name in self._wanted():
                    cursor = max(cursor, self._index.get(name, -1))
                    if name in inflight or fdops.exists_at(self._dir_fd, name):
                        continue
                    if not fdops.exists_at(self._dir_fd, f"{name}.want"):
                        continue  # consumed since the listing: restore_command drops .want first
                    if name in failed:
                        self._fail(failed[name])
                        break
                    if name not in self._catalog.wal:
                        self._answer_missing(name)
                        continue
                    fetched.discard(name)  # asked again after it was consumed
                    inflight[name] = pool.submit(self._fetch, name)
                for name in self._chain[cursor : cursor + self._window]:
                    if len(inflight) >= self._concurrency:
                        break
                    if name not in fetched and name not in inflight and name not in failed:
                        inflight[name] = pool.submit(self._fetch, name)
                self._stop.wait(_POLL_S)
            for future in inflight.values():
                future.cancel()

    def _wanted(self) -> list[str]:
        entries = os.listdir(self._dir_fd)
        return sorted(e[: -len(".want")] for e in entries if e.endswith(".want"))

    def _beat(self) -> None:
        if self.error is None:
            self._write(HEARTBEAT, b"")

    def _fail(self, message: str) -> None:
        self.error = message
        log.error("wal prefetch", error=message)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(HEARTBEAT, dir_fd=self._dir_fd)

    def _answer_missing(self, name: str) -> None:
        if not fdops.exists_at(self._dir_fd, f"{name}.missing"):
            self._write(f"{name}.missing", b"")

    def _write(self, name: str, data: bytes) -> None:
        """Temp file and rename, so restore_command never sees half a file; no fsync: the
        spool is scratch space that a new restore starts over."""
        fdops.replace_at(
            self._dir_fd,
            name,
            lambda out: out.write(data),
            mode=0o600,
            uid=self._owner.pw_uid,
            gid=self._owner.pw_gid,
            sync=False,
        )

    def _fetch(self, name: str) -> None:
        started = time.monotonic()
        catalog = self._catalog
        key = WAL_PREFIX + name
        where = f"WAL file {name} in {catalog.repo.description}"
        try:
            meta = catalog.meta(key)
            data = codec.decode(catalog.repo.get(key), meta.get("codec", ""), catalog.key, name=key)
        except StellarError as exc:
            raise Damaged(f"{where} cannot be read: {exc.message}") from None
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise Damaged(f"{where} is damaged: checksum mismatch")
        self._write(name, data)
        with self._lock:
            self._files += 1
            self._bytes += len(data)
            self._first = started if self._first is None else min(self._first, started)
            self._last = time.monotonic()
