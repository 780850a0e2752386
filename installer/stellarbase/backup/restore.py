"""Point-in-time restore: plan, extract, recover with a prefetching restore_command, drill.

Nothing is written before the plan holds: the backup exists, and every WAL segment from
its start to the target is in the repository. Recovery then runs a temporary postmaster
whose restore_command only waits for files in a spool; a prefetcher thread here fills the
spool ahead of it, checking each segment's sha256, so recovery never starts a Python
process per segment and never ends early on a damaged segment: the prefetcher stops its
heartbeat instead, the restore_command fails hard, and recovery aborts.
"""

from __future__ import annotations

import enum
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from stellarbase import fdops
from stellarbase.backup import postmaster, walnames
from stellarbase.backup.catalog import Catalog, Manifest, continuity, load_catalog
from stellarbase.backup.extract import extract_backup
from stellarbase.backup.postmaster import Cluster, chown_tree, start_postmaster, wait_promoted
from stellarbase.backup.prefetch import SPOOL_NAME, Prefetcher, restore_command
from stellarbase.backup.store import Repository
from stellarbase.backup.verify import authenticate_restore
from stellarbase.errors import ExitCode, StellarError
from stellarbase.files import write_atomic

log = structlog.get_logger()

RECOVERY_DEADLINE_S = 6 * 3600.0
_BLOCK_BEGIN = "# stellarbase restore: settings below are removed once recovery has finished"
_BLOCK_END = "# stellarbase restore: end"


# --------------------------------------------------------------------------- targets


class TargetKind(enum.StrEnum):
    """Where recovery stops: the end of the archive, a time, or a WAL position."""

    LATEST = "latest"
    TIME = "time"
    LSN = "lsn"


@dataclass(frozen=True)
class Target:
    """A recovery target: `time` goes with TIME, `lsn` with LSN."""

    kind: TargetKind
    time: datetime | None = None
    lsn: int | None = None

    @classmethod
    def latest(cls) -> Target:
        return cls(TargetKind.LATEST)

    @classmethod
    def at_time(cls, when: datetime) -> Target:
        if when.tzinfo is None:
            raise ValueError("a restore target time needs a time zone")
        return cls(TargetKind.TIME, time=when.astimezone(UTC))

    @classmethod
    def at_lsn(cls, lsn: int) -> Target:
        return cls(TargetKind.LSN, lsn=lsn)

    def __str__(self) -> str:
        if self.time is not None:
            return self.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if self.lsn is not None:
            return walnames.format_lsn(self.lsn)
        return "latest"


def _refuse(message: str, hint: str) -> StellarError:
    return StellarError(message, hint=hint, code=ExitCode.BACKUP)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RestorePlan:
    backup: Manifest
    target: Target
    timeline: int  # the timeline recovery follows
    needed: tuple[str, ...]  # WAL files recovery must find to reach the target
    chain: tuple[str, ...]  # every WAL file of the unbroken chain, in recovery order


def plan_restore(catalog: Catalog, target: Target, backup_id: str | None = None) -> RestorePlan:
    """The backup and WAL for `target`; refuses (StellarError) when the WAL cannot reach it.

    Without `backup_id`: the newest complete backup that ends before the target and whose
    WAL chain reaches it.
    """
    if backup_id is not None:
        return _plan_for(catalog, catalog.backup(backup_id), target)
    candidates = [b for b in reversed(catalog.backups) if _ends_before(b, target)]
    if not candidates:
        raise _refuse(
            f"no complete backup in {catalog.repo.description} ends before {target}",
            hint="`stellarbase backup list` shows the backups and how far each restores",
        )
    refusals: list[StellarError] = []
    for backup in candidates:
        try:
            return _plan_for(catalog, backup, target)
        except StellarError as exc:
            refusals.append(exc)
    raise refusals[0]


def _ends_before(backup: Manifest, target: Target) -> bool:
    if target.time is not None:
        return backup.stop_time <= target.time
    if target.lsn is not None:
        return backup.stop_lsn <= target.lsn
    return True


