"""What a repository holds, and whether it can be restored: list, continuity, verify, expire.

A backup is restorable up to the last segment of an unbroken WAL chain that starts at its
start segment and follows the timeline path to the newest timeline descending from the
backup's own. A missing segment with WAL after it is a gap: nothing past it can be
restored, so list, verify and restore all name it.

With a key, WAL metadata and manifests are authenticated as they are read (see `auth`):
a manifest that fails its MAC is set aside as tampered, one of an older format as
unreadable; WAL metadata that fails raises AuthError naming the object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from stellarbase.backup import auth, codec, walnames

# Re-exported (`as`): callers know these names as the catalog's.
from stellarbase.backup.manifest import BACKUPS_PREFIX as BACKUPS_PREFIX
from stellarbase.backup.manifest import MANIFEST as MANIFEST
from stellarbase.backup.manifest import MANIFEST_FORMAT as MANIFEST_FORMAT
from stellarbase.backup.manifest import Manifest as Manifest
from stellarbase.backup.manifest import Part as Part
from stellarbase.backup.manifest import id_time as id_time
from stellarbase.backup.manifest import manifest_key
from stellarbase.backup.manifest import read_manifest as read_manifest
from stellarbase.backup.repo import read_identity
from stellarbase.backup.store import ObjectInfo, ObjectNotFound, Repository
from stellarbase.errors import StellarError

WAL_PREFIX = "wal/"
# A backup directory without a manifest may be a backup still running.
INCOMPLETE_GRACE = timedelta(days=1)
_READ = 1024 * 1024


# --------------------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class Catalog:
    """One listing of a repository. WAL object metadata is fetched on demand and cached."""

    repo: Repository
    key: bytes | None
    system_identifier: str | None
    segment_size: int
    backups: tuple[Manifest, ...]  # complete ones, oldest first
    incomplete: tuple[str, ...]  # backup dirs without a (readable) manifest
    unreadable: Mapping[str, str]  # backup id → why its manifest could not be read
    tampered: Mapping[str, str]  # manifest key → why it failed authentication
    backup_objects: Mapping[str, tuple[ObjectInfo, ...]]  # backup id → its objects
    wal: Mapping[str, ObjectInfo]  # WAL file name → object
    _meta: dict[str, Mapping[str, str]] = field(default_factory=dict, compare=False, repr=False)
    _histories: dict[int, tuple[walnames.Switch, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def backup(self, backup_id: str) -> Manifest:
        for manifest in self.backups:
            if manifest.id == backup_id:
                return manifest
        known = ", ".join(m.id for m in self.backups) or "none"
        raise StellarError(
            f"no complete backup {backup_id} in {self.repo.description} (complete: {known})",
            hint="`stellarbase backup list` shows the backups",
        )

    def segment_name(self, segment: walnames.Segment) -> str:
        return segment.name(self.segment_size)

    def has(self, segment: walnames.Segment) -> bool:
        return self.segment_name(segment) in self.wal

    def meta(self, key: str) -> Mapping[str, str]:
        """An object's metadata (head when the listing did not carry it).

        With a key, a WAL object's metadata must carry its valid MAC (else AuthError).
        A backup part's metadata is not authenticated: its manifest is.
        """
        cached = self._meta.get(key)
        if cached is not None:
            return cached
        info = self.repo.head(key)
        if info is None:
            raise ObjectNotFound(f"{self.repo.description}: no object {key}")
        if self.key is not None and key.startswith(WAL_PREFIX):
            stored_as = info.meta.get("codec", "")
            if stored_as != codec.ZSTD_AES:
                raise auth.plaintext(key, stored_as)
            auth.check_meta(self.key, key, info.meta)
        self._meta[key] = info.meta
        return info.meta

    def histories(self) -> Mapping[int, tuple[walnames.Switch, ...]]:
        """Timeline → its parsed history file (read and decoded on first use)."""
        if not self._histories:
            for name in self.wal:
                if walnames.is_history(name):
                    switches = walnames.parse_history(self._history_text(name))
                    self._histories[walnames.history_timeline(name)] = tuple(switches)
        return self._histories

    def _history_text(self, name: str) -> str:
        key = WAL_PREFIX + name
        try:
            data = codec.decode(
                self.repo.get(key), self.meta(key).get("codec", ""), self.key, name=key
            )
        except codec.CodecError as exc:
            raise codec.CodecError(f"{key}: {exc.message}", exc.hint) from None
        return data.decode("utf-8", errors="replace")

    def wal_mtime(self, segment: walnames.Segment) -> datetime | None:
        """When the segment was completed, as the archiver recorded it."""
        raw = self.meta(WAL_PREFIX + self.segment_name(segment)).get("mtime")
        if raw is None:
            return None
        try:
            return datetime.fromtimestamp(float(raw), UTC)
        except ValueError:
            return None


def load_catalog(
    repo: Repository, key: bytes | None = None, *, tampered_ok: bool = False
) -> Catalog:
    """List the repository: manifests, incomplete backups, the WAL index, timeline histories.

    `key` decodes the timeline history files, which are read only when a WAL chain is
    followed (list, verify, restore), and authenticates manifests and WAL metadata;
    expire needs no key. A manifest that fails its MAC refuses the whole repository
    (AuthError naming it) unless `tampered_ok`: then `tampered` lists it, for reports.
    So does a repository whose only manifests are of an older format (LegacyFormat).
    """
    identity = read_identity(repo)
    segment_size = identity.wal_segment_size if identity else walnames.DEFAULT_SEGMENT_SIZE
    by_backup: dict[str, list[ObjectInfo]] = {}
    for info in repo.list(BACKUPS_PREFIX):
        backup_id = info.key[len(BACKUPS_PREFIX) :].split("/", 1)[0]
        by_backup.setdefault(backup_id, []).append(info)
    backups: list[Manifest] = []
    incomplete: list[str] = []
    unreadable: dict[str, str] = {}
    tampered: dict[str, str] = {}
    legacy: auth.LegacyFormat | None = None  # the newest manifest of an older format
    for backup_id, infos in sorted(by_backup.items()):
        name = manifest_key(backup_id)
        if not any(i.key == name for i in infos):
            incomplete.append(backup_id)
            continue
        try:
            backups.append(read_manifest(repo, key, backup_id))
        except auth.LegacyFormat as exc:
            legacy = exc
            unreadable[backup_id] = exc.message
            incomplete.append(backup_id)
        except auth.AuthError as exc:
            tampered[name] = exc.message
            incomplete.append(backup_id)
        except (ValueError, KeyError, TypeError) as exc:
            unreadable[backup_id] = f"{name} is malformed: {exc}"
            incomplete.append(backup_id)
    wal = {
        info.key[len(WAL_PREFIX) :]: info
        for info in repo.list(WAL_PREFIX)
        if walnames.is_wal_file(info.key[len(WAL_PREFIX) :])
    }
    if tampered and not tampered_ok:
        name, why = next(iter(tampered.items()))
        raise auth.AuthError(name, why.removeprefix(f"{name}: "))
    if legacy is not None and not backups and not tampered_ok:
        raise legacy  # rather than "no complete backup": say why, and what to do
    return Catalog(
        repo=repo,
        key=key,
        system_identifier=identity.system_identifier if identity else None,
        segment_size=segment_size,
        backups=tuple(sorted(backups, key=lambda m: (m.start_time, m.id))),
        incomplete=tuple(incomplete),
        unreadable=unreadable,
        tampered=tampered,
        backup_objects={k: tuple(v) for k, v in by_backup.items()},
        wal=wal,
    )


# --------------------------------------------------------------------------- continuity


Span = tuple[int, int, int | None]


def timeline_for(catalog: Catalog, backup: Manifest) -> tuple[int, list[Span]]:
    """The newest timeline whose history passes through the backup, and its WAL path.

    A timeline descends from the backup when its path runs along the backup's timeline
    over the whole backup (start to stop LSN): recovery from the backup can follow it.
    """
    best = backup.timeline
    best_spans: list[Span] = walnames.timeline_spans(
        backup.timeline, list(catalog.histories().get(backup.timeline, ()))
    )
    for tli, switches in catalog.histories().items():
        if tli <= best:
            continue
        spans = walnames.timeline_spans(tli, list(switches))
        if any(
            span_tli == backup.timeline
            and span_from <= backup.start_lsn
            and (span_until is None or backup.stop_lsn <= span_until)
            for span_tli, span_from, span_until in spans
        ):
            best, best_spans = tli, spans
    return best, best_spans


@dataclass(frozen=True)
class Continuity:
    """The unbroken WAL chain of one backup."""

    backup: Manifest
    timeline: int  # the newest timeline the chain follows
    spans: tuple[Span, ...]
    path: tuple[walnames.Segment, ...]  # present segments, in recovery order
    end: walnames.Segment  # the first segment recovery would not find
    gap: bool  # WAL exists past `end`: the chain is broken, not merely finished

    @property
    def restorable(self) -> bool:
        """The chain covers the backup itself (start to stop segment)."""
        stop = walnames.parse_segment(self.backup.stop_wal, self.backup.wal_segment_size)
        return bool(self.path) and self.path[-1].number >= stop.number

    @property
    def last(self) -> walnames.Segment | None:
        return self.path[-1] if self.path else None


def continuity(catalog: Catalog, backup: Manifest) -> Continuity:
    tli, spans = timeline_for(catalog, backup)
    final_from = spans[-1][1]
    fixed = walnames.segments_between(
        backup.start_lsn, max(backup.start_lsn, final_from), spans, catalog.segment_size
    )
    path: list[walnames.Segment] = []
    end: walnames.Segment | None = None
    for segment in fixed:
        if not catalog.has(segment):
            end = segment
            break
        path.append(segment)
    if end is None:
        end = fixed[-1].next()
        while catalog.has(end):
            path.append(end)
            end = end.next()
    later = _newest_numbers(catalog)
    on_path = {s[0] for s in spans if s[0] >= end.timeline}
    gap = any(later.get(t, -1) > end.number for t in on_path)
    return Continuity(backup, tli, tuple(spans), tuple(path), end, gap)


def _newest_numbers(catalog: Catalog) -> dict[int, int]:
    newest: dict[int, int] = {}
    for name in catalog.wal:
        if walnames.is_segment(name):
            segment = walnames.parse_segment(name, catalog.segment_size)
            newest[segment.timeline] = max(newest.get(segment.timeline, -1), segment.number)
    return newest


# --------------------------------------------------------------------------- list


@dataclass(frozen=True)
class BackupSummary:
    id: str
    time: datetime  # start
    stop_time: datetime
    raw_bytes: int
    stored_bytes: int
    timeline: int
    start_wal: str
    stop_wal: str
    restorable_until: datetime | None  # completion time of the last unbroken segment
    restorable_wal: str | None  # that segment
    gap: str | None  # the missing segment that breaks the chain, if any
    problem: str | None = None  # why its chain cannot be followed (an object not authentic)


@dataclass(frozen=True)
class WalRange:
    timeline: int
    first: str
    last: str
    segments: int
    missing: int  # holes between first and last


@dataclass(frozen=True)
class Listing:
    repository: str
    backups: tuple[BackupSummary, ...]
    wal: tuple[WalRange, ...]
    incomplete: tuple[str, ...]
    tampered: Mapping[str, str] = field(default_factory=dict)  # manifest key → why

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(catalog: Catalog, backup: Manifest) -> BackupSummary:
    chain = continuity(catalog, backup)
    last = chain.last if chain.restorable else None
    return _summary_of(
        backup,
        restorable_until=catalog.wal_mtime(last) if last else None,
        restorable_wal=catalog.segment_name(last) if last else None,
        gap=catalog.segment_name(chain.end) if chain.gap or not chain.restorable else None,
    )


def _summary_of(
    backup: Manifest,
    *,
    restorable_until: datetime | None = None,
    restorable_wal: str | None = None,
    gap: str | None = None,
    problem: str | None = None,
) -> BackupSummary:
    return BackupSummary(
        id=backup.id,
        time=backup.start_time,
        stop_time=backup.stop_time,
        raw_bytes=backup.raw_bytes,
        stored_bytes=backup.stored_bytes,
        timeline=backup.timeline,
        start_wal=backup.start_wal,
        stop_wal=backup.stop_wal,
        restorable_until=restorable_until,
        restorable_wal=restorable_wal,
        gap=gap,
        problem=problem,
    )


def wal_ranges(catalog: Catalog) -> tuple[WalRange, ...]:
    per_tli: dict[int, list[walnames.Segment]] = {}
    for name in catalog.wal:
        if walnames.is_segment(name):
            segment = walnames.parse_segment(name, catalog.segment_size)
            per_tli.setdefault(segment.timeline, []).append(segment)
    ranges = []
    for tli, segments in sorted(per_tli.items()):
        segments.sort()
        span = segments[-1].number - segments[0].number + 1
        ranges.append(
            WalRange(
                timeline=tli,
                first=catalog.segment_name(segments[0]),
                last=catalog.segment_name(segments[-1]),
                segments=len(segments),
                missing=span - len(segments),
            )
        )
    return tuple(ranges)


def _summary(catalog: Catalog, backup: Manifest) -> BackupSummary:
    try:
        return summarize(catalog, backup)
    except StellarError as exc:  # AuthError, CodecError, RepositoryError: say it, go on
        return _summary_of(backup, problem=exc.message)


def listing(catalog: Catalog) -> Listing:
    return Listing(
        repository=catalog.repo.description,
        backups=tuple(_summary(catalog, b) for b in catalog.backups),
        wal=wal_ranges(catalog),
        incomplete=catalog.incomplete,
        tampered=dict(catalog.tampered),
    )


def describe_listing(listing: Listing) -> list[str]:
    """`backup list` for people: one line per backup, then the WAL per timeline."""
    lines = []
    for b in listing.backups:
        until = (
            f"restorable until {b.restorable_until:%Y-%m-%dT%H:%M:%SZ} ({b.restorable_wal})"
            if b.restorable_until
            else f"restorable until {b.restorable_wal}"
            if b.restorable_wal
            else f"NOT restorable: {b.problem}"
            if b.problem
            else "NOT restorable"
        )
        gap = f", WAL gap at {b.gap}" if b.gap else ""
        lines.append(
            f"{b.id}  timeline {b.timeline}  {_size(b.raw_bytes)} as {_size(b.stored_bytes)}"
            f"  WAL {b.start_wal}..{b.stop_wal}  {until}{gap}"
        )
    if not listing.backups:
        lines.append(f"no complete backups in {listing.repository}")
    for r in listing.wal:
        holes = f", {r.missing} missing" if r.missing else ""
        lines.append(f"WAL timeline {r.timeline}: {r.first}..{r.last} ({r.segments}{holes})")
    if listing.incomplete:
        lines.append(f"incomplete (ignored): {', '.join(listing.incomplete)}")
    lines += [f"REFUSED {why}" for why in listing.tampered.values()]
    return lines


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


# --------------------------------------------------------------------------- expire


@dataclass(frozen=True)
class ExpirePlan:
    keep: tuple[str, ...]  # backup ids
    backups: tuple[str, ...]  # complete backups to remove
    incomplete: tuple[str, ...]  # abandoned backup dirs to remove
    wal: tuple[str, ...]  # WAL file names to remove
    wal_floor: str | None  # the oldest segment any kept backup needs


def expire_plan(
    catalog: Catalog,
    retention_full: int | None,
    retention_days: int | None,
    now: datetime,
) -> ExpirePlan:
    """What retention removes; pure.

    A backup stays when it is among the newest `retention_full` or younger than
    `retention_days`; the newest always stays. WAL goes only below the segment that
    holds the oldest kept backup's start LSN, on every timeline, so every kept
    backup keeps its whole chain; history files always stay.
    """
    newest_first = sorted(catalog.backups, key=lambda m: (m.start_time, m.id), reverse=True)
    keep: list[Manifest] = []
    for index, backup in enumerate(newest_first):
        by_count = retention_full is not None and index < retention_full
        by_age = retention_days is not None and now - backup.stop_time < timedelta(
            days=retention_days
        )
        if index == 0 or by_count or by_age:
            keep.append(backup)
    kept_ids = {b.id for b in keep}
    remove = tuple(sorted(b.id for b in catalog.backups if b.id not in kept_ids))
    newest = newest_first[0] if newest_first else None
    incomplete = tuple(
        backup_id
        for backup_id in catalog.incomplete
        if newest is not None
        and backup_id < newest.id
        and (started := id_time(backup_id)) is not None
        and now - started > INCOMPLETE_GRACE
    )
    if not keep:
        return ExpirePlan((), remove, incomplete, (), None)
    floor = min(b.start_lsn for b in keep) // catalog.segment_size
    wal = tuple(
        name for name in sorted(catalog.wal) if _wal_number(name, catalog.segment_size) < floor
    )
    oldest = min(keep, key=lambda b: b.start_lsn)
    return ExpirePlan(
        keep=tuple(sorted(kept_ids)),
        backups=remove,
        incomplete=incomplete,
        wal=wal,
        wal_floor=walnames.segment_of(oldest.start_lsn, oldest.timeline, catalog.segment_size).name(
            catalog.segment_size
        ),
    )


def _wal_number(name: str, segment_size: int) -> int:
    """The segment number a WAL file belongs to; history files never expire."""
    if walnames.is_segment(name) or walnames.is_partial(name):
        return walnames.parse_segment(name, segment_size).number
    if walnames.is_backup_history(name):
        return walnames.parse_segment(name[:24], segment_size).number
    return 1 << 62


def expire(
    repo: Repository,
    retention_full: int | None,
    retention_days: int | None,
    now: datetime,
    *,
    dry_run: bool = False,
) -> ExpirePlan:
    """Apply retention; returns what was (or, with dry_run, would be) removed.

    A removed backup loses its manifest first, so an interrupted expire leaves an
    incomplete backup behind (never used, removed next time), not a broken one.
    """
    catalog = load_catalog(repo)
    plan = expire_plan(catalog, retention_full, retention_days, now)
    if dry_run:
        return plan
    for backup_id in plan.backups:
        repo.delete([manifest_key(backup_id)])
    doomed = [
        info.key
        for backup_id in (*plan.backups, *plan.incomplete)
        for info in catalog.backup_objects.get(backup_id, ())
        if not info.key.endswith("/" + MANIFEST)
    ]
    _delete(repo, doomed)
    _delete(repo, [WAL_PREFIX + name for name in plan.wal])
    return plan


def _delete(repo: Repository, keys: Sequence[str]) -> None:
    if keys:
        repo.delete(keys)
