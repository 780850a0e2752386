"""Atomic, change-only file writes (temp in the same dir → fsync → fchmod/fchown → rename).

Root writes here into directories other accounts may own (a restored data directory, say),
so every step goes through the directory's file descriptor (see `fdops`): the temp file is
new (O_EXCL|O_NOFOLLOW), its mode and owner are set on its fd, and the rename replaces a
link planted at the destination instead of writing through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, overload

from stellarbase import fdops
from stellarbase.errors import ExitCode, StellarError


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes, *, mode: int, uid: int = -1, gid: int = -1) -> None:
    _replace(path, lambda out: out.write(data), mode=mode, uid=uid, gid=gid)


def copy_atomic(path: Path, source: Path, *, mode: int, uid: int = -1, gid: int = -1) -> None:
    with source.open("rb") as src:
        _replace(
            path, lambda out: shutil.copyfileobj(src, out, 1 << 20), mode=mode, uid=uid, gid=gid
        )


def _replace(
    path: Path, fill: Callable[[BinaryIO], object], *, mode: int, uid: int, gid: int
) -> None:
    with fdops.opened(fdops.open_dir(path.parent)) as dir_fd:
        _remove_leftovers_at(dir_fd, path.name)
        fdops.replace_at(dir_fd, path.name, fill, mode=mode, uid=uid, gid=gid)


def symlink_atomic(path: Path, target: str) -> None:
    with fdops.opened(fdops.open_dir(path.parent)) as dir_fd:
        _remove_leftovers_at(dir_fd, path.name)
        tmp = f".{path.name}.tmp-link"
        os.symlink(target, tmp, dir_fd=dir_fd)
        os.rename(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_leftovers(path: Path) -> None:
    """Remove temp files an interrupted write of `path` left behind (`.<name>.*`)."""
    with fdops.opened(fdops.open_dir(path.parent)) as dir_fd:
        _remove_leftovers_at(dir_fd, path.name)


def _remove_leftovers_at(dir_fd: int, name: str) -> None:
    prefix = f".{name}."
    for entry in os.listdir(dir_fd):
        if entry.startswith(prefix):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(entry, dir_fd=dir_fd)  # a directory is not a leftover: kept


@overload
def read_text(path: Path, what: str, *, missing: str, unreadable: str, code: ExitCode) -> str: ...
@overload
def read_text(
    path: Path, what: str, *, missing: None, unreadable: str, code: ExitCode
) -> str | None: ...
def read_text(
    path: Path, what: str, *, missing: str | None, unreadable: str, code: ExitCode
) -> str | None:
    """A file a command needs, as text. Missing, it is None when `missing` is None, else an
    error with that hint; unreadable, an error naming the file with the other hint."""
    try:
        return path.read_text()
    except FileNotFoundError:
        if missing is None:
            return None
        raise StellarError(f"{path}: no such {what}", hint=missing, code=code) from None
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"cannot read the {what} ({exc.__class__.__name__})"
        raise StellarError(f"{path}: {problem}", hint=unreadable, code=code) from None
