"""Upgrade and roll back: move the host from one release to another, or back, safely.

Releases sit side by side in /opt/stellarbase/releases/<version>/ and `current` names the
one the units run. Each release renders its own units and carries its own migrations, so
the move to a release is always made by that release's binary: `upgrade --bundle` hands
over to the bundle's binary once the bundle is verified, and rollback runs the earlier
release's `activate`.

An upgrade goes: verify → version and schema checks → preflight → a fresh base backup
(when backups are on) → migrations → copy, swap `current`, restart the workers one at a
time, then the API, then the agent, each ready before the next → health gate. When anything
after the migrations fails, `current` goes back to the release before, its units restart
and its health gate runs again; the command exits non-zero and both moves are audited.
Migrations are additive unless one says otherwise (stellarbase.migrate), so the release
before runs against the new schema.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from stellarbase import (
    __version__,
    audit,
    configload,
    install_state,
    layout,
    migrate,
    systemd,
    trust,
)
from stellarbase.configload import LoadedConfig
from stellarbase.errors import ExitCode, StellarError
from stellarbase.installed_config import postgres_target
from stellarbase.operations import install, preflight_context, record_audit, require_root
from stellarbase.output import Result
from stellarbase.paths import HostPaths
from stellarbase.preflight import report
from stellarbase.trust import version_key

if TYPE_CHECKING:
    from stellarbase.bundle import VerifiedBundle

__all__ = ["rollback", "upgrade", "version_key"]

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


def upgrade(
    loaded: LoadedConfig,
    paths: HostPaths,
    bundle: Path,
    skip: list[str],
    *,
    allow_downgrade: bool = False,
) -> Result:
    from stellarbase.bundle import verify_bundle

    require_root(paths)
    before = install_state.load(paths.state_file)
    if not before.version:
        raise StellarError(
            "stellarbase is not installed on this host: nothing to upgrade",
            hint=f"install it first: stellarbase install --bundle {bundle}",
            code=ExitCode.USAGE,
        )
    with verify_bundle(bundle) as verified:
        release = verified.release
        trust.check_release_allowed(
            paths, release.version, allow_downgrade=allow_downgrade,
            revoked_by_bundle=release.revoked,
        )  # fmt: skip
        if release.version != __version__:
            hand_over(verified.binary, release.version)
        target = SchemaSupport(release.version, release.schema_min, release.schema_max)
        database = postgres_target(loaded, paths)
        db_newest, db_floor = migrate.applied_schema(*database)
        move = check_move(before.version, target, release.upgrade_from, db_newest, db_floor)
        details: dict[str, Any] = {
            "from": before.version,
            "to": release.version,
            **audit.release_key_details(verified.key_override),
        }
        result = Result("upgrade", info=dict(details))
        if move == "same" and _current_release(paths) == release.version:
            # Converge only: after a crash mid-upgrade this restarts what still runs the
            # release before; on a finished upgrade it changes nothing.
            done = install(
                loaded, paths, verified.binary, skip, preflight=False, rolling=True,
                action="upgrade", audit_details=details,
            )  # fmt: skip
            result.steps = done.steps
            result.lines.append(
                f"release {release.version} is current already; {done.changed} changed"
            )
            _remember(paths, verified)
            return result

        found = report.run(preflight_context(loaded.config, paths), skip)
        report.refuse_on_failure(found)
        backup = _fresh_backup(before)
        if backup:
            result.lines.append(backup)
        try:
            applied = migrate.migrate_up(*database)
        except StellarError as exc:
            record_audit(database, "upgrade", "failure", {**details, "error": exc.message})
            raise
        details["migrations"] = [m.filename for m in applied]
        earlier = before.previous_version
        before.previous_version = before.version
        install_state.save(paths.state_file, before)
        try:
            done = install(
                loaded, paths, verified.binary, skip, preflight=False, rolling=True,
                action="upgrade", audit_details=details,
            )  # fmt: skip
        except StellarError as exc:
            log.warning("upgrade failed; rolling back", error=exc.message)
            # install() audited the failure; the rollback and the activation audit themselves
            back = _roll_back_to(paths, before.version, database, details, exc, record=False)
            after = install_state.load(paths.state_file)
            after.previous_version = earlier
            install_state.save(paths.state_file, after)
            raise StellarError(
                f"upgrade to {release.version} failed and was rolled back to "
                f"{before.version}, which is healthy again: {exc.message}",
                hint=exc.hint or "see `stellarbase status` and the failing unit's journal",
                code=ExitCode.UPGRADE,
            ).with_details([*exc.details, *back]) from None
        _remember(paths, verified)
    result.steps = done.steps
    result.lines += [
        f"upgraded {before.version} → {release.version}"
        + (f"; migrations applied: {', '.join(details['migrations'])}" if applied else ""),
        f"{done.changed} changed; `stellarbase rollback` returns to {before.version}",
    ]
    return result


def rollback(paths: HostPaths, to: str | None) -> Result:
    """Return to the release before the last upgrade (or `to`), and prove it healthy."""
    from stellarbase.installed_config import load_installed

    require_root(paths)
    now = install_state.load(paths.state_file)
    target = to or now.previous_version
    if not now.version:
        raise StellarError(
            "stellarbase is not installed on this host",
            hint="nothing to roll back",
            code=ExitCode.USAGE,
        )
    available = installed_releases(paths)
    if not target:
        raise StellarError(
            "no earlier release is recorded on this host",
            hint="name one with --to VERSION; installed: " + (", ".join(available) or "none"),
            code=ExitCode.UPGRADE,
        )
    if target not in available:
        raise StellarError(
            f"release {target} is not installed under {paths.releases}",
            hint="installed: "
            + (", ".join(available) or "none")
            + "; install it with `stellarbase upgrade --bundle`",
            code=ExitCode.UPGRADE,
        )
    trust.check_rollback_allowed(paths, target)
    if target == now.version and _current_release(paths) == target:
        raise StellarError(
            f"release {target} is current already",
            hint="name another with --to VERSION",
            code=ExitCode.UPGRADE,
        )
    database = postgres_target(load_installed(paths, None, None), paths)
    support = release_schema(paths, target)
    db_newest, db_floor = migrate.applied_schema(*database)
    check_move(now.version, support, "0.0.0", db_newest, db_floor)
    details = {"from": now.version, "to": target}
    try:
        activate_release(paths, target)
    except StellarError as exc:
        back = _roll_back_to(paths, now.version, database, details, exc, action="rollback")
        raise StellarError(
            f"rollback to {target} failed; {now.version} is current and healthy again: "
            f"{exc.message}",
            hint=exc.hint,
            code=ExitCode.UPGRADE,
        ).with_details([*exc.details, *back]) from None
    after = install_state.load(paths.state_file)
    after.previous_version = now.version
    install_state.save(paths.state_file, after)
    record_audit(database, "rollback", "success", details)
    result = Result("rollback", info=details)
    result.lines.append(f"rolled back {now.version} → {target}; services are healthy")
    result.lines.append(f"`stellarbase rollback` returns to {now.version}")
    return result


def _roll_back_to(
    paths: HostPaths,
    version: str,
    database: tuple[str, str | None],
    details: dict[str, Any],
    cause: StellarError,
    action: str = "upgrade",
    record: bool = True,
) -> list[str]:
    """Make `version` current again after a failed move; audit both. Lines for the error."""
    failed = {**details, "error": cause.message, "rolled_back_to": version}
    if record:
        record_audit(database, action, "failure", failed)
    try:
        activate_release(paths, version)
    except StellarError as again:
        record_audit(database, "rollback", "failure", {**failed, "error": again.message})
        raise StellarError(
            f"{action} failed ({cause.message}) and returning to {version} failed too: "
            f"{again.message}",
            hint=f"see `stellarbase status`; `stellarbase rollback --to {version}` tries again",
            code=ExitCode.UPGRADE,
        ).with_details([*cause.details, *again.details]) from None
    record_audit(database, "rollback", "success", {"to": version, "after": action})
    return [f"--- rolled back: release {version} is current and healthy"]


def activate_release(paths: HostPaths, version: str) -> None:
    """Make an installed release current with its own binary; raise when it is not healthy."""
    binary = paths.release_binary(version)
    _hand_back_if_older(paths, version)
    argv = [str(binary), "activate", "--root", str(paths.root), "-o", "json"]
    proc = _run_release(argv, capture=True, timeout=ACTIVATE_TIMEOUT_S)
    if proc.returncode == 0:
        return
    try:  # with -o json a refused command prints its error, hint and details as JSON
        failed = json.loads(proc.stdout)
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
        if json.loads(proc.stdout).get("service_users"):
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
        data = json.loads(proc.stdout)
        return SchemaSupport(str(data["version"]), int(data["schema"]["min"]),
                             int(data["schema"]["max"]))  # fmt: skip
    except (ValueError, KeyError, TypeError):
        raise StellarError(
            f"release {version} does not say which schema it runs against",
            hint="it predates rollback support; restore a backup to go back that far",
            code=ExitCode.UPGRADE,
        ) from None


def hand_over(binary: Path, version: str) -> None:
    """Run the same command with the verified bundle's own binary, and exit with its exit
    code. Its command line is this one's, which holds no secret: --set refuses them
    (stellarbase.configload.parse_sets), and this checks again before passing it on."""
    argv = sys.argv[1:]
    configload.parse_sets(_set_values(argv))
    log.info("handing over to the bundle's binary", version=version)
    binary.chmod(0o700)  # unpacked as plain data into a private directory
    proc = _run_release([str(binary), *argv], capture=False, timeout=None)
    raise SystemExit(proc.returncode)


def _set_values(argv: list[str]) -> list[str]:
    """The values of every --set in a command line (--set K=V and --set=K=V)."""
    found = []
    for i, arg in enumerate(argv):
        if arg == "--set" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--set="):
            found.append(arg.removeprefix("--set="))
    return found


def _remember(paths: HostPaths, verified: VerifiedBundle) -> None:
    release = verified.release
    trust.remember(
        paths, revoked=release.revoked, key_override=verified.key_override,
        action="upgrade", version=release.version,
    )  # fmt: skip


def installed_releases(paths: HostPaths) -> list[str]:
    try:
        found = [p.name for p in paths.releases.iterdir() if paths.release_binary(p.name).is_file()]
    except FileNotFoundError:
        return []
    return sorted(found, key=lambda v: version_key(v) if _VERSION.fullmatch(v) else (0,))


def _current_release(paths: HostPaths) -> str:
    try:
        return Path(os.readlink(paths.current)).name
    except OSError:
        return ""


def _fresh_backup(installed: install_state.State) -> str:
    """A base backup before the schema changes, when backups are on; '' when they are off."""
    if layout.BACKUP_TIMER not in installed.units:
        return ""
    try:
        systemd.start(layout.BACKUP_UNIT, wait=True)
    except StellarError as exc:
        raise StellarError(
            f"the base backup before the upgrade failed: {exc.message}",
            hint=f"nothing was changed; see `journalctl -u {layout.BACKUP_UNIT}` and "
            "`stellarbase backup list`",
            code=ExitCode.BACKUP,
        ) from None
    return "fresh base backup taken before migrating"


def _run_release(
    argv: list[str], *, capture: bool, timeout: float | None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            env={**os.environ, **_CHILD_ENV},
            stdin=subprocess.DEVNULL,
            capture_output=capture,
            text=True,
            timeout=timeout,
            check=False,
        )
    except OSError as exc:
        raise StellarError(
            f"cannot run {argv[0]}: {exc.strerror or exc}",
            hint="the release directory is damaged; install that release again from its bundle",
            code=ExitCode.UPGRADE,
        ) from None
    except subprocess.TimeoutExpired:
        raise StellarError(
            f"{argv[0]} {argv[1]} did not finish in {timeout:.0f}s",
            hint="see `stellarbase status` and the units' journals",
            code=ExitCode.UPGRADE,
        ) from None
