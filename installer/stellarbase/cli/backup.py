"""`stellarbase backup …`: the command line of backups; the work is in `commands.backup`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from stellarbase.cli.options import Common, shared
from stellarbase.result import Result

if TYPE_CHECKING:
    from stellarbase.commands.backup import BackupContext

backup_app = typer.Typer(
    help="Base backups, WAL archive and point-in-time restore of PostgreSQL.",
    no_args_is_help=True,
)


def _context(opts: Common) -> BackupContext:
    from stellarbase.commands.backup import context

    return context(opts.root, opts.config, opts.sets)


@backup_app.command("now")
@shared("backup now", "config", "root", "output", "quiet")
def backup_now(
    label: Annotated[str, typer.Option("--label", help="A label kept in the manifest.")] = "",
    *,
    opts: Common,
) -> Result:
    """Take a full base backup now, streamed into the repository."""
    from stellarbase.commands import backup as verb

    return verb.backup_now(_context(opts), label)


@backup_app.command("list")
@shared("backup list", "config", "root", "output")
def backup_list(*, opts: Common) -> Result:
    """Backups with sizes and WAL range, and the window each can restore to."""
    from stellarbase.commands import backup as verb

    return verb.backup_list(_context(opts))


@backup_app.command("verify")
@shared("backup verify", "config", "root", "output")
def backup_verify(*, opts: Common) -> Result:
    """Check every object's checksum and the WAL chain from each backup to the newest."""
    from stellarbase.commands import backup as verb

    return verb.backup_verify(_context(opts))


@backup_app.command("expire")
@shared("backup expire", "config", "root", "output", "quiet")
def backup_expire(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show, remove nothing.")] = False,
    *,
    opts: Common,
) -> Result:
    """Remove backups past the retention, and WAL no kept backup needs."""
    from stellarbase.commands import backup as verb

    return verb.backup_expire(_context(opts), dry_run)


@backup_app.command("restore")
@shared("backup restore", "config", "root", "output")
def backup_restore(
    to_time: Annotated[
        str | None, typer.Option("--to-time", help="ISO 8601 time, e.g. 2026-11-22T14:00:00Z.")
    ] = None,
    to_lsn: Annotated[str | None, typer.Option("--to-lsn", help="An LSN like 0/3000028.")] = None,
    latest: Annotated[bool, typer.Option("--latest", help="Everything archived.")] = False,
    backup_id: Annotated[str | None, typer.Option("--backup", help="Start from this one.")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Restore into this directory instead of the live one."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the live cluster (it is moved aside first).")
    ] = False,
    *,
    opts: Common,
) -> Result:
    """Restore to a time, an LSN or the latest archived WAL; PostgreSQL ends promoted."""
    from stellarbase.commands import backup as verb

    target = verb.parse_target(to_time, to_lsn, latest)
    return verb.backup_restore(_context(opts), target, backup_id, data_dir, force)


@backup_app.command("drill")
@shared("backup drill", "config", "root", "output")
def backup_drill(*, opts: Common) -> Result:
    """Restore the newest backup to a scratch cluster, query it, report the RTO, clean up."""
    from stellarbase.commands import backup as verb

    return verb.backup_drill(_context(opts))


@backup_app.command("archiver", hidden=True)
@shared("backup archiver", "config", "root")
def backup_archiver(
    pg_wal: Annotated[Path, typer.Option("--pg-wal", help="The cluster's pg_wal directory.")],
    spool: Annotated[Path, typer.Option("--spool", help="Where the durable markers go.")],
    *,
    opts: Common,
) -> None:
    """Run the WAL archiver in the foreground (the agent runs the same loop)."""
    from stellarbase.commands import backup as verb

    verb.run_archiver(_context(opts), pg_wal, spool)
