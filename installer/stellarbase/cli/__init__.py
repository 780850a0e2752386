"""Entry point of the binary and of `python -m stellarbase`: the one place that turns a
command's result or error into output and an exit status.

`stellarbase run <service> …` is what every unit starts and then runs for weeks: it is
parsed here with argparse, so the long-running processes never import the typer/click/rich
command line (several MB each). Every other command goes to `stellarbase.cli.app`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

from stellarbase.cli.session import SESSION
from stellarbase.errors import ExitCode, StellarError
from stellarbase.result import Result, render, render_error


def main() -> NoReturn:
    argv = sys.argv[1:]
    SESSION.clear()
    try:
        if len(argv) > 1 and argv[0] == "run" and argv[1] not in ("-h", "--help"):
            result = run_service(argv[1:])
        else:
            from stellarbase.cli.app import invoke

            result = invoke(argv)
    except StellarError as exc:
        if SESSION.debug:
            raise
        render_error(SESSION.command, int(exc.code), exc.message, exc.hint, exc.details,
                     SESSION.output)  # fmt: skip
        sys.exit(int(exc.code))
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception as exc:
        if SESSION.debug or SESSION.service:
            raise
        render_error(
            SESSION.command,
            int(ExitCode.FAILURE),
            f"unexpected error: {exc.__class__.__name__}: {exc}",
            "run again with --debug for the traceback, and report it",
            [],
            SESSION.output,
        )
        sys.exit(int(ExitCode.FAILURE))
    render(result, SESSION.output, show_diff=SESSION.show_diff, quiet=SESSION.quiet)
    sys.exit(result.exit_code)


def run_service(argv: list[str]) -> Result:
    """`stellarbase run SERVICE [--settings F] [--instance N] [--debug]`, without typer."""
    import argparse

    # A service logs JSON lines to journald; structlog imports rich and pygments for
    # pretty console tracebacks when they are installed (~6 MB per process, for output
    # a service never writes): hide them before anything imports structlog.
    for name in ("rich", "pygments"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    parser = argparse.ArgumentParser(
        prog="stellarbase run",
        description="Run one StellarBase service in the foreground (what the units start).",
    )
    parser.add_argument("service", choices=["api", "worker", "agent", "inference"])
    parser.add_argument("--settings", type=Path, help="settings file")
    parser.add_argument("--instance", type=int, help="worker instance (1…)")
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
    args = parser.parse_args(argv)
    if args.instance is not None and args.instance < 1:
        parser.error("--instance must be 1 or more")
    SESSION.command, SESSION.debug, SESSION.service = "run", args.debug, True
    from stellarbase.paths import HostPaths
    from stellarbase.service import run_service as serve

    path = args.settings or HostPaths().service_settings_dir / f"{args.service}.json"
    serve(args.service, path, args.instance)
    return Result("run", written=True)
