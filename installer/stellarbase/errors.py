"""The one user-facing error type and the documented exit codes."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of every `stellarbase` command (documented in README.md)."""

    OK = 0
    FAILURE = 1  # unexpected internal error (run again with --debug for the traceback)
    USAGE = 2  # bad command line (unknown option, missing argument)
    CONFIG = 3  # invalid configuration: file, key or value
    HOST = 4  # the host cannot take the install: not root, port in use, missing binary
    DEPENDENCY = 5  # PostgreSQL, Redis or S3 unreachable, refusing or misconfigured
    APPLY = 6  # a step of the plan failed while changing the host
    UNHEALTHY = 7  # services did not become healthy before the deadline
    MIGRATION = 8  # a schema migration was refused or failed (a failed one leaves nothing behind)
    BACKUP = 9  # a backup, archive or restore was refused or failed (damage, gap, busy dir)
    CHECKS_WARNED = 10  # preflight/doctor: warnings, no failure
    CHECKS_FAILED = 11  # preflight/doctor: at least one check failed
    BUNDLE = 12  # a release bundle was refused: damaged, unsigned, wrongly signed or unsafe
    UPGRADE = 13  # an upgrade or rollback was refused, or failed and was rolled back
    INTERRUPTED = 130


class StellarError(Exception):
    """An error the user can act on: one line of message, one line of hint."""

    def __init__(self, message: str, *, hint: str = "", code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code
        self.details: list[str] = []

    def with_details(self, lines: list[str]) -> StellarError:
        """Attach extra lines (a journal tail, say) shown after the message."""
        self.details = lines
        return self


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line for a message: its text with the white space folded,
    or its class name when it has none. Callers add what they know better (a server's
    SQLSTATE, an OS error's strerror) before falling back to this."""
    return " ".join(str(exc).split())[:limit] or exc.__class__.__name__
