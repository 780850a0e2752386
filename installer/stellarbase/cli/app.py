"""The command line: parse arguments and call a verb of `stellarbase.commands`; each
command returns that verb's result, which `stellarbase.cli.main` prints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from typer.exceptions import TyperException

from stellarbase.cli.backup import backup_app
from stellarbase.cli.options import (
    ConfigFile,
    Debug,
    Output,
    Root,
    Sets,
    Skip,
    TierOpt,
    Yes,
)
from stellarbase.cli.session import SESSION, begin
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


def _load(config: Path | None, sets: list[str] | None, tier: str | None) -> configload.LoadedConfig:
    from stellarbase import configload

    return configload.load_config(site_file=config, sets=sets or [], tier=tier)


def _validate(loaded: configload.LoadedConfig, paths: HostPaths) -> None:
    """The config's own checks, before the modules that plan and apply load: a refused
    config answers at once. Install and plan run them again, for callers other than this."""
    from stellarbase import validate

    validate.check_install(loaded, paths)


@app.command()
def install(
    tier: TierOpt = None,
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    binary: Binary = None,
    bundle: Bundle = None,
    skip: Skip = None,
    retire_local: RetireLocal = False,
    allow_downgrade: AllowDowngrade = False,
    output: Output = Format.TEXT,
    yes: IgnoredYes = False,
    debug: Debug = False,
) -> Result:
    """Converge this host to healthy StellarBase services (a re-run changes nothing)."""
    begin("install", output, debug)
    if bundle is not None and binary is not None:
        raise StellarError(
            "--bundle and --binary both name the binary to install",
            hint="give one of them",
            code=ExitCode.USAGE,
        )
    loaded = _load(config, set_, tier)
    paths = HostPaths(root)
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
def plan(
    tier: TierOpt = None,
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    binary: Binary = None,
    retire_local: RetireLocal = False,
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """Show what install would change, with a diff for every file."""
    begin("plan", output, debug, show_diff=True)
    loaded = _load(config, set_, tier)
    _validate(loaded, HostPaths(root))
    from stellarbase.commands.plan import dry_run

    return dry_run(loaded, HostPaths(root), binary, retire_local=retire_local)


@app.command()
def preflight(
    tier: TierOpt = None,
    config: ConfigFile = None,
    set_: Sets = None,
    skip: Skip = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """Check host, GPUs and dependencies before install: exit 0 pass, 10 warnings, 11 fail."""
    from stellarbase.commands import doctor as verb

    begin("preflight", output, debug)
    return verb.preflight(_load(config, set_, tier), HostPaths(root), skip or [])


@app.command()
def doctor(
    skip: Skip = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """The preflight checks against the installed system, plus every unit's state."""
    from stellarbase.commands import doctor as verb
    from stellarbase.installed_config import load_installed

    begin("doctor", output, debug)
    paths = HostPaths(root)
    return verb.doctor(load_installed(paths, [], None), paths, skip or [])


@app.command()
def status(root: Root = Path("/"), output: Output = Format.TEXT, debug: Debug = False) -> Result:
    """Units (state, PID, restarts), readiness, version and config source."""
    from stellarbase.commands import status as verb

    begin("status", output, debug)
    return verb.status(HostPaths(root))


@app.command("support-bundle")
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
    tier: TierOpt = None,
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """One tar.gz for support: config, checks, status, units, journal, audit; secrets redacted."""
    from stellarbase.commands import support as verb
    from stellarbase.support import Request

    begin("support-bundle", output, debug)
    request = Request(config, tuple(set_ or ()), tier, journal_lines, output_file)
    return verb.support_bundle(HostPaths(root), request)


