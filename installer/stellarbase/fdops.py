"""Root in directories another user can write: through file descriptors, never by path.

A directory is opened one component at a time with O_NOFOLLOW; everything below it is
then created, read, changed and removed relative to that descriptor (openat, fchown,
fchmod, renameat, unlinkat), so a symbolic link that an unprivileged user plants, or
swaps in half-way, is refused instead of followed. `open_dir` follows a link only when
root owns it (an administrator made it); `open_below` follows none.

Used by `files` (atomic writes), `backup.prefetch` (the restore spool), `backup.postmaster`
and `backup.restore` (the restored data directory) and `backup.repo` (file:// repositories).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NoReturn

from stellarbase.errors import ExitCode, StellarError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted in place of a file must not hang the open.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_MAX_LINKS = 40


class UnsafePath(StellarError):
    """A link (or a hard-linked file) where root expected a directory or file of its own."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(
            f"{path} {why}: refusing to follow it as root",
            hint="an unprivileged account may have planted it: inspect and remove it, "
            "then run the command again",
            code=ExitCode.HOST,
        )


def _refuse_link(dir_fd: int, name: str, where: str, exc: OSError) -> NoReturn:
    """Raise UnsafePath when `name` is a symlink (the reason `exc` happened); else `exc`."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        raise exc from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(where, f"is a symbolic link (owner uid {st.st_uid})") from None
    raise exc


@contextlib.contextmanager
def opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def open_dir(path: Path | str) -> int:
    """An O_DIRECTORY fd of `path`; a link on the way is followed only when root owns it."""
    full = os.path.abspath(path)
    parts = [p for p in full.split("/") if p]
    fd = os.open("/", DIR_FLAGS)
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            if name == ".":
                continue
            try:
                nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise
                if st.st_uid != 0:
                    _refuse_link(fd, name, full, exc)
                links += 1
                if links > _MAX_LINKS:
                    raise
                target = os.readlink(name, dir_fd=fd)
                parts = [p for p in target.split("/") if p] + parts
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", DIR_FLAGS)
                continue
            fd = _descend(fd, nfd)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _descend(fd: int, below: int) -> int:
    """Move down one directory: `below` is the fd to go on with, `fd` is closed."""
    os.close(fd)
    return below


def open_below(
    dir_fd: int, relative: str, *, where: str, create: bool = False, mode: int = 0o750
) -> int:
    """An fd of `relative` below `dir_fd`; no link is followed. With `create`, missing
    directories are made (`mode`). `where` names `dir_fd` in errors."""
    fd = os.dup(dir_fd)
    try:
        for name in (p for p in relative.split("/") if p):
            if name == "..":
                raise UnsafePath(f"{where}/{relative}", "leaves its directory")
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, mode, dir_fd=fd)
            try:
                nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                _refuse_link(fd, name, f"{where}/{relative}", exc)
            fd = _descend(fd, nfd)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_file(dir_fd: int, name: str, flags: int, where: str, mode: int = 0o600) -> int:
    """open(2) of a regular file in `dir_fd`: not a link, not a FIFO or device, not a
    hard link to a file elsewhere (root would otherwise change that file)."""
    try:
        extra = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags | extra, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            _refuse_link(dir_fd, name, where, exc)
        if exc.errno == errno.ENXIO:  # a FIFO or socket with nobody on the other end
            raise UnsafePath(where, "is not a regular file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else "has other hard links"
        raise UnsafePath(where, what)
    os.set_blocking(fd, True)
    return fd


def read_at(dir_fd: int, name: str, where: str, limit: int = 1 << 20) -> bytes | None:
    """The bytes of regular file `name` (at most `limit`), None when there is none."""
    try:
        fd = open_file(dir_fd, name, os.O_RDONLY, where)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafePath(where, f"is larger than {limit} bytes")
    return data


def read_file(path: Path, limit: int = 1 << 20) -> bytes | None:
    """`read_at` of `path`: its directory by `open_dir`, the file without following a link."""
    with opened(open_dir(path.parent)) as dir_fd:
        return read_at(dir_fd, path.name, str(path), limit)


def exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def replace_at(
    dir_fd: int,
    name: str,
    fill: Callable[[BinaryIO], object],
    *,
    mode: int,
    uid: int = -1,
    gid: int = -1,
    sync: bool = True,
) -> None:
    """Write `name` in `dir_fd` atomically: a new temp file (O_EXCL|O_NOFOLLOW), filled,
    fsynced, fchmod/fchown on its fd, renamed over `name` (a link there is replaced,
    never followed)."""
    temp = f".{name}.{secrets.token_hex(4)}"
    fd = os.open(temp, NEW_FILE, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            if sync:
                os.fsync(out.fileno())
            os.fchmod(out.fileno(), mode)
            if uid != -1 or gid != -1:
                os.fchown(out.fileno(), uid, gid)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    if sync:
        os.fsync(dir_fd)


def remove_at(dir_fd: int, name: str) -> None:
    """Remove `name` from `dir_fd`: a link itself, a file, or a tree (never followed)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


def empty_dir(dir_fd: int) -> None:
    """Remove everything inside `dir_fd`, keeping the directory (it may be a mount point)."""
    for name in os.listdir(dir_fd):
        remove_at(dir_fd, name)


def claim_dir(path: Path) -> None:
    """Make directory `path` root's (0700) and empty it (made if missing, kept if there: it
    may be a mount point). Until root hands it over, no other account can plant a link
    in it; one that held it open before cannot create anything in it either."""
    path.mkdir(parents=True, exist_ok=True)
    with opened(open_dir(path)) as fd:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o700)
        empty_dir(fd)


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """chown `path` and everything below it, never through a link.

    os.fwalk holds each directory by fd and checks that it is the directory it listed;
    entries are changed with fchownat(AT_SYMLINK_NOFOLLOW) relative to it. A regular file
    with other hard links is refused: its other name may be outside the tree.
    """
    with opened(open_dir(path)) as top:
        os.fchown(top, uid, gid)
        for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=top):
            for name in (*dirnames, *filenames):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
                    raise UnsafePath(f"{path}/{dirpath}/{name}", "has other hard links")
                os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
