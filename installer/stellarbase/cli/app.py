"""The command line: parse arguments and call a verb of `stellarbase.commands`; each
command returns that verb's result, which `stellarbase.cli.main` prints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from typer.exceptions import TyperException

from stellarbase.cli.backup import backup_app
from stellarbase.cli.options import Common, Debug, Output, Skip, Yes, shared
from stellarbase.cli.session import SESSION
from stellarbase.errors import ExitCode, StellarError
from stellarbase.paths import HostPaths
from stellarbase.result import Format, Result

# Each command imports what it needs (config, commands, drivers) itself: `--help` and
# `preflight` then pay only for their own modules, not for every command's.
if TYPE_CHECKING:
    from stellarbase import configload

app = typer.Typer(
    name="stellarbase",
    help="Install and supervise the StellarBase AI platform on a systemd host.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show the merged configuration or its JSON Schema.")
app.add_typer(config_app, name="config")
app.add_typer(backup_app, name="backup")

Binary = Annotated[
    Path | None,
    typer.Option("--binary", help="Binary to install (default: this packaged binary)."),
]
Bundle = Annotated[
    Path | None,
    typer.Option(
        "--bundle", help="Release bundle (.tar.gz) to install, verified before any change."
    ),
]
RetireLocal = Annotated[
    bool,
    typer.Option(
        "--retire-local",
        help="A dependency that goes external: stop its local server, keep its data on disk "
        "(move the data first).",
    ),
]
AllowDowngrade = Annotated[
    bool,
    typer.Option(
        "--allow-downgrade",
        help="Install a release older than the installed one (never a revoked one).",
    ),
]
# install never asks; scripts written for other commands pass --yes to it all the same.
IgnoredYes = Annotated[bool, typer.Option("--yes", "-y", hidden=True, help="No-op for install.")]


def invoke(argv: list[str]) -> Result:
    """Run the command line's command; command-line mistakes become a usage result."""
    try:
        returned = app(args=argv, standalone_mode=False)  # a typer.Exit comes back as its code
    except typer.Abort:
        raise KeyboardInterrupt from None
    except typer.Exit as exc:
        return Result(SESSION.command, exit_code=exc.exit_code, written=True)
    except TyperException as exc:  # bad command line: typer's own usage errors
        show = getattr(exc, "show", None)
        if show:
            show()
        return Result(SESSION.command, exit_code=int(ExitCode.USAGE), written=True)
    if isinstance(returned, Result):
        return returned
    code = returned if isinstance(returned, int) else 0  # --help, or a command that printed
    return Result(SESSION.command, exit_code=code, written=True)


def _load(opts: Common) -> configload.LoadedConfig:
    from stellarbase import configload

    return configload.load_config(site_file=opts.config, sets=opts.sets or [], tier=opts.tier)


def _load_site(opts: Common) -> configload.LoadedConfig:
    """The config given, else the installed one."""
    from stellarbase import installed_config

    return installed_config.load_site(opts.paths, opts.config, opts.sets, opts.tier)


def _validate(loaded: configload.LoadedConfig, paths: HostPaths) -> None:
    """The config's own checks, before the modules that plan and apply load: a refused
    config answers at once. Install and plan run them again, for callers other than this."""
    from stellarbase import validate

    validate.check_install(loaded, paths)


@app.command()
@shared("install", "tier", "config", "root", "output")
def install(
    binary: Binary = None,
    bundle: Bundle = None,
    skip: Skip = None,
    retire_local: RetireLocal = False,
    allow_downgrade: AllowDowngrade = False,
    yes: IgnoredYes = False,
    *,
    opts: Common,
) -> Result:
    """Converge this host to healthy StellarBase services (a re-run changes nothing)."""
    if bundle is not None and binary is not None:
        raise StellarError(
            "--bundle and --binary both name the binary to install",
            hint="give one of them",
            code=ExitCode.USAGE,
        )
    loaded, paths = _load(opts), opts.paths
    _validate(loaded, paths)
    from stellarbase.commands import install as verb

    if bundle is not None:
        return verb.install_bundle(
            loaded, paths, bundle, skip or [], retire_local=retire_local,
            allow_downgrade=allow_downgrade,
        )  # fmt: skip
    return verb.install(
        loaded, paths, binary, skip or [], retire_local=retire_local,
        allow_downgrade=allow_downgrade,
    )  # fmt: skip


