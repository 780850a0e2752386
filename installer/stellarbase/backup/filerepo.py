"""The `file://` repository: a directory, for a pilot. `repo.repository_from` opens it.

The agent's archiver writes it as `stellarbase`; `backup now`, `expire` and `restore` run
as root. So the directory holds what an unprivileged account can change, and root opens
every key one component at a time below the repository root, by directory fd and
O_NOFOLLOW (`fdops`): a link planted in place of a directory or an object is refused
(exit 4, naming it), never followed, and expire's unlinks remove only names in it.
A put is durable when it returns: temp file, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from stellarbase import fdops
from stellarbase.backup.store import (
    META_SUFFIX,
    ObjectInfo,
    ObjectNotFound,
    ObjectWriter,
    RepositoryError,
    check_key,
)

_MODE = 0o640
_META_LIMIT = 1 << 20


class FileRepository:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"file://{root}"

    @contextlib.contextmanager
    def _calling(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.description}: no object {key}") from None
        except OSError as exc:
            raise RepositoryError(f"{self.description}: {action} {key} failed: {exc}") from exc

    def _open_dir(self, relative: str, create: bool = False) -> int:
        """The fd of `relative` below the root: the root as configured, below it no link."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        with fdops.opened(fdops.open_dir(self.root)) as top:
            return fdops.open_below(top, relative, where=str(self.root), create=create, mode=0o777)

    @contextlib.contextmanager
    def _dir_of(self, key: str, create: bool = False) -> Iterator[tuple[int, str]]:
        parent, _, name = check_key(key).rpartition("/")
        with fdops.opened(self._open_dir(parent, create)) as dir_fd:
            yield dir_fd, name

    def _where(self, key: str) -> str:
        return str(self.root / key)

    def put(self, key: str, data: bytes | BinaryIO, meta: Mapping[str, str]) -> None:
        def fill(out: BinaryIO) -> None:
            if isinstance(data, bytes):
                out.write(data)
            else:
                shutil.copyfileobj(data, out, 1024 * 1024)

        with self._calling("put", key), self._dir_of(key, create=True) as (dir_fd, name):
            if meta:  # the sidecar first, so that head() sees it once the object is there
                _write_meta(dir_fd, name, meta)
            fdops.replace_at(dir_fd, name, fill, mode=_MODE)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with self._calling("head", key), self._dir_of(key) as (dir_fd, name):
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise fdops.UnsafePath(self._where(key), "is not a regular file")
                where = self._where(key) + META_SUFFIX
                raw = fdops.read_at(dir_fd, name + META_SUFFIX, where, _META_LIMIT)
        except ObjectNotFound:
            return None
        try:
            meta = json.loads(raw) if raw is not None else {}
        except ValueError as exc:
            raise RepositoryError(f"{self.description}: {key}: bad metadata: {exc}") from None
        return ObjectInfo(key, st.st_size, {str(k): str(v) for k, v in meta.items()})

    def get(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def open_read(self, key: str) -> BinaryIO:
        with self._calling("get", key), self._dir_of(key) as (dir_fd, name):
            fd = fdops.open_file(dir_fd, name, os.O_RDONLY, self._where(key))
            return os.fdopen(fd, "rb")  # the caller closes it

    def open_write(self, key: str, meta: Mapping[str, str]) -> ObjectWriter:
        with self._calling("open", key):
            parent, _, name = check_key(key).rpartition("/")
            dir_fd = self._open_dir(parent, create=True)
            try:
                temp = f".{name}.{os.urandom(4).hex()}"
                fd = os.open(temp, fdops.NEW_FILE, 0o600, dir_fd=dir_fd)
            except BaseException:
                os.close(dir_fd)
                raise
        return _FileWriter(self, key, dir_fd, name, temp, os.fdopen(fd, "wb"), meta)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base, _, _ = prefix.rpartition("/")
        found: list[ObjectInfo] = []
        with self._calling("list", prefix or "/"):
            try:
                top = self._open_dir(base)
            except FileNotFoundError:
                return
            with fdops.opened(top):
                for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=top):
                    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                    rel = os.path.normpath(os.path.join(base, dirpath)).lstrip("./")
                    for name in filenames:
                        if name.startswith(".") or name.endswith(META_SUFFIX):
                            continue
                        key = f"{rel}/{name}" if rel else name
                        if not key.startswith(prefix):
                            continue
                        with contextlib.suppress(FileNotFoundError):
                            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                            if stat.S_ISREG(st.st_mode):  # a planted link is no object
                                found.append(ObjectInfo(key, st.st_size))
        yield from sorted(found, key=lambda info: info.key)

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                with self._calling("delete", key), self._dir_of(key) as (dir_fd, name):
                    for entry in (name, name + META_SUFFIX):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry, dir_fd=dir_fd)  # a link itself, never its target
                    os.fsync(dir_fd)
            except ObjectNotFound:
                continue  # its directory is gone: nothing to delete


def _write_meta(dir_fd: int, name: str, meta: Mapping[str, str]) -> None:
    text = json.dumps(dict(meta), sort_keys=True).encode()
    fdops.replace_at(dir_fd, name + META_SUFFIX, lambda out: out.write(text), mode=_MODE)


class _FileWriter:
    def __init__(
        self,
        repo: FileRepository,
        key: str,
        dir_fd: int,
        name: str,
        temp: str,
        f: BinaryIO,
        meta: Mapping[str, str],
    ) -> None:
        self._repo = repo
        self._key = key
        self._dir_fd = dir_fd
        self._name = name
        self._temp = temp
        self._f = f
        self._meta = dict(meta)
        self._size = 0
        self._closed = False

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ValueError("write to a committed or aborted object")
        try:
            with self._repo._calling("write", self._key):
                self._f.write(data)
        except BaseException:
            self.abort()
            raise
        self._size += len(data)

    def commit(self) -> int:
        if self._closed:
            raise ValueError("commit of a committed or aborted object")
        try:
            with self._repo._calling("commit", self._key):
                self._f.flush()
                os.fsync(self._f.fileno())
                os.fchmod(self._f.fileno(), _MODE)
                self._f.close()
                if self._meta:
                    _write_meta(self._dir_fd, self._name, self._meta)
                os.rename(self._temp, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
                os.fsync(self._dir_fd)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        os.close(self._dir_fd)
        return self._size

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(OSError):
            os.unlink(self._temp, dir_fd=self._dir_fd)
        os.close(self._dir_fd)
