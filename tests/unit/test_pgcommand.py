"""The commands PostgreSQL runs for archiving and restore hold no `%x` that 16+ refuse."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stellarbase.backup.archiver import archive_command
from stellarbase.backup.pgcommand import (
    ARCHIVE_PLACEHOLDERS,
    RESTORE_PLACEHOLDERS,
    command_path,
    unexpected_placeholders,
)
from stellarbase.backup.prefetch import restore_command
from stellarbase.errors import StellarError

AWKWARD = Path("/srv/pg restore/100%x/it's")


def substitute(command: str, **values: str) -> str:
    """What PostgreSQL hands to `sh`: each placeholder replaced, `%%` made `%`."""
    out, i = [], 0
    while i < len(command):
        if command[i] == "%":
            nxt = command[i + 1]
            out.append("%" if nxt == "%" else values[nxt])
            i += 2
        else:
            out.append(command[i])
            i += 1
    return "".join(out)


def test_unexpected_placeholders_reads_as_postgresql_does() -> None:
    assert unexpected_placeholders("cp %p /a/%f; echo 100%%", "fp") == []
    assert unexpected_placeholders("stat -c '%i %s' %p", "fp") == ["%i", "%s"]
    assert unexpected_placeholders("cp %r", "fp") == ["%r"]
    assert unexpected_placeholders("trailing %", "fp") == ["%"]


@pytest.mark.parametrize("spool", [Path("/var/lib/stellarbase/wal-spool"), AWKWARD])
def test_archive_command_holds_only_placeholders_postgresql_16_accepts(spool: Path) -> None:
    command = archive_command(spool)
    assert unexpected_placeholders(command, ARCHIVE_PLACEHOLDERS) == []
    assert "stat -c '%i %s %Y'" in substitute(command, f="F", p="P")


@pytest.mark.parametrize("spool", [Path("/var/lib/stellarbase/restore"), AWKWARD])
def test_restore_command_holds_only_placeholders_postgresql_16_accepts(spool: Path) -> None:
    assert unexpected_placeholders(restore_command(spool), RESTORE_PLACEHOLDERS) == []


@pytest.mark.host_commands
def test_an_escaped_path_reaches_sh_as_it_is() -> None:
    word = substitute(command_path(AWKWARD, "path"))
    echoed = subprocess.run(["sh", "-c", f"printf %s {word}"], capture_output=True, text=True)
    assert echoed.stdout == str(AWKWARD)


@pytest.mark.parametrize(
    ("path", "why"),
    [
        (Path("relative/spool"), "is not absolute"),
        (Path("/srv/a\nb"), "control character"),
        (Path("/srv/\x7f"), "control character"),
        (Path("/srv/" + b"\xff".decode("utf-8", "surrogateescape")), "not valid UTF-8"),
    ],
)
def test_a_path_no_command_can_carry_is_refused(path: Path, why: str) -> None:
    with pytest.raises(StellarError, match="cannot be placed in a PostgreSQL command") as info:
        command_path(path, "restore spool path")
    assert why in info.value.message
    with pytest.raises(StellarError):
        restore_command(path)
