"""`backup now | list | verify | expire | restore | drill`, and the hidden `archiver`: what
they do on an installed host, with the context they share and the audit rows they leave.

Backups run next to the local PostgreSQL: base backups connect as its superuser (whose
password only root can read), the agent archives WAL as the service user.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from stellarbase import audit, envfile, installed_config
from stellarbase.errors import ExitCode, StellarError
from stellarbase.paths import GROUP, POSTGRES_USER, HostPaths
from stellarbase.result import Result, Status, StepResult

if TYPE_CHECKING:
    from stellarbase import config as cfg
    from stellarbase.backup.store import Repository

log = structlog.get_logger()


@dataclass
class BackupContext:
    paths: HostPaths
    config: cfg.Config

    @cached_property
    def repo(self) -> Repository:
        from stellarbase.backup.repo import open_repository

        return open_repository(self.config)

    @cached_property
    def key(self) -> bytes | None:
        from stellarbase.backup.codec import encryption_key

        return encryption_key(self.config.backup)

    @property
    def port(self) -> int:
        return self.config.local.postgres.port

    def admin_conninfo(self) -> str:
        from stellarbase import localdeps

        name = localdeps.ADMIN_PASSWORD
        password = envfile.read_env_file(self.paths.admin_secrets_file).get(name)
        if not password:
            raise StellarError(
                f"{self.paths.admin_secrets_file}: no local PostgreSQL superuser password",
                hint="backups need root on a host installed with the local PostgreSQL",
                code=ExitCode.CONFIG,
            )
        return localdeps.local_conninfo(
            self.port, localdeps.ADMIN_ROLE, password, "postgres", connect_timeout=10
        )

    def bindir(self) -> Path:
        from stellarbase import localdeps

        found, _ = localdeps.find_postgres()
        if found is None:
            raise StellarError(
                "no PostgreSQL server binaries on this host",
                hint="install the distribution's postgresql package",
                code=ExitCode.HOST,
            )
        return found.path

    def audit(self, action: str, ok: bool, details: dict[str, Any]) -> str:
        try:
            url, password = installed_config.postgres_target(
                installed_config.load_installed(self.paths, None, None), self.paths
            )
        except StellarError as exc:
            return f"not recorded: {exc.message}"
        error = audit.try_record(
            url,
            password,
            action=action,
            outcome="success" if ok else "failure",
            details=details,
            correlation_id=audit.current_correlation_id(),
        )
        return "recorded" if error is None else f"not recorded: {error.message}"


def context(root: Path, site_file: Path | None, sets: list[str] | None) -> BackupContext:
    paths = HostPaths(root)
    loaded = installed_config.load_site(paths, site_file, sets, None)
    if not loaded.config.backup.enabled:
        raise StellarError(
            "backups are off: backup.repository is none",
            hint="set backup.repository to s3 (with an s3 section) or file:///path, "
            "then run `stellarbase install`",
            code=ExitCode.CONFIG,
        )
    return BackupContext(paths, loaded.config)


def backup_now(ctx: BackupContext, label: str) -> Result:
    from stellarbase.backup.basebackup import take_backup

    started = time.monotonic()
    try:
        conninfo = ctx.admin_conninfo()
        _require_archiving(conninfo)
        manifest = take_backup(
            ctx.repo, conninfo, ctx.bindir(), ctx.config.backup, label or "scheduled"
        )
    except StellarError as exc:
        _write_status(ctx.paths, failed=True)
        ctx.audit("backup", False, {"error": exc.message})
        raise
    seconds = time.monotonic() - started
    _write_status(ctx.paths, manifest=manifest)
    note = ctx.audit("backup", True, {"id": manifest["id"], "bytes": manifest["stored_bytes"]})
    line = (
        f"backup {manifest['id']}: {_size(manifest['raw_bytes'])} as "
        f"{_size(manifest['stored_bytes'])} in {seconds:.1f} s "
        f"(WAL {manifest['start_wal']}..{manifest['stop_wal']})"
    )
    return Result(
        "backup",
        steps=(StepResult("base backup", Status.CHANGED, manifest["id"]),),
        data={"backup": manifest, "seconds": round(seconds, 3), "audit": note},
        messages=(line,),
    )


def _require_archiving(conninfo: str) -> None:
    """A base backup is complete only once its WAL is archived: refuse when that is failing.

    Without this, pg_basebackup would wait for the archive forever.
    """
    import psycopg

    from stellarbase import db

    hint = "is stellarbase-postgres running? `systemctl status stellarbase-postgres`"
    with (
        db.server_errors("cannot reach the local PostgreSQL", hint=hint, code=ExitCode.DEPENDENCY),
        psycopg.connect(conninfo) as conn,
    ):
        mode = conn.execute("SHOW archive_mode").fetchone()
        row = conn.execute(
            "SELECT last_failed_wal, last_failed_time > coalesce(last_archived_time, "
            "'-infinity') FROM pg_stat_archiver"
        ).fetchone()
    if mode is None or mode[0] != "on":
        raise StellarError(
            "WAL archiving is off in the local PostgreSQL",
            hint="run `stellarbase install` with backup.repository set: it turns archiving on",
            code=ExitCode.CONFIG,
        )
    if row is not None and row[1]:
        raise StellarError(
            f"WAL archiving is failing (last failed file {row[0]}), so a backup would never end",
            hint="is stellarbase-agent running? `systemctl status stellarbase-agent`, "
            "`journalctl -u stellarbase-agent`",
            code=ExitCode.DEPENDENCY,
        )


def backup_list(ctx: BackupContext) -> Result:
    from stellarbase.backup import catalog

    listing = catalog.listing(catalog.load_catalog(ctx.repo, ctx.key, tampered_ok=True))
    lines = catalog.describe_listing(listing)
    return Result("backup list", listing.as_dict(), tuple(lines))


def backup_verify(ctx: BackupContext) -> Result:
    from stellarbase.backup.verify import coverage, verify

    report = verify(ctx.repo, ctx.key)
    problems = report.messages
    lines = [f"problem: {p}" for p in problems]
    lines.append(
        f"checked {report.objects} objects ({_size(report.bytes)}) in {report.seconds:.1f} s: "
        + ("no problems" if not problems else f"{len(problems)} problem(s)")
    )
    covered = coverage(ctx.key)
    lines.append(
        "authenticated with backup.encryption_key: "
        + ("yes" if covered["authenticated"] else "NO (no key set)")
    )
    lines += [f"  detects: {d}" for d in covered["detects"]]
    lines += [f"  does not detect: {d}" for d in covered["does_not_detect"]]
    info: dict[str, Any] = {
        "objects": report.objects,
        "bytes": report.bytes,
        "problems": problems,
        "ok": not problems,
        **covered,
    }
    code = ExitCode.BACKUP if problems else ExitCode.OK
    return Result("backup verify", info, tuple(lines), exit_code=int(code))


def backup_expire(ctx: BackupContext, dry_run: bool) -> Result:
    from stellarbase.backup import catalog

    b = ctx.config.backup
    removed = catalog.expire(
        ctx.repo, b.retention_full, b.retention_days, datetime.now(UTC), dry_run=dry_run
    )
    verb = "would remove" if dry_run else "removed"
    backups, wal = removed.backups, removed.wal
    lines = [f"{verb} backup {bid}" for bid in backups]
    lines.append(f"{verb} {len(backups)} backup(s) and {len(wal)} WAL file(s)")
    if not dry_run and (backups or wal):
        ctx.audit("backup expire", True, {"backups": list(backups), "wal_files": len(wal)})
    status = Status.CHANGED if (backups or wal) and not dry_run else Status.UNCHANGED
    return Result(
        "backup expire",
        steps=(StepResult("expire", status, f"{len(backups)} backups, {len(wal)} WAL files"),),
        data={"backups": list(backups), "wal": list(wal), "dry_run": dry_run},
        messages=tuple(lines),
    )


def parse_target(to_time: str | None, to_lsn: str | None, latest: bool) -> Any:
    from stellarbase.backup import restore
    from stellarbase.backup.walnames import parse_lsn

    given = [x for x in (to_time, to_lsn, latest or None) if x is not None]
    if len(given) != 1:
        raise StellarError(
            "say where to restore to: exactly one of --to-time, --to-lsn or --latest",
            hint='e.g. stellarbase backup restore --to-time "2026-11-22T14:00:00Z"',
            code=ExitCode.USAGE,
        )
    if to_time is not None:
        try:
            when = datetime.fromisoformat(to_time.replace("Z", "+00:00"))
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            raise StellarError(
                f"--to-time {to_time!r} is not an ISO 8601 time with a zone",
                hint='e.g. --to-time "2026-11-22T14:00:00Z"',
                code=ExitCode.USAGE,
            )
        return restore.Target.at_time(when)
    if to_lsn is not None:
        try:
            return restore.Target.at_lsn(parse_lsn(to_lsn))
        except ValueError as exc:
            raise StellarError(
                str(exc), hint="e.g. --to-lsn 0/3000028", code=ExitCode.USAGE
            ) from None
    return restore.Target.latest()


def backup_restore(
    ctx: BackupContext, target: Any, backup_id: str | None, data_dir: Path | None, force: bool
) -> Result:
    from stellarbase.backup import restore

    live = data_dir is None
    where = ctx.paths.postgres_data if data_dir is None else data_dir
    started = time.monotonic()
    details: dict[str, Any] = {"target": str(target), "data_dir": str(where)}
    common: dict[str, Any] = {
        "backup_id": backup_id,
        "data_dir": where,
        "bindir": ctx.bindir(),
        "run_as": POSTGRES_USER,
        "force": force,
    }
    try:
        if live:
            outcome = restore.restore_live(
                ctx.repo, ctx.key, target, unit="stellarbase-postgres.service", **common
            )
        else:
            outcome = restore.restore_into(ctx.repo, ctx.key, target, **common)
    except StellarError as exc:
        details["error"] = exc.message
        ctx.audit("backup restore", False, details)
        raise
    seconds = time.monotonic() - started
    details.update(outcome.as_dict())
    note = ctx.audit("backup restore", True, details)
    lines = [
        f"restored backup {outcome.backup_id} to {target} in {where}: recovered and promoted "
        f"in {outcome.recovery_seconds:.1f} s ({seconds:.1f} s in all)",
        *outcome.notes,
    ]
    return Result(
        "backup restore",
        steps=(StepResult("restore", Status.CHANGED, f"backup {outcome.backup_id}"),),
        data={**details, "seconds": round(seconds, 3), "audit": note},
        messages=tuple(lines),
    )


def backup_drill(ctx: BackupContext) -> Result:
    from stellarbase.backup import restore

    result = restore.drill(ctx.repo, ctx.key, ctx.bindir(), POSTGRES_USER, ctx.paths.state_dir)
    note = ctx.audit("backup drill", True, result.as_dict())
    return Result(
        "backup drill",
        data={**result.as_dict(), "audit": note},
        messages=(
            f"drill: backup {result.backup_id} restored and answered in {result.rto_seconds:.1f} s"
            f" (RTO); {result.summary}",
        ),
    )


def run_archiver(ctx: BackupContext, pg_wal: Path, spool: Path) -> None:
    """The agent's archive loop in the foreground, until SIGTERM or SIGINT."""
    import signal

    from stellarbase.backup.archiver import Archiver, return_freed_buffers

    return_freed_buffers()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Archiver.from_config(ctx.config, pg_wal, spool).run(stop)


def _write_status(
    paths: HostPaths, manifest: dict[str, Any] | None = None, failed: bool = False
) -> None:
    """Last backup and failure count for the agent's metrics; best effort."""
    path = paths.backup_status_file
    status: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        status = json.loads(path.read_text())
    if manifest is not None:
        status.update(
            last_success=time.time(),
            last_id=manifest["id"],
            last_stored_bytes=manifest["stored_bytes"],
            last_raw_bytes=manifest["raw_bytes"],
        )
    if failed:
        status["failures"] = int(status.get("failures", 0)) + 1
    with contextlib.suppress(OSError, KeyError):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.chmod(tmp, 0o640)
        os.chown(tmp, 0, grp.getgrnam(GROUP).gr_gid)  # the agent reads it
        os.replace(tmp, path)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return f"{n} B"
