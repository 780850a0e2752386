"""`stellarbase backup …`: the command line of backups; the work is in `commands.backup`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stellarbase.cli.options import ConfigFile, Debug, Output, Quiet, Root, Sets
from stellarbase.cli.session import begin
from stellarbase.result import Format, Result

backup_app = typer.Typer(
    help="Base backups, WAL archive and point-in-time restore of PostgreSQL.",
    no_args_is_help=True,
)


@backup_app.command("now")
def backup_now(
    label: Annotated[str, typer.Option("--label", help="A label kept in the manifest.")] = "",
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    quiet: Quiet = False,
    debug: Debug = False,
) -> Result:
    """Take a full base backup now, streamed into the repository."""
    from stellarbase.commands import backup as commands

    begin("backup now", output, debug, quiet=quiet)
    return commands.backup_now(commands.context(root, config, set_), label)


@backup_app.command("list")
def backup_list(
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """Backups with sizes and WAL range, and the window each can restore to."""
    from stellarbase.commands import backup as commands

    begin("backup list", output, debug)
    return commands.backup_list(commands.context(root, config, set_))


@backup_app.command("verify")
def backup_verify(
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """Check every object's checksum and the WAL chain from each backup to the newest."""
    from stellarbase.commands import backup as commands

    begin("backup verify", output, debug)
    return commands.backup_verify(commands.context(root, config, set_))


@backup_app.command("expire")
def backup_expire(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show, remove nothing.")] = False,
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    quiet: Quiet = False,
    debug: Debug = False,
) -> Result:
    """Remove backups past the retention, and WAL no kept backup needs."""
    from stellarbase.commands import backup as commands

    begin("backup expire", output, debug, quiet=quiet)
    return commands.backup_expire(commands.context(root, config, set_), dry_run)


@backup_app.command("restore")
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
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """Restore to a time, an LSN or the latest archived WAL; PostgreSQL ends promoted."""
    from stellarbase.commands import backup as commands

    begin("backup restore", output, debug)
    target = commands.parse_target(to_time, to_lsn, latest)
    ctx = commands.context(root, config, set_)
    return commands.backup_restore(ctx, target, backup_id, data_dir, force)


@backup_app.command("drill")
def backup_drill(
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """Restore the newest backup to a scratch cluster, query it, report the RTO, clean up."""
    from stellarbase.commands import backup as commands

    begin("backup drill", output, debug)
    return commands.backup_drill(commands.context(root, config, set_))


@backup_app.command("archiver", hidden=True)
def backup_archiver(
    pg_wal: Annotated[Path, typer.Option("--pg-wal", help="The cluster's pg_wal directory.")],
    spool: Annotated[Path, typer.Option("--spool", help="Where the durable markers go.")],
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    debug: Debug = False,
) -> None:
    """Run the WAL archiver in the foreground (the agent runs the same loop)."""
    from stellarbase.commands import backup as commands

    begin("backup archiver", Format.TEXT, debug)
    commands.run_archiver(commands.context(root, config, set_), pg_wal, spool)
