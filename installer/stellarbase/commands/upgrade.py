"""`upgrade --bundle`: move the host to a newer (or, allowed, older) release, safely.

An upgrade goes: verify → version and schema checks → preflight → a fresh base backup
(when backups are on) → migrations → copy, swap `current`, restart the workers one at a
time, then the API, then the agent, each ready before the next → health gate. When anything
after the migrations fails, `current` goes back to the release before, its units restart
and its health gate runs again; the command exits non-zero and both moves are audited.
Migrations are additive unless one says otherwise (stellarbase.migrate), so the release
before runs against the new schema. A bundle of another release than this binary's is
upgraded to by its own binary (see `stellarbase.releases`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from stellarbase import __version__, audit, install_state, layout, migrate, systemd
from stellarbase.commands.doctor import preflight_context
from stellarbase.commands.guards import record_audit, require_root
from stellarbase.commands.install import install
from stellarbase.commands.rollback import roll_back_to
from stellarbase.configload import LoadedConfig
from stellarbase.errors import ExitCode, StellarError
from stellarbase.installed_config import postgres_target
from stellarbase.paths import HostPaths
from stellarbase.preflight import report
from stellarbase.releases import (
    SchemaSupport,
    check_move,
    current_release,
    hand_over,
    remember_release,
    verified_release,
)
from stellarbase.result import Result

log = structlog.get_logger()


def upgrade(
    loaded: LoadedConfig,
    paths: HostPaths,
    bundle: Path,
    skip: list[str],
    *,
    allow_downgrade: bool = False,
) -> Result:
    require_root(paths)
    before = install_state.load(paths.state_file)
    if not before.version:
        raise StellarError(
            "stellarbase is not installed on this host: nothing to upgrade",
            hint=f"install it first: stellarbase install --bundle {bundle}",
            code=ExitCode.USAGE,
        )
    with verified_release(paths, bundle, allow_downgrade=allow_downgrade) as verified:
        release = verified.release
        if release.version != __version__:
            return hand_over("upgrade", verified.binary, release.version)
        target = SchemaSupport(release.version, release.schema_min, release.schema_max)
        database = postgres_target(loaded, paths)
        db_newest, db_floor = migrate.applied_schema(*database)
        move = check_move(before.version, target, release.upgrade_from, db_newest, db_floor)
        details: dict[str, Any] = {
            "from": before.version,
            "to": release.version,
            **audit.release_key_details(verified.key_override),
        }
        shown = dict(details)  # the result's fields: the audit row's, less the migrations
        if move == "same" and current_release(paths) == release.version:
            # Converge only: after a crash mid-upgrade this restarts what still runs the
            # release before; on a finished upgrade it changes nothing.
            done = install(
                loaded, paths, verified.binary, skip, preflight=False, rolling=True,
                action="upgrade", audit_details=details,
            )  # fmt: skip
            remember_release(paths, verified, "upgrade")
            same = f"release {release.version} is current already; {done.changed} changed"
            return Result("upgrade", shown, (same,), steps=done.steps)

        found = report.run(preflight_context(loaded.config, paths), skip)
        report.refuse_on_failure(found)
        backup = _fresh_backup(before)
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
            back = roll_back_to(paths, before.version, database, details, exc, record=False)
            after = install_state.load(paths.state_file)
            after.previous_version = earlier
            install_state.save(paths.state_file, after)
            raise StellarError(
                f"upgrade to {release.version} failed and was rolled back to "
                f"{before.version}, which is healthy again: {exc.message}",
                hint=exc.hint or "see `stellarbase status` and the failing unit's journal",
                code=ExitCode.UPGRADE,
            ).with_details([*exc.details, *back]) from None
        remember_release(paths, verified, "upgrade")
    lines = [
        *([backup] if backup else []),
        f"upgraded {before.version} → {release.version}"
        + (f"; migrations applied: {', '.join(details['migrations'])}" if applied else ""),
        f"{done.changed} changed; `stellarbase rollback` returns to {before.version}",
    ]
    return Result("upgrade", shown, tuple(lines), steps=done.steps)


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