def _plan_for(catalog: Catalog, backup: Manifest, target: Target) -> RestorePlan:
    if not _ends_before(backup, target):
        raise _refuse(
            f"backup {backup.id} ends after the target {target}",
            hint="pick an older backup, or a later target",
        )
    _check_parts(catalog, backup)
    chain = continuity(catalog, backup)
    names = tuple(catalog.segment_name(s) for s in chain.path)
    missing = catalog.segment_name(chain.end)
    if not chain.restorable:
        raise _refuse(
            f"WAL segment {missing} is missing from {catalog.repo.description}: "
            f"backup {backup.id} cannot be restored without it",
            hint="`stellarbase backup verify` lists what is missing; pick another backup",
        )
    reach = _reach(catalog, chain.path)
    gap_hint = f"restore to a point before the gap (--to-time {reach}) or pick another backup"
    gap_message = (
        f"WAL segment {missing} is missing from {catalog.repo.description}; "
        f"backup {backup.id} restores only up to {reach} ({names[-1]})"
    )
    if target.kind == TargetKind.LATEST:
        if chain.gap:
            raise _refuse(gap_message, gap_hint)
        needed = names
    elif target.lsn is not None:
        wanted = target.lsn // catalog.segment_size
        if chain.path[-1].number < wanted:
            if chain.gap:
                raise _refuse(gap_message, gap_hint)
            raise _refuse(
                f"LSN {target} is past the archived WAL: it ends with {names[-1]} ({reach})",
                hint="restore --latest, or wait until the archiver has uploaded more WAL",
            )
        needed = tuple(n for n, s in zip(names, chain.path, strict=True) if s.number <= wanted)
    else:
        assert target.time is not None
        index = _first_completed_after(catalog, chain.path, target.time)
        if index is None:
            if chain.gap:
                raise _refuse(gap_message, gap_hint)
            raise _refuse(
                f"{target} is past the archived WAL: its last segment {names[-1]} "
                f"was completed at {reach}",
                hint="restore --latest, or wait until the archiver has uploaded more WAL",
            )
        needed = names[: index + 1]
    return RestorePlan(backup, target, chain.timeline, needed, names)


def _check_parts(catalog: Catalog, backup: Manifest) -> None:
    """Every part of the backup is stored, at the size the manifest records."""
    stored = {info.key: info.size for info in catalog.backup_objects.get(backup.id, ())}
    for part in backup.parts:
        size = stored.get(part.key)
        if size != part.stored_bytes:
            found = (
                "missing"
                if size is None
                else f"{size} bytes, the manifest says {part.stored_bytes}"
            )
            raise _refuse(
                f"backup {backup.id} cannot be restored: {part.key} is {found}",
                hint="`stellarbase backup verify` checks every backup; pick another one",
            )


def _reach(catalog: Catalog, path: Sequence[walnames.Segment]) -> str:
    mtime = catalog.wal_mtime(path[-1]) if path else None
    if mtime is None:
        return "its last segment"
    return mtime.strftime("%Y-%m-%dT%H:%M:%SZ")


def _first_completed_after(
    catalog: Catalog, path: Sequence[walnames.Segment], when: datetime
) -> int | None:
    """Index of the first segment completed at or after `when` (segments complete in order)."""
    lo, hi = 0, len(path)
    while lo < hi:
        mid = (lo + hi) // 2
        mtime = catalog.wal_mtime(path[mid])
        if mtime is not None and mtime >= when:
            hi = mid
        else:
            lo = mid + 1
    return lo if lo < len(path) else None


# --------------------------------------------------------------------------- the data dir


def check_data_dir(data_dir: Path, force: bool) -> None:
    pid = postmaster.running_postmaster(data_dir)
    if pid is not None:
        raise _refuse(
            f"{data_dir} belongs to a running PostgreSQL (postmaster PID {pid})",
            hint="stop that cluster first, then restore with --force to replace its data",
        )
    if data_dir.is_dir() and any(data_dir.iterdir()) and not force:
        raise _refuse(
            f"{data_dir} is not empty",
            hint="restore into an empty directory, or pass --force to replace its contents "
            "(a running cluster must be stopped first)",
        )


def _prepare_data_dir(
    data_dir: Path, recovery: Mapping[str, str], owner: pwd.struct_passwd
) -> None:
    for leftover in ("recovery.signal", "standby.signal", "postmaster.pid", "backup_label.old"):
        (data_dir / leftover).unlink(missing_ok=True)
    (data_dir / "pg_wal" / "archive_status").mkdir(parents=True, exist_ok=True)
    # Distribution packages keep postgresql.conf outside the data dir; the tar lacks it.
    (data_dir / "postgresql.conf").touch(exist_ok=True)
    write_recovery_settings(data_dir, recovery, owner)
    chown_tree(data_dir, owner)  # last: from here on, root works in it by fd only


# --------------------------------------------------------------------------- settings


def recovery_settings(plan: RestorePlan, spool_dir: Path) -> dict[str, str]:
    settings = {
        "restore_command": restore_command(spool_dir),
        "recovery_target_action": "promote",
        # The timeline the plan checked, not 'latest': a higher timeline that does not
        # descend from the backup would make recovery fail after the restore began.
        "recovery_target_timeline": str(plan.timeline),
    }
    if plan.target.time is not None:
        settings["recovery_target_time"] = plan.target.time.isoformat(sep=" ")
    elif plan.target.lsn is not None:
        settings["recovery_target_lsn"] = walnames.format_lsn(plan.target.lsn)
    return settings


