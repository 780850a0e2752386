"""`backup verify`: read back every object, check every manifest and every WAL chain."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from stellarbase.backup import codec, walnames
from stellarbase.backup.catalog import (
    BACKUPS_PREFIX,
    MANIFEST,
    WAL_PREFIX,
    Catalog,
    Manifest,
    Part,
    continuity,
    load_catalog,
)
from stellarbase.backup.repo import Repository, RepositoryError
from stellarbase.errors import StellarError

VERIFY_CONCURRENCY = 8
_READ = 1024 * 1024


@dataclass(frozen=True)
class Problem:
    subject: str  # the object key or segment name
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    repository: str
    objects: int
    bytes: int  # original bytes checked
    seconds: float
    problems: tuple[Problem, ...]

    @property
    def messages(self) -> list[str]:
        return [str(p) for p in self.problems]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_object(catalog: Catalog, key: str, part: Part | None = None) -> tuple[int, list[Problem]]:
    """Download and decode one object; compare its sha256 and size with its metadata.

    A base backup part's checksum and size are known only once its upload has ended, so
    they live in the manifest rather than in the object's metadata.
    """
    try:
        meta = dict(catalog.meta(key))
    except RepositoryError as exc:
        return 0, [Problem(key, exc.message)]
    if part is not None:
        meta.setdefault("sha256", part.sha256)
        meta.setdefault("size", str(part.raw_bytes))
    expected = meta.get("sha256")
    if not expected:
        return 0, [Problem(key, "no sha256 in the object's metadata")]
    problems: list[Problem] = []
    if catalog.system_identifier and meta.get("sysid", catalog.system_identifier) != (
        catalog.system_identifier
    ):
        problems.append(
            Problem(key, f"system identifier {meta.get('sysid')} is not the repository's")
        )
    digest = hashlib.sha256()
    size = 0
    try:
        with codec.decoding_reader(
            catalog.repo.open_read(key), meta.get("codec", ""), catalog.key
        ) as reader:
            for chunk in iter(lambda: reader.read(_READ), b""):
                digest.update(chunk)
                size += len(chunk)
    except StellarError as exc:  # RepositoryError, CodecError
        return size, [*problems, Problem(key, f"cannot be read back: {exc.message}")]
    if digest.hexdigest() != expected:
        problems.append(Problem(key, "checksum mismatch: the stored bytes were altered"))
    elif meta.get("size") not in (None, str(size)):
        problems.append(Problem(key, f"size {size} is not the recorded {meta.get('size')}"))
    return size, problems


def check_manifest(catalog: Catalog, backup: Manifest) -> list[Problem]:
    subject = f"{BACKUPS_PREFIX}{backup.id}/{MANIFEST}"
    problems: list[Problem] = []
    present = {i.key: i for i in catalog.backup_objects.get(backup.id, ())}
    if backup.system_identifier != catalog.system_identifier:
        problems.append(
            Problem(
                subject, f"system identifier {backup.system_identifier} is not the repository's"
            )
        )
    size = backup.wal_segment_size
    # The last segment a backup needs holds the byte before its stop LSN.
    last_byte = max(backup.stop_lsn - 1, backup.start_lsn)
    for name, lsn in ((backup.start_wal, backup.start_lsn), (backup.stop_wal, last_byte)):
        if walnames.segment_of(lsn, backup.timeline, size).name(size) != name:
            problems.append(
                Problem(subject, f"{name} does not hold LSN {walnames.format_lsn(lsn)}")
            )
    for part in backup.parts:
        key = part.key
        info = present.get(key)
        if info is None:
            problems.append(Problem(key, "listed in the manifest but missing"))
            continue
        if info.size != part.stored_bytes:
            problems.append(
                Problem(key, f"{info.size} bytes stored, the manifest says {part.stored_bytes}")
            )
        try:
            meta = catalog.meta(key)
        except RepositoryError as exc:
            problems.append(Problem(key, exc.message))
            continue
        if meta.get("sha256", part.sha256) != part.sha256:
            problems.append(Problem(key, "metadata sha256 differs from the manifest's"))
    return problems


def check_continuity(catalog: Catalog, backup: Manifest) -> list[Problem]:
    chain = continuity(catalog, backup)
    name = catalog.segment_name(chain.end)
    if not chain.restorable:
        return [Problem(name, f"missing: backup {backup.id} cannot be restored without it")]
    if chain.gap:
        last = catalog.segment_name(chain.path[-1])
        return [Problem(name, f"missing: backup {backup.id} restores only up to {last}")]
    return []


def verify(
    repo: Repository, key: bytes | None, concurrency: int = VERIFY_CONCURRENCY
) -> VerifyReport:
    """Read back every object, check every manifest and every backup's WAL chain."""
    started = time.monotonic()
    catalog = load_catalog(repo, key)
    problems = [
        Problem(f"{BACKUPS_PREFIX}{i}/{MANIFEST}", why) for i, why in catalog.unreadable.items()
    ]
    keys: list[tuple[str, Part | None]] = [(WAL_PREFIX + n, None) for n in sorted(catalog.wal)]
    keys += [(p.key, p) for b in catalog.backups for p in b.parts]
    checked = 0
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for size, found in pool.map(lambda item: check_object(catalog, *item), keys):
            checked += size
            problems += found
    for backup in catalog.backups:
        problems += check_manifest(catalog, backup)
        problems += check_continuity(catalog, backup)
    return VerifyReport(
        repository=repo.description,
        objects=len(keys),
        bytes=checked,
        seconds=time.monotonic() - started,
        problems=tuple(_unique(problems)),
    )


def _unique(problems: Iterable[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))
