"""pg_basebackup's tar stream, followed as it passes: where members start, and extraction.

pg_basebackup writes ustar: 512-byte headers, bodies padded to 512 bytes, two zero blocks
at the end. The backup side only needs to know where each member begins (to cut the
stream into parts between files) and the bodies of two small files; the restore side
writes regular files and directories straight from the decoded buffers with os.write,
which releases the GIL, instead of going through tarfile's per-member Python machinery.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from stellarbase.errors import ExitCode, StellarError

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
_REGULAR = (b"0", b"\0")
_DIRECTORY = b"5"


class TarError(StellarError):
    """A tar stream that is not what pg_basebackup writes, or that is damaged."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            hint="restore another backup; `stellarbase backup verify` checks them all",
            code=ExitCode.BACKUP,
        )


@dataclass(frozen=True)
class Header:
    name: str
    size: int
    kind: bytes  # the typeflag
    mode: int
    mtime: int

    @property
    def padded(self) -> int:
        return -(-self.size // BLOCK) * BLOCK


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # base-256, for values past the octal field's range
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def parse_header(block: bytes) -> Header | None:
    """The member a header block describes; None for a zero block (the end of the archive)."""
    if not block.strip(b"\0"):
        return None
    try:
        checksum = _number(block[148:156])
        mode = _number(block[100:108])
        size = _number(block[124:136])
        mtime = _number(block[136:148])
    except ValueError:
        raise TarError("damaged tar header: a numeric field is not a number") from None
    if checksum != sum(block[:148]) + 8 * 32 + sum(block[156:BLOCK]):
        raise TarError("damaged tar header: checksum mismatch")
    name = block[:100].split(b"\0", 1)[0].decode(errors="replace")
    prefix = block[345:500].split(b"\0", 1)[0].decode(errors="replace")
    if prefix:
        name = f"{prefix}/{name}"
    return Header(name, size, block[156:157], mode, mtime)


class TarScanner:
    """Follows a tar stream fed in pieces; keeps the bodies of the `wanted` small files.

    feed() returns the offsets, within the piece, at which member headers begin: the
    places where the stream can be cut into tars of whole members.
    """

    def __init__(self, wanted: tuple[str, ...] = ()) -> None:
        self.wanted = wanted
        self.files: dict[str, bytes] = {}
        self.ended = False
        self._header = bytearray()
        self._skip = 0  # body or padding bytes still to pass
        self._keep: str | None = None
        self._body = bytearray()
        self._keep_left = 0

    def feed(self, data: bytes | memoryview) -> list[int]:
        starts: list[int] = []
        view = memoryview(data)
        pos = 0
        while pos < len(view) and not self.ended:
            if self._keep is not None:
                n = min(self._keep_left, len(view) - pos)
                self._body += view[pos : pos + n]
                self._keep_left -= n
                pos += n
                if not self._keep_left:
                    self.files[self._keep] = bytes(self._body)
                    self._keep, self._body = None, bytearray()
            elif self._skip:
                n = min(self._skip, len(view) - pos)
                self._skip -= n
                pos += n
            else:
                if not self._header:
                    starts.append(pos)
                n = min(BLOCK - len(self._header), len(view) - pos)
                self._header += view[pos : pos + n]
                pos += n
                if len(self._header) == BLOCK:
                    self._start_member(bytes(self._header))
                    self._header.clear()
                    if self.ended and starts and starts[-1] == pos - BLOCK:
                        starts.pop()  # the end-of-archive blocks, not a member
        return starts

    def _start_member(self, block: bytes) -> None:
        header = parse_header(block)
        if header is None:
            self.ended = True
            return
        if header.name in self.wanted and header.kind in _REGULAR:
            self._keep, self._keep_left = header.name, header.size
            if header.size == 0:
                self.files[header.name] = b""
                self._keep = None
            self._skip = header.padded - header.size
        else:
            self._skip = header.padded


def _relative(name: str) -> PurePosixPath | None:
    """The member's path below the target; None for the archive's own root ('./')."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise TarError(f"tar member {name!r} points outside the data directory")
    return path if path.parts else None


class TarExtractor:
    """Writes the regular files and directories of a tar stream fed in pieces.

    Parent directories are created when missing, so several parts of one backup can be
    extracted at once in any order; a directory's own entry then sets its mode. Each file
    is fsynced as it is closed; the directories are the caller's to sync at the end.
    Nothing else (links, devices) is accepted: pg_basebackup writes none of them for a
    cluster without tablespaces.
    """

    def __init__(self, target: Path, sync: bool = True) -> None:
        self.target = target
        self.sync = sync  # fsync each file before closing it
        self.files = 0
        self.ended = False
        self._header = bytearray()
        self._fd = -1
        self._member: Header | None = None
        self._left = 0  # body bytes of the open file still to write
        self._skip = 0  # padding still to pass
        self._made: set[Path] = set()

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        pos = 0
        end = len(view)
        while pos < end:
            if self._left:
                n = min(self._left, end - pos)
                written = os.write(self._fd, view[pos : pos + n])
                self._left -= written
                pos += written
                if not self._left:
                    self._close_file()
            elif self._skip:
                n = min(self._skip, end - pos)
                self._skip -= n
                pos += n
            elif self.ended:
                if any(view[pos:]):
                    raise TarError("tar stream has data after its end-of-archive blocks")
                return
            elif not self._header and end - pos >= BLOCK:
                self._start(bytes(view[pos : pos + BLOCK]))
                pos += BLOCK
            else:
                n = min(BLOCK - len(self._header), end - pos)
                self._header += view[pos : pos + n]
                pos += n
                if len(self._header) == BLOCK:
                    self._start(bytes(self._header))
                    self._header.clear()

    def finish(self) -> None:
        """Check that the stream ended with its end-of-archive blocks, between members."""
        if self._left or self._header or self._member or not self.ended:
            raise TarError("tar stream ends early: the backup object is truncated")

    def close(self) -> None:
        """Close the file being written, if any (after an error)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _start(self, block: bytes) -> None:
        header = parse_header(block)
        if header is None:
            self.ended = True
            return
        relative = _relative(header.name)
        mode = header.mode & 0o777
        if header.kind == _DIRECTORY:
            if relative is not None:
                path = self.target / relative
                self._mkdirs(path)
                os.chmod(path, mode | 0o700)
            self._skip = header.padded
            return
        if header.kind not in _REGULAR or relative is None:
            raise TarError(
                f"tar member {header.name!r} is not a regular file or directory "
                f"(type {header.kind.decode(errors='replace')!r})"
            )
        path = self.target / relative
        self._mkdirs(path.parent)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o600)
        if mode | 0o600 != 0o600:
            os.fchmod(self._fd, mode | 0o600)
        self._member = header
        self._left = header.size
        self._skip = header.padded - header.size
        if not self._left:
            self._close_file()

    def _close_file(self) -> None:
        assert self._member is not None
        os.utime(self._fd, (self._member.mtime, self._member.mtime))
        if self.sync:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._member = None
        self.files += 1

    def _mkdirs(self, path: Path) -> None:
        if path in self._made or path == self.target:
            return
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._made.add(path)
