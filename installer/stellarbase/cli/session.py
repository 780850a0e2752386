"""What the entry point needs to know of the command being run, to print its result."""

from __future__ import annotations

from dataclasses import dataclass, fields

from stellarbase.result import Format


@dataclass
class Session:
    """Set by the command as it starts; read by `stellarbase.cli.main` when it prints.
    `service`: a long-running `run` process, whose unexpected errors keep their traceback."""

    command: str = ""
    output: Format = Format.TEXT
    debug: bool = False
    show_diff: bool = False
    quiet: bool = False
    service: bool = False

    def clear(self) -> None:
        """Back to the defaults, for the next command run in this process (tests)."""
        for f in fields(self):
            setattr(self, f.name, f.default)


SESSION = Session()


def begin(
    command: str, output: Format, debug: bool, *, show_diff: bool = False, quiet: bool = False
) -> None:
    """Logging as asked, a correlation id for the command, and how to print its result."""
    from stellarbase import log as logsetup

    SESSION.command, SESSION.output, SESSION.debug = command, output, debug
    SESSION.show_diff, SESSION.quiet = show_diff, quiet
    logsetup.setup("debug" if debug else "warning")
    logsetup.bind_correlation_id()
