"""The command line: parse arguments and dispatch; no logic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from typer.exceptions import TyperException

from stellarbase import __version__
from stellarbase.backup.cli import backup_app
from stellarbase.errors import ExitCode, StellarError
from stellarbase.output import Format, emit, emit_error
from stellarbase.paths import HostPaths

# Each command imports what it needs (config, operations, drivers) itself: `--help` and
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


class _Session:
    output: Format = Format.TEXT
    debug: bool = False


_session = _Session()

Root = Annotated[
    Path, typer.Option("--root", help="Host root all paths hang off (a test dir; / is live).")
]
Output = Annotated[Format, typer.Option("--output", "-o", help="text for people, json for tools.")]
Debug = Annotated[bool, typer.Option("--debug", help="Debug logs and tracebacks.")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="Site config file (YAML).")]
Sets = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override one key: --set worker.instances=3 (not secrets: use the site file "
        "or STELLARBASE_SECTION__KEY).",
    ),
]
TierOpt = Annotated[str | None, typer.Option("--tier", help="pilot, department or enterprise.")]
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
Skip = Annotated[
    list[str] | None,
    typer.Option("--skip", help="Skip a preflight check or family by name (repeatable)."),
]
AllowDowngrade = Annotated[
    bool,
    typer.Option(
        "--allow-downgrade",
        help="Install a release older than the installed one (never a revoked one).",
    ),
]


def _begin(output: Format, debug: bool) -> None:
    from stellarbase import log as logsetup

    _session.output, _session.debug = output, debug
    logsetup.setup("debug" if debug else "warning")
    logsetup.bind_correlation_id()


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
    yes: Yes = False,
    debug: Debug = False,
) -> None:
    """Converge this host to healthy StellarBase services (a re-run changes nothing)."""
    _begin(output, debug)
    if bundle is not None and binary is not None:
        raise StellarError(
            "--bundle and --binary both name the binary to install",
            hint="give one of them",
            code=ExitCode.USAGE,
        )
    loaded = _load(config, set_, tier)
    paths = HostPaths(root)
    _validate(loaded, paths)
    from stellarbase import operations

    if bundle is not None:
        result = operations.install_bundle(
            loaded, paths, bundle, skip or [], retire_local=retire_local,
            allow_downgrade=allow_downgrade,
        )  # fmt: skip
    else:
        result = operations.install(
            loaded, paths, binary, skip or [], retire_local=retire_local,
            allow_downgrade=allow_downgrade,
        )  # fmt: skip
    emit(result, output)


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
) -> None:
    """Show what install would change, with a diff for every file."""
    _begin(output, debug)
    loaded = _load(config, set_, tier)
    _validate(loaded, HostPaths(root))
    from stellarbase import operations

    result = operations.dry_run(loaded, HostPaths(root), binary, retire_local=retire_local)
    emit(result, output, show_diff=True)


@app.command()
def preflight(
    tier: TierOpt = None,
    config: ConfigFile = None,
    set_: Sets = None,
    skip: Skip = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> None:
    """Check host, GPUs and dependencies before install: exit 0 pass, 10 warnings, 11 fail."""
    from stellarbase import operations

    _begin(output, debug)
    loaded = _load(config, set_, tier)
    result, found = operations.preflight(loaded, HostPaths(root), skip or [])
    emit(result, output)
    raise typer.Exit(int(found.exit_code()))


@app.command()
def doctor(
    skip: Skip = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> None:
    """The preflight checks against the installed system, plus every unit's state."""
    from stellarbase import operations
    from stellarbase.installed_config import load_installed

    _begin(output, debug)
    paths = HostPaths(root)
    result, found = operations.doctor(load_installed(paths, [], None), paths, skip or [])
    emit(result, output)
    raise typer.Exit(int(found.exit_code()))


@app.command()
def status(root: Root = Path("/"), output: Output = Format.TEXT, debug: Debug = False) -> None:
    """Units (state, PID, restarts), readiness, version and config source."""
    from stellarbase import operations

    _begin(output, debug)
    emit(operations.status(HostPaths(root)), output)


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
) -> None:
    """One tar.gz for support: config, checks, status, units, journal, audit; secrets redacted."""
    from stellarbase import support

    _begin(output, debug)
    request = support.Request(config, tuple(set_ or ()), tier, journal_lines, output_file)
    emit(support.support_bundle(HostPaths(root), request), output)


@app.command()
def uninstall(
    purge: Annotated[bool, typer.Option("--purge", help="Also remove config and data.")] = False,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    yes: Yes = False,
    debug: Debug = False,
) -> None:
    """Stop and remove every unit and file the installer owns (config and data stay)."""
    from stellarbase import operations

    _begin(output, debug)
    if not yes:
        what = "everything, config and data included" if purge else "units and binaries"
        if not sys.stdin.isatty():
            raise StellarError(
                f"uninstall would remove {what}; refusing without confirmation",
                hint="add --yes to run it non-interactively",
                code=ExitCode.USAGE,
            )
        typer.confirm(f"Remove {what}?", abort=True)
    emit(operations.uninstall(HostPaths(root), purge=purge), output)


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
) -> None:
    """Verify, back up, migrate, swap and restart one unit at a time; roll back if unhealthy."""
    from stellarbase import installed_config, upgrade

    _begin(output, debug)
    paths = HostPaths(root)
    loaded = installed_config.load_site(paths, config, set_, tier)
    result = upgrade.upgrade(loaded, paths, bundle, skip or [], allow_downgrade=allow_downgrade)
    emit(result, output)


