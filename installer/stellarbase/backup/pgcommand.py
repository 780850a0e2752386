"""Paths placed into archive_command and restore_command, which `sh` runs after PostgreSQL
has substituted its placeholders.

PostgreSQL 16 and newer accept only `%f`, `%p`, `%r` and `%%` in these settings and refuse
any other `%x` when they are used ("String contains unexpected placeholder"); 15 and
older pass an unknown `%x` through. So every `%` that is not a placeholder is written
`%%`, on every version, and a path goes in shell-quoted and then escaped.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from stellarbase.errors import ExitCode, StellarError

ARCHIVE_PLACEHOLDERS = "fp"
RESTORE_PLACEHOLDERS = "fpr"
# A GUC string cannot hold a line break, and a control character in a path is a mistake.
_UNPLACEABLE = re.compile(r"[\x00-\x1f\x7f]")


def escape_percent(text: str) -> str:
    """`text` as a literal inside a PostgreSQL *_command: each `%` doubled."""
    return text.replace("%", "%%")


def command_path(path: Path, what: str) -> str:
    """`path` as one `sh` word of a *_command; refuses a path no setting can carry."""
    text = str(path)
    problem = None
    if not path.is_absolute():
        problem = "is not absolute"
    elif _UNPLACEABLE.search(text):
        problem = "contains a line break or another control character"
    else:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            problem = "is not valid UTF-8"
    if problem is not None:
        raise StellarError(
            f"{what} {text!r} {problem}: it cannot be placed in a PostgreSQL command",
            hint="choose an absolute path of printable characters",
            code=ExitCode.CONFIG,
        )
    return escape_percent(shlex.quote(text))


def unexpected_placeholders(command: str, allowed: str) -> list[str]:
    """The `%x` of `command` that PostgreSQL 16+ would refuse (`allowed`: e.g. "fp")."""
    found: list[str] = []
    i = 0
    while i < len(command):
        if command[i] != "%":
            i += 1
            continue
        nxt = command[i + 1 : i + 2]
        if nxt == "" or (nxt != "%" and nxt not in allowed):
            found.append("%" + nxt)
        i += 2
    return found