@app.command()
@shared("plan", "tier", "config", "root", "output", show_diff=True)
def plan(binary: Binary = None, retire_local: RetireLocal = False, *, opts: Common) -> Result:
    """Show what install would change, with a diff for every file."""
    loaded = _load(opts)
    _validate(loaded, opts.paths)
    from stellarbase.commands.plan import dry_run

    return dry_run(loaded, opts.paths, binary, retire_local=retire_local)


@app.command()
@shared("preflight", "tier", "config", "root", "output")
def preflight(skip: Skip = None, *, opts: Common) -> Result:
    """Check host, GPUs and dependencies before install: exit 0 pass, 10 warnings, 11 fail."""
    from stellarbase.commands import doctor as verb

    return verb.preflight(_load(opts), opts.paths, skip or [])


@app.command()
@shared("doctor", "root", "output")
def doctor(skip: Skip = None, *, opts: Common) -> Result:
    """The preflight checks against the installed system, plus every unit's state."""
    from stellarbase.commands import doctor as verb
    from stellarbase.installed_config import load_installed

    return verb.doctor(load_installed(opts.paths, [], None), opts.paths, skip or [])


@app.command()
@shared("status", "root", "output")
def status(*, opts: Common) -> Result:
    """Units (state, PID, restarts), readiness, version and config source."""
    from stellarbase.commands import status as verb

    return verb.status(opts.paths)


@app.command("support-bundle")
@shared("support-bundle", "tier", "config", "root", "output")
def support_bundle(
    output_file: Annotated[
        Path | None,
        typer.Option(
            "--output-file",
            "-O",
            help="Bundle path or directory (default: ./stellarbase-support-HOST-TIME.tar.gz).",
        ),
    ] = None,
    journal_lines: Annotated[
        int, typer.Option("--journal-lines", min=1, help="Journal lines per unit.")
    ] = 200,
    *,
    opts: Common,
) -> Result:
    """One tar.gz for support: config, checks, status, units, journal, audit; secrets redacted."""
    from stellarbase.commands import support as verb
    from stellarbase.support import Request

    request = Request(opts.config, tuple(opts.sets or ()), opts.tier, journal_lines, output_file)
    return verb.support_bundle(opts.paths, request)


@app.command()
@shared("uninstall", "root", "output")
def uninstall(
    purge: Annotated[bool, typer.Option("--purge", help="Also remove config and data.")] = False,
    yes: Yes = False,
    *,
    opts: Common,
) -> Result:
    """Stop and remove every unit and file the installer owns (config and data stay)."""
    from stellarbase.commands import uninstall as verb

    if not yes:
        what = "everything, config and data included" if purge else "units and binaries"
        if not sys.stdin.isatty():
            raise StellarError(
                f"uninstall would remove {what}; refusing without confirmation",
                hint="add --yes to run it non-interactively",
                code=ExitCode.USAGE,
            )
        typer.confirm(f"Remove {what}?", abort=True)
    return verb.uninstall(opts.paths, purge=purge)


@app.command()
@shared("upgrade", "tier", "config", "root", "output")
def upgrade(
    bundle: Annotated[
        Path, typer.Option("--bundle", help="Release bundle (.tar.gz) of the new release.")
    ],
    skip: Skip = None,
    allow_downgrade: AllowDowngrade = False,
    *,
    opts: Common,
) -> Result:
    """Verify, back up, migrate, swap and restart one unit at a time; roll back if unhealthy."""
    from stellarbase.commands import upgrade as verb

    return verb.upgrade(
        _load_site(opts), opts.paths, bundle, skip or [], allow_downgrade=allow_downgrade
    )


@app.command()
@shared("rollback", "root", "output")
def rollback(
    to: Annotated[str | None, typer.Option("--to", help="Installed release to return to.")] = None,
    *,
    opts: Common,
) -> Result:
    """Return to the release before the last upgrade (or --to), restart, health gate."""
    from stellarbase.commands import rollback as verb

    return verb.rollback(opts.paths, to)


@app.command(hidden=True)
@shared("activate", "root", "output")
def activate(*, opts: Common) -> Result:
    """Make this installed release current: units, rolling restart, health gate (rollback)."""
    from stellarbase.commands import install as verb

    return verb.activate(opts.paths)


