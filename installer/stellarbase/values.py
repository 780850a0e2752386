"""Checks of single values against what will read them: systemd (unit files, specifiers,
sizes), the servers (URLs) and the file system (paths). Pure; the config model uses them.
"""

from __future__ import annotations

import enum
import re
import shlex
import unicodedata
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator

# MemoryMax= below this: a service could not even load its Python runtime.
MIN_MEMORY_BYTES = 64 << 20
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# Where an installed file:// backup repository must not be: the installer's own directories
# (purge removes them) and the system's (virtual file systems, private or cleaned temp dirs).
OWN_DIRS = ("/var/lib/stellarbase", "/etc/stellarbase", "/opt/stellarbase")
SYSTEM_DIRS = (
    "/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/boot", "/etc", "/usr", "/bin",
    "/sbin", "/lib", "/lib32", "/lib64",
)  # fmt: skip
# systemd specifiers an inference command may use: the unit's instance and names.
COMMAND_SPECIFIERS = "%iInNpP"


def control_character(value: str) -> str | None:
    """The first control character in value, as U+XXXX, or None."""
    for char in value:
        if unicodedata.category(char) == "Cc":
            return f"U+{ord(char):04X}"
    return None


def printable(value: str) -> str:
    found = control_character(value)
    if found:
        raise ValueError(
            f"contains a control character ({found}): every value lands in a unit file or "
            "a server setting, on one line"
        )
    return value


# Every string that reaches a unit file, a server setting or a URL: one printable line.
Text = Annotated[str, AfterValidator(printable)]


def size_bytes(text: str) -> int | None:
    """Bytes of a systemd size like 512M (base 1024); None for infinity or a percentage."""
    match = re.fullmatch(r"(\d+)([KMGTP]?)", text)
    return int(match.group(1)) * SIZE_UNITS[match.group(2)] if match else None


def check_memory_max(value: str) -> str:
    size = size_bytes(value)
    if size is not None and size < MIN_MEMORY_BYTES:
        raise ValueError(
            "is below 64M, too little for a service to start (sizes are bytes unless "
            "they end in K, M, G, T)"
        )
    if value.endswith("%") and not 1 <= int(value[:-1]) <= 100:
        raise ValueError("a share of the host's memory is 1% to 100%")
    return value


def check_cpu_quota(value: str) -> str:
    if int(value[:-1]) < 1:
        raise ValueError("must be at least 1%: systemd ignores a quota of 0%")
    return value


def check_postgres_url(url: str) -> str:
    check_url(url, ("postgresql", "postgres"), "postgresql://USER@HOST:5432/DB")
    if not re.fullmatch(r"/[^/]+", urlsplit(url).path):
        raise ValueError(f"{url!r} names no database: postgresql://USER@HOST:5432/DB")
    return url


def check_redis_url(url: str) -> str:
    check_url(url, ("redis", "rediss"), "redis://HOST:6379/0")
    if not re.fullmatch(r"(/\d*)?", urlsplit(url).path):
        raise ValueError(f"{url!r}: the database is a number, as in redis://HOST:6379/0")
    return url


def check_url(url: str, schemes: tuple[str, ...], example: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"{url!r} is not a {schemes[0]}:// URL like {example}")
    if parts.password:
        raise ValueError("the URL carries a password: put it in the password key instead")
    try:
        parts.port  # noqa: B018 -- property raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"{url!r} has a bad port") from exc


def check_command(command: str) -> str:
    """inference.command as systemd's ExecStart= takes it."""
    try:
        words = shlex.split(command)
    except ValueError:
        raise ValueError("has an unclosed quote") from None
    if not words or not words[0].startswith("/"):
        raise ValueError("must start with the absolute path of the executable")
    specifiers = re.findall(r"%(.?)", command)
    if any(not s or s not in COMMAND_SPECIFIERS for s in specifiers):
        raise ValueError(
            "has a % that systemd would expand: write %% for a literal %, "
            "or use %i (the GPU) as a specifier"
        )
    return command


class RepositoryKind(enum.StrEnum):
    NONE = "none"
    S3 = "s3"  # the s3 section's bucket, under backup.prefix
    FILE = "file"  # a directory of the host (pilot only), under backup.prefix


@dataclass(frozen=True)
class RepositoryLocation:
    """backup.repository, parsed once where the config is validated."""

    kind: RepositoryKind
    directory: str | None = None  # file://: the absolute path, without a trailing slash

    @property
    def enabled(self) -> bool:
        return self.kind != RepositoryKind.NONE

    def __str__(self) -> str:
        return f"file://{self.directory}" if self.directory is not None else self.kind.value

    @classmethod
    def parse(cls, repo: str) -> RepositoryLocation:
        """none, s3 or file:///PATH; a ValueError says what is wrong with anything else."""
        if repo in ("none", "s3"):
            return cls(RepositoryKind(repo))
        if not repo.startswith("file:///"):
            raise ValueError("is not none, s3 or file:///ABSOLUTE/PATH")
        path = repo.removeprefix("file://")
        path = path.rstrip("/") if path != "/" else path
        parts = path.split("/")[1:]
        if len(parts) < 2 or not all(parts):
            raise ValueError(
                f"{path!r}: use a directory of its own, at least two levels deep "
                "(install makes it the stellarbase-agent user's), "
                "e.g. file:///srv/stellarbase-backups"
            )
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"{path!r}: write the path without . or .. components")
        bad = re.search(r"[^A-Za-z0-9._@+-]", "".join(parts))
        if bad:
            raise ValueError(
                f"{path!r} has the character {bad.group()!r}: systemd reads this path in "
                "ReadWritePaths=; use letters, digits and . _ - + @"
            )
        return cls(RepositoryKind.FILE, path)


def check_repository(repo: str) -> str:
    """backup.repository; a file:// path comes back without a trailing slash."""
    return str(RepositoryLocation.parse(repo))


def repository_location_problem(path: str) -> str | None:
    """Why a file:// repository must not be at `path` on an installed host, or None.

    Not a rule of the value itself: tools and tests use repositories in temp dirs, which
    the installed services could not (they run with a private /tmp).
    """
    for top in (*OWN_DIRS, *SYSTEM_DIRS):
        if path == top or path.startswith(top + "/"):
            return (
                f"{path!r} is inside {top}: keep backups out of the installer's and the "
                "system's directories (uninstall --purge removes /var/lib/stellarbase; "
                "the services see a private /tmp)"
            )
    return None


def check_schedule(schedule: str) -> str:
    """What can be told without systemd's parser (validate.py asks it)."""
    if not schedule.strip() or schedule.lstrip().startswith("-"):
        raise ValueError("is not an OnCalendar= expression such as daily or 'Sun 03:00'")
    return schedule