@app.command()
def uninstall(
    purge: Annotated[bool, typer.Option("--purge", help="Also remove config and data.")] = False,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    yes: Yes = False,
    debug: Debug = False,
) -> Result:
    """Stop and remove every unit and file the installer owns (config and data stay)."""
    from stellarbase.commands import uninstall as verb

    begin("uninstall", output, debug)
    if not yes:
        what = "everything, config and data included" if purge else "units and binaries"
        if not sys.stdin.isatty():
            raise StellarError(
                f"uninstall would remove {what}; refusing without confirmation",
                hint="add --yes to run it non-interactively",
                code=ExitCode.USAGE,
            )
        typer.confirm(f"Remove {what}?", abort=True)
    return verb.uninstall(HostPaths(root), purge=purge)


@app.command()
def upgrade(
    bundle: Annotated[
        Path, typer.Option("--bundle", help="Release bundle (.tar.gz) of the new release.")
    ],
    tier: TierOpt = None,
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    skip: Skip = None,
    allow_downgrade: AllowDowngrade = False,
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """Verify, back up, migrate, swap and restart one unit at a time; roll back if unhealthy."""
    from stellarbase import installed_config
    from stellarbase.commands import upgrade as verb

    begin("upgrade", output, debug)
    paths = HostPaths(root)
    loaded = installed_config.load_site(paths, config, set_, tier)
    return verb.upgrade(loaded, paths, bundle, skip or [], allow_downgrade=allow_downgrade)


@app.command()
def rollback(
    to: Annotated[str | None, typer.Option("--to", help="Installed release to return to.")] = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """Return to the release before the last upgrade (or --to), restart, health gate."""
    from stellarbase.commands import rollback as verb

    begin("rollback", output, debug)
    return verb.rollback(HostPaths(root), to)


@app.command(hidden=True)
def activate(root: Root = Path("/"), output: Output = Format.TEXT, debug: Debug = False) -> Result:
    """Make this installed release current: units, rolling restart, health gate (rollback)."""
    from stellarbase.commands import install as verb

    begin("activate", output, debug)
    return verb.activate(HostPaths(root))


@config_app.command("show")
def config_show(
    tier: TierOpt = None,
    config: ConfigFile = None,
    set_: Sets = None,
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """The merged configuration (secrets left out) and where each key came from."""
    from stellarbase.commands import config as verb

    begin("config show", output, debug)
    return verb.show(_load(config, set_, tier))


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


def _postgres(
    root: Path, config: Path | None, sets: list[str] | None, tier: str | None
) -> tuple[str, str | None]:
    from stellarbase import installed_config

    paths = HostPaths(root)
    return installed_config.postgres_target(
        installed_config.load_site(paths, config, sets, tier), paths
    )


@migrate_app.command("up")
def migrate_up(
    to: ToVersion = None,
    tier: TierOpt = None,
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """Apply the pending migrations (config: --config, else the installed one)."""
    from stellarbase import audit
    from stellarbase.commands import migrate as verb

    begin("migrate up", output, debug)
    conninfo, password = _postgres(root, config, set_, tier)
    cid = audit.current_correlation_id()
    return verb.migrate_up_command(conninfo, password, to=to, correlation_id=cid)


@migrate_app.command("status")
def migrate_status(
    tier: TierOpt = None,
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """Every migration: applied (and when), pending, or changed since it was applied."""
    from stellarbase import audit
    from stellarbase.commands import migrate as verb

    begin("migrate status", output, debug)
    conninfo, password = _postgres(root, config, set_, tier)
    cid = audit.current_correlation_id()
    return verb.migrate_status_command(conninfo, password, correlation_id=cid)


@app.command("audit")
def audit_show(
    since: Since = None,
    limit: Limit = 1000,
    tier: TierOpt = None,
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> Result:
    """The audit log: who ran what on which host, and whether it worked."""
    from stellarbase import audit
    from stellarbase.commands import audit as verb

    begin("audit", output, debug)
    start = audit.parse_since(since) if since is not None else None
    conninfo, password = _postgres(root, config, set_, tier)
    return verb.audit_command(conninfo, password, since=start, limit=limit)
