"""Releases side by side: which are installed, what schema each runs against, and running
one's own binary (hand-over to a verified bundle's binary, activation of an installed one).

Releases sit in /opt/stellarbase/releases/<version>/ and `current` names the one the units
run. Each release renders its own units and carries its own migrations, so the move to a
release is always made by that release's binary. Used by the install, upgrade and rollback
commands.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from stellarbase import configload, trust
from stellarbase.errors import ExitCode, StellarError
from stellarbase.paths import HostPaths
from stellarbase.result import Result, payload
from stellarbase.trust import version_key

if TYPE_CHECKING:
    from stellarbase.bundle import VerifiedBundle

log = structlog.get_logger()


# A one-file binary started by another one must unpack itself afresh, not reuse the
# parent's unpacked files (PyInstaller 6.10+).
_CHILD_ENV = {"PYINSTALLER_RESET_ENVIRONMENT": "1"}
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)(.*)")
ACTIVATE_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class SchemaSupport:
    """The schema a release migrates to, and the floor it sets (see stellarbase.migrate)."""

    version: str
    floor: int
    newest: int


def check_move(
    installed: str, target: SchemaSupport, upgrade_from: str, db_newest: int, db_floor: int
) -> str:
    """'upgrade', 'downgrade' or 'same'; a StellarError when the move is not allowed."""
    if target.version == installed:
        return "same"
    if version_key(target.version) > version_key(installed):
        if version_key(installed) < version_key(upgrade_from):
            raise StellarError(
                f"release {target.version} upgrades from {upgrade_from} or newer; "
                f"this host runs {installed}",
                hint=f"upgrade to a release between {upgrade_from} and {target.version} first",
                code=ExitCode.UPGRADE,
            )
        return "upgrade"
    if db_floor > target.newest:
        raise StellarError(
            f"release {target.version} cannot run against this database: its schema is at "
            f"version {db_newest} and needs releases with schema {db_floor} or newer; "
            f"{target.version} ships up to {target.newest}",
            hint="migrations only go forward: stay on the newer release, or restore a backup "
            "taken before the upgrade (stellarbase backup restore --to-time ...)",
            code=ExitCode.UPGRADE,
        )
    return "downgrade"


def activate_release(paths: HostPaths, version: str) -> None:
    """Make an installed release current with its own binary; raise when it is not healthy."""
    binary = paths.release_binary(version)
    _hand_back_if_older(paths, version)
    argv = [str(binary), "activate", "--root", str(paths.root), "-o", "json"]
    proc = _run_release(argv, capture=True, timeout=ACTIVATE_TIMEOUT_S)
    if proc.returncode == 0:
        return
    try:  # with -o json a refused command prints its error, hint and details as JSON
        failed = payload(proc.stdout)
    except ValueError:
        failed = {}
    raise StellarError(
        f"release {version}: {failed.get('error') or f'exit code {proc.returncode}'}",
        hint=failed.get("hint") or "see `stellarbase status`",
        code=ExitCode.UPGRADE,
    ).with_details(failed.get("details") or proc.stderr.strip().splitlines()[-15:])


def _hand_back_if_older(paths: HostPaths, version: str) -> None:
    """A release from before each service had its own user runs them all as `stellarbase`:
    give that user back the data directories first (see `reown.hand_back`)."""
    proc = _run_release([str(paths.release_binary(version)), "version", "-o", "json"],
                        capture=True, timeout=60)  # fmt: skip
    try:
        if payload(proc.stdout).get("service_users"):
            return
    except (ValueError, AttributeError):
        return  # not a release that answers: its activate says what is wrong
    from stellarbase import reown
    from stellarbase.installed_config import load_installed

    repository = load_installed(paths, None, None).config.backup.repository
    for line in reown.hand_back(paths, repository):
        log.info("handed back to the single-user release", what=line)


def release_schema(paths: HostPaths, version: str) -> SchemaSupport:
    """What an installed release says of its schema (`stellarbase version -o json`)."""
    binary = paths.release_binary(version)
    proc = _run_release([str(binary), "version", "-o", "json"], capture=True, timeout=60)
    try:
        data = payload(proc.stdout)
        return SchemaSupport(str(data["version"]), int(data["schema"]["min"]),
                             int(data["schema"]["max"]))  # fmt: skip
    except (ValueError, KeyError, TypeError):
        raise StellarError(
            f"release {version} does not say which schema it runs against",
            hint="it predates rollback support; restore a backup to go back that far",
            code=ExitCode.UPGRADE,
        ) from None


def hand_over(command: str, binary: Path, version: str) -> Result:
    """Run the same command with the verified bundle's own binary, which prints its own
    output: the result carries its exit status. Its command line is this one's, which
    holds no secret: --set refuses them (stellarbase.configload.parse_sets), and this
    checks again before passing it on."""
    argv = sys.argv[1:]
    configload.parse_sets(_set_values(argv))
    log.info("handing over to the bundle's binary", version=version)
    binary.chmod(0o700)  # unpacked as plain data into a private directory
    proc = _run_release([str(binary), *argv], capture=False, timeout=None)
    return Result(command, exit_code=proc.returncode, written=True)


def _set_values(argv: list[str]) -> list[str]:
    """The values of every --set in a command line (--set K=V and --set=K=V)."""
    found = []
    for i, arg in enumerate(argv):
        if arg == "--set" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--set="):
            found.append(arg.removeprefix("--set="))
    return found


def installed_releases(paths: HostPaths) -> list[str]:
    try:
        found = [p.name for p in paths.releases.iterdir() if paths.release_binary(p.name).is_file()]
    except FileNotFoundError:
        return []
    return sorted(found, key=lambda v: version_key(v) if _VERSION.fullmatch(v) else (0,))


def current_release(paths: HostPaths) -> str:
    try:
        return Path(os.readlink(paths.current)).name
    except OSError:
        return ""


def _run_release(
    argv: list[str], *, capture: bool, timeout: float | None
) -> subprocess.CompletedProcess[str]:
    """Run another release's binary (not through `proc`: it inherits this environment, and
    a hand-over writes straight to this terminal). Failing to start or finish is an
    upgrade's failure."""
    env = {**os.environ, **_CHILD_ENV}
    try:
        return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=capture,
                              text=True, timeout=timeout, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        why = (f"did not finish in {timeout:.0f}s" if isinstance(exc, subprocess.TimeoutExpired)
               else f"cannot run: {exc.strerror or exc}")  # fmt: skip
        raise StellarError(
            f"{argv[0]} {argv[1]}: {why}",
            hint="the release directory may be damaged (install that release again from its "
            "bundle); see `stellarbase status` and the units' journals",
            code=ExitCode.UPGRADE,
        ) from None


@contextmanager
def verified_release(
    paths: HostPaths, source: Path, *, allow_downgrade: bool
) -> Iterator[VerifiedBundle]:
    """A bundle whose signature and checksums hold, of a release allowed on this host (not
    revoked, not older than the installed one unless `allow_downgrade`); unpacked while open."""
    from stellarbase.bundle import verify_bundle

    with verify_bundle(source) as verified:
        release = verified.release
        trust.check_release_allowed(
            paths, release.version, allow_downgrade=allow_downgrade,
            revoked_by_bundle=release.revoked,
        )  # fmt: skip
        yield verified


def remember_release(paths: HostPaths, verified: VerifiedBundle, action: str) -> None:
    """Keep what the bundle taught this host: releases it revokes, the release key used."""
    release = verified.release
    trust.remember(
        paths, revoked=release.revoked, key_override=verified.key_override,
        action=action, version=release.version,
    )  # fmt: skip