@app.command()
def rollback(
    to: Annotated[str | None, typer.Option("--to", help="Installed release to return to.")] = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> None:
    """Return to the release before the last upgrade (or --to), restart, health gate."""
    from stellarbase import upgrade

    _begin(output, debug)
    emit(upgrade.rollback(HostPaths(root), to), output)


@app.command(hidden=True)
def activate(root: Root = Path("/"), output: Output = Format.TEXT, debug: Debug = False) -> None:
    """Make this installed release current: units, rolling restart, health gate (rollback)."""
    from stellarbase import installed_config, operations

    _begin(output, debug)
    paths = HostPaths(root)
    loaded = installed_config.load_installed(paths, None, None)
    result = operations.install(
        loaded, paths, None, preflight=False, rolling=True, action="activate"
    )
    emit(result, output)


@config_app.command("show")
def config_show(
    tier: TierOpt = None,
    config: ConfigFile = None,
    set_: Sets = None,
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> None:
    """The merged configuration (secrets left out) and where each key came from."""
    import yaml

    from stellarbase import config as cfg

    _begin(output, debug)
    loaded = _load(config, set_, tier)
    data = cfg.public_dict(loaded.config)
    if output == Format.JSON:
        print(json.dumps({"config": data, "sources": loaded.sources}, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")


@config_app.command("schema")
def config_schema() -> None:
    """JSON Schema of the site config file, for editors and CI linting."""
    from stellarbase import config as cfg

    print(json.dumps(cfg.json_schema(), indent=2))


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
    # `python -m stellarbase run …` and the binary take a shorter way (service.main); this
    # one serves `stellarbase.cli.app` used as a library.
    from stellarbase.service import run_service as serve

    _session.debug = debug
    path = settings or HostPaths().service_settings_dir / f"{service}.json"
    serve(service, path, instance)


@app.command("supervise-request", hidden=True)
def supervise_request() -> None:
    """Answer one restart request of the agent on stdin/stdout (stellarbase-supervise@)."""
    from stellarbase import log as logsetup
    from stellarbase.agent.helper import serve_connection

    logsetup.setup("info", sys.stderr)
    if not serve_connection():
        raise typer.Exit(1)


@app.command()
def version(output: Output = Format.TEXT) -> None:
    """Print the version (-o json: with the schema range its migrations span)."""
    if output == Format.TEXT:
        print(__version__)
        return
    from stellarbase import migrate

    schema = migrate.schema_range(migrate.load_migrations()).as_dict()
    # service_users: each service runs as its own user (a rollback to a release without
    # it first hands the data back to `stellarbase`).
    print(json.dumps({"version": __version__, "schema": schema, "service_users": True}))


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
) -> None:
    """Apply the pending migrations (config: --config, else the installed one)."""
    from stellarbase import audit, dbcommands

    _begin(output, debug)
    conninfo, password = _postgres(root, config, set_, tier)
    cid = audit.current_correlation_id()
    emit(dbcommands.migrate_up_command(conninfo, password, to=to, correlation_id=cid), output)


@migrate_app.command("status")
def migrate_status(
    tier: TierOpt = None,
    config: ConfigFile = None,
    set_: Sets = None,
    root: Root = Path("/"),
    output: Output = Format.TEXT,
    debug: Debug = False,
) -> None:
    """Every migration: applied (and when), pending, or changed since it was applied."""
    from stellarbase import audit, dbcommands

    _begin(output, debug)
    conninfo, password = _postgres(root, config, set_, tier)
    cid = audit.current_correlation_id()
    emit(dbcommands.migrate_status_command(conninfo, password, correlation_id=cid), output)


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
) -> None:
    """The audit log: who ran what on which host, and whether it worked."""
    from stellarbase import audit, dbcommands

    _begin(output, debug)
    start = audit.parse_since(since) if since is not None else None
    conninfo, password = _postgres(root, config, set_, tier)
    emit(dbcommands.audit_command(conninfo, password, since=start, limit=limit), output)


def main() -> None:
    try:
        code = app(standalone_mode=False)  # a typer.Exit comes back as its code here
        if isinstance(code, int) and code:
            sys.exit(code)
    except StellarError as exc:
        if _session.debug:
            raise
        emit_error(exc.message, exc.hint, exc.details, _session.output)
        sys.exit(int(exc.code))
    except typer.Abort:
        sys.exit(int(ExitCode.INTERRUPTED))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # bad command line: typer's own usage errors
        show = getattr(exc, "show", None)
        if show:
            show()
        sys.exit(int(ExitCode.USAGE))
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception as exc:
        if _session.debug:
            raise
        emit_error(
            f"unexpected error: {exc.__class__.__name__}: {exc}",
            "run again with --debug for the traceback, and report it",
            [],
            _session.output,
        )
        sys.exit(int(ExitCode.FAILURE))


if __name__ == "__main__":
    main()
