"""What every backup store answers: the `Repository` protocol, its objects, keys and errors.

Implemented by `repo.S3Repository` and `filerepo.FileRepository`; `repo` opens the one a
config names. Everything else in `backup` talks to a store only through these names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from stellarbase.errors import ExitCode, StellarError

META_SUFFIX = ".meta.json"


class RepositoryError(StellarError):
    """The repository is unreachable, refused a request, or holds something unexpected."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(
            message,
            hint=hint or "check the backup repository settings and that the store is reachable",
            code=ExitCode.DEPENDENCY,
        )


class ObjectNotFound(RepositoryError):
    """get/open_read of a key the repository does not hold."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the prefix, e.g. "wal/000000010000000000000003"
    size: int  # stored bytes
    meta: Mapping[str, str] = field(default_factory=dict)  # filled by head(); list() leaves it


class ObjectWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    def commit(self) -> int:
        """Finish the object and return its stored size; it is visible only after this."""
        ...

    def abort(self) -> None: ...


class Repository(Protocol):
    description: str  # "s3://bucket/prefix" or "file:///dir/prefix"

    def put(self, key: str, data: bytes | BinaryIO, meta: Mapping[str, str]) -> None:
        """Store `data` (bytes, or a seekable file read from its current position)."""
        ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def get(self, key: str) -> bytes: ...

    def open_read(self, key: str) -> BinaryIO: ...

    def open_write(self, key: str, meta: Mapping[str, str]) -> ObjectWriter: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def delete(self, keys: Sequence[str]) -> None: ...


def check_key(key: str) -> str:
    """`key` when it is a valid object key; ValueError otherwise."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a repository key: {key!r}")
    if key.endswith(META_SUFFIX) or any(p.startswith(".") for p in parts):
        raise ValueError(f"repository keys cannot end in {META_SUFFIX} or start with '.'")
    return key