def _strip_block(text: str) -> str:
    kept: list[str] = []
    inside = False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == _BLOCK_BEGIN:
            inside = True
        elif line.rstrip("\n") == _BLOCK_END:
            inside = False
        elif not inside:
            kept.append(line)
    return "".join(kept)


def _write_auto_conf(data_dir: Path, text: str, owner: pwd.struct_passwd) -> None:
    write_atomic(
        data_dir / "postgresql.auto.conf",
        text.encode(),
        mode=0o600,
        uid=owner.pw_uid,
        gid=owner.pw_gid,
    )


def _read_auto_conf(data_dir: Path) -> str | None:  # never through a planted link
    data = fdops.read_file(data_dir / "postgresql.auto.conf")
    return None if data is None else data.decode()


def write_recovery_settings(
    data_dir: Path, settings: Mapping[str, str], owner: pwd.struct_passwd
) -> None:
    text = _strip_block(_read_auto_conf(data_dir) or "")
    if text and not text.endswith("\n"):
        text += "\n"
    lines = [
        f"{name} = '{value.replace(chr(39), chr(39) * 2)}'" for name, value in settings.items()
    ]
    _write_auto_conf(data_dir, text + "\n".join([_BLOCK_BEGIN, *lines, _BLOCK_END, ""]), owner)
    write_atomic(data_dir / "recovery.signal", b"", mode=0o600, uid=owner.pw_uid, gid=owner.pw_gid)


def clear_recovery_settings(data_dir: Path, owner: pwd.struct_passwd) -> None:
    text = _read_auto_conf(data_dir)
    if text is not None:
        _write_auto_conf(data_dir, _strip_block(text), owner)


# --------------------------------------------------------------------------- restore


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    target: str
    timeline: int
    data_dir: str
    raw_bytes: int
    extract_seconds: float
    recovery_seconds: float
    total_seconds: float
    wal_files: int  # fetched by the prefetcher
    wal_bytes: int
    wal_seconds: float  # from the first download's start to the last's end
    notes: tuple[str, ...] = ()
    cluster: Cluster | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cluster"}
        data["notes"] = list(self.notes)
        return data


