"""Atomic, change-only file writes (temp in the same dir → fsync → chmod/chown → rename)."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if uid != -1 or gid != -1:
            os.chown(tmp, uid, gid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def symlink_atomic(path: Path, target: str) -> None:
    remove_leftovers(path)
    tmp = path.parent / f".{path.name}.tmp-link"
    os.symlink(target, tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_leftovers(path: Path) -> None:
    """Remove temp files an interrupted write of `path` left behind (`.<name>.*`)."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
        leftover.unlink(missing_ok=True)