@config_app.command("show")
@shared("config show", "tier", "config", "output")
def config_show(*, opts: Common) -> Result:
    """The merged configuration (secrets left out) and where each key came from."""
    from stellarbase.commands import config as verb

    return verb.show(_load(opts))


@config_app.command("schema")
def config_schema(output: Output = Format.TEXT) -> Result:
    """JSON Schema of the site config file, for editors and CI linting."""
    from stellarbase.commands import config as verb

    SESSION.command, SESSION.output = "config schema", output
    return verb.schema()


@app.command("run")
def run_service(
    service: Annotated[
        Literal["api", "worker", "agent", "inference"],
        typer.Argument(help="api, worker, agent or inference"),
    ],
    settings: Annotated[
        Path | None,
        typer.Option("--settings", help="Settings file (default /etc/stellarbase/services/…)."),
    ] = None,
    instance: Annotated[int | None, typer.Option("--instance", min=1)] = None,
    debug: Debug = False,
) -> None:
    """Run one StellarBase service in the foreground (what the systemd units start)."""
    # `stellarbase.cli.main` takes a shorter way, without this module; this one serves
    # `stellarbase.cli.app.app` used as a library.
    from stellarbase.service import run_service as serve

    SESSION.command, SESSION.debug, SESSION.service = "run", debug, True
    path = settings or HostPaths().service_settings_dir / f"{service}.json"
    serve(service, path, instance)


@app.command("supervise-request", hidden=True)
def supervise_request() -> Result:
    """Answer one restart request of the agent on stdin/stdout (stellarbase-supervise@)."""
    from stellarbase import log as logsetup
    from stellarbase.agent.helper import serve_connection

    logsetup.setup("info", sys.stderr)
    answered = serve_connection()
    return Result("supervise-request", exit_code=0 if answered else 1, written=True)


@app.command()
def version(output: Output = Format.TEXT) -> Result:
    """Print the version (-o json: with the schema range its migrations span)."""
    from stellarbase.commands import version as verb

    SESSION.command, SESSION.output = "version", output
    return verb.version(output)


migrate_app = typer.Typer(help="Apply or show the versioned PostgreSQL schema migrations.")
app.add_typer(migrate_app, name="migrate")

ToVersion = Annotated[
    int | None, typer.Option("--to", min=1, help="Stop after this migration version.")
]
Since = Annotated[
    str | None,
    typer.Option("--since", help="Rows at or after: ISO 8601 time or an age like 30m, 2h, 3d."),
]
Limit = Annotated[int, typer.Option("--limit", min=1, help="At most this many (newest) rows.")]


def _postgres(opts: Common) -> tuple[str, str | None]:
    from stellarbase import installed_config

    return installed_config.postgres_target(_load_site(opts), opts.paths)


@migrate_app.command("up")
@shared("migrate up", "tier", "config", "root", "output")
def migrate_up(to: ToVersion = None, *, opts: Common) -> Result:
    """Apply the pending migrations (config: --config, else the installed one)."""
    from stellarbase import audit
    from stellarbase.commands import migrate as verb

    conninfo, password = _postgres(opts)
    cid = audit.current_correlation_id()
    return verb.migrate_up_command(conninfo, password, to=to, correlation_id=cid)


@migrate_app.command("status")
@shared("migrate status", "tier", "config", "root", "output")
def migrate_status(*, opts: Common) -> Result:
    """Every migration: applied (and when), pending, or changed since it was applied."""
    from stellarbase import audit
    from stellarbase.commands import migrate as verb

    conninfo, password = _postgres(opts)
    cid = audit.current_correlation_id()
    return verb.migrate_status_command(conninfo, password, correlation_id=cid)


@app.command("audit")
@shared("audit", "tier", "config", "root", "output")
def audit_show(since: Since = None, limit: Limit = 1000, *, opts: Common) -> Result:
    """The audit log: who ran what on which host, and whether it worked."""
    from stellarbase import audit
    from stellarbase.commands import audit as verb

    start = audit.parse_since(since) if since is not None else None
    conninfo, password = _postgres(opts)
    return verb.audit_command(conninfo, password, since=start, limit=limit)