def _account(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise StellarError(
            f"no OS account {name!r} to run PostgreSQL as", code=ExitCode.HOST
        ) from None


def restore_into(
    repo: Repository,
    key: bytes | None,
    target: Target,
    *,
    data_dir: Path,
    bindir: Path,
    run_as: str,
    backup_id: str | None = None,
    force: bool = False,
    keep_running: bool = False,
    port: int | None = None,
    settings: Mapping[str, str] | None = None,
    deadline_s: float = RECOVERY_DEADLINE_S,
) -> RestoreResult:
    """Restore into `data_dir` and recover until promoted.

    The cluster is stopped afterwards unless `keep_running`, in which case the result
    carries it (reachable through its private socket) and the caller stops it.
    """
    started = time.monotonic()
    owner = _account(run_as)
    catalog = load_catalog(repo, key)
    plan = plan_restore(catalog, target, backup_id)
    authenticate_restore(catalog, plan.backup, plan.chain)  # with a key: before any write
    spool = data_dir / SPOOL_NAME
    recovery = recovery_settings(plan, spool)  # refuses a data dir no command can name
    check_data_dir(data_dir, force)
    log.info("restore", backup=plan.backup.id, target=str(target), wal=len(plan.needed))
    fdops.claim_dir(data_dir)  # root's alone until _prepare_data_dir hands it over
    spool.mkdir(mode=0o700)
    # The base backup first, then WAL: fetching both at once made them compete for the
    # CPU (decoding, hashing) and the disk, and recovery needs the files before any WAL.
    raw_bytes = extract_backup(catalog.repo, catalog.key, plan.backup, data_dir)
    postmaster.refuse_code(data_dir, plan.backup.id)
    _prepare_data_dir(data_dir, recovery, owner)
    extracted = time.monotonic()
    with Prefetcher(catalog, spool, plan.chain, owner) as prefetcher:
        cluster = start_postmaster(data_dir, bindir, owner, port=port, settings=settings)
        try:
            wait_promoted(cluster, prefetcher, deadline_s)
            recovered = time.monotonic()
            stats = prefetcher.stats()
            if not keep_running:
                cluster.stop()
        except BaseException:  # an interrupt included: no recovery server outlives us
            cluster.stop()
            raise
    shutil.rmtree(spool, ignore_errors=True)
    clear_recovery_settings(data_dir, owner)
    return RestoreResult(
        backup_id=plan.backup.id,
        target=str(target),
        timeline=plan.timeline,
        data_dir=str(data_dir),
        raw_bytes=raw_bytes,
        extract_seconds=round(extracted - started, 3),
        recovery_seconds=round(recovered - extracted, 3),
        total_seconds=round(time.monotonic() - started, 3),
        wal_files=stats.files,
        wal_bytes=stats.bytes,
        wal_seconds=round(stats.seconds, 3),
        cluster=cluster if keep_running else None,
    )


def restore_live(
    repo: Repository,
    key: bytes | None,
    target: Target,
    *,
    data_dir: Path,
    bindir: Path,
    unit: str,
    run_as: str,
    backup_id: str | None = None,
    force: bool = False,
) -> RestoreResult:
    """Restore the cluster `unit` runs: stop it, restore in place, start it again.

    The old data directory is moved aside, not deleted; when the restore fails it is put
    back and the unit started on it, so a failed restore loses nothing.
    """
    from stellarbase import systemd

    catalog = load_catalog(repo, key)
    plan = plan_restore(catalog, target, backup_id)  # refuse before stopping
    authenticate_restore(catalog, plan.backup, plan.chain)
    recovery_settings(plan, data_dir / SPOOL_NAME)  # as a data dir no command can name
    if not force:
        check_data_dir(data_dir, force=False)
    systemd.stop([unit])
    aside: Path | None = None
    if data_dir.is_dir() and any(data_dir.iterdir()):
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = data_dir.with_name(f"{data_dir.name}.before-restore-{stamp}")
        st = data_dir.stat()
        data_dir.rename(aside)
        data_dir.mkdir(mode=0o700)
        os.chown(data_dir, st.st_uid, st.st_gid)
    try:
        result = restore_into(
            repo,
            key,
            target,
            data_dir=data_dir,
            bindir=bindir,
            run_as=run_as,
            backup_id=backup_id,
            force=True,
        )
    except BaseException:
        if aside is not None:
            shutil.rmtree(data_dir, ignore_errors=True)
            aside.rename(data_dir)
        systemd.start(unit, wait=True)
        raise
    postmaster.mark_history_for_archiving(data_dir, _account(run_as))
    systemd.start(unit, wait=True)
    notes = [f"started {unit} again"]
    if aside is not None:
        notes.append(f"the cluster it replaced is kept in {aside}: remove it when done")
    return replace(result, notes=tuple(notes))


# --------------------------------------------------------------------------- drill


@dataclass(frozen=True)
class DrillResult:
    backup_id: str
    rto_seconds: float  # from the start of the restore to the first answered query
    restore: RestoreResult
    databases: int
    tables: int
    rows: int

    @property
    def summary(self) -> str:
        return f"{self.databases} databases, {self.tables} tables, {self.rows} rows readable"

    def as_dict(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup_id,
            "rto_seconds": self.rto_seconds,
            "restore": self.restore.as_dict(),
            "databases": self.databases,
            "tables": self.tables,
            "rows": self.rows,
        }


def count_rows(cluster: Cluster) -> tuple[int, int, int]:
    """(databases, tables, rows): every user table of every database is read in full."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(**cluster.conninfo(), autocommit=True) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate"
            )
        ]
    tables = rows = 0
    for name in names:
        with psycopg.connect(**cluster.conninfo(dbname=name), autocommit=True) as conn:
            found = conn.execute(
                "SELECT schemaname, tablename FROM pg_tables "
                "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
            ).fetchall()
            for schema, table in found:
                query = sql.SQL("SELECT count(*) FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(table)
                )
                row = conn.execute(query).fetchone()
                rows += int(row[0]) if row else 0
            tables += len(found)
    return len(names), tables, rows


def drill(
    repo: Repository, key: bytes | None, bindir: Path, run_as: str, workdir: Path
) -> DrillResult:
    """Restore the newest backup to the latest point into a scratch dir, query, clean up.

    The scratch cluster never archives (it would write a new timeline into the repository;
    see `postmaster.recovery_overrides`) and listens only on its private socket and a free
    loopback port.
    """
    scratch = Path(tempfile.mkdtemp(prefix="drill-", dir=workdir))
    try:
        scratch.chmod(0o711)  # root's, so the scratch cluster cannot swap its data dir
        started = time.monotonic()
        result = restore_into(
            repo,
            key,
            Target.latest(),
            data_dir=scratch / "data",
            bindir=bindir,
            run_as=run_as,
            keep_running=True,
        )
        assert result.cluster is not None
        try:
            databases, tables, rows = count_rows(result.cluster)
            rto = time.monotonic() - started
        finally:
            result.cluster.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return DrillResult(result.backup_id, round(rto, 3), result, databases, tables, rows)
