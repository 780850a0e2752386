"""Entry point of `python -m stellarbase` and of the one-file binary.

`stellarbase run <service> …` is what every unit starts and then runs for weeks: it takes a
short way that parses its few options itself, so the long-running processes do not carry
the typer/click/rich command line. Everything else goes to `stellarbase.cli`.
"""

import sys


def _entry() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "run" and sys.argv[2] not in ("-h", "--help"):
        # A service logs JSON lines to journald; structlog imports rich and pygments for
        # pretty console tracebacks when they are installed (~6 MB per process, for output
        # a service never writes): hide them before anything imports structlog.
        for name in ("rich", "pygments"):
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]
        from stellarbase import service

        service.main(sys.argv[2:])
    else:
        from stellarbase import cli

        cli.main()


_entry()
