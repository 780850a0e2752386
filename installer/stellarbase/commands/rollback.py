"""`rollback`: return to the release before the last upgrade (or --to), run by that
release's own `activate`; a failed move returns to where it started."""

from __future__ import annotations

from typing import Any

from stellarbase import install_state, migrate, trust
from stellarbase.commands.guards import record_audit, require_root
from stellarbase.errors import ExitCode, StellarError
from stellarbase.installed_config import load_installed, postgres_target
from stellarbase.paths import HostPaths
from stellarbase.releases import (
    activate_release,
    check_move,
    current_release,
    installed_releases,
    release_schema,
)
from stellarbase.result import Result


def rollback(paths: HostPaths, to: str | None) -> Result:
    """Return to the release before the last upgrade (or `to`), and prove it healthy."""
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
    if target == now.version and current_release(paths) == target:
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
        back = roll_back_to(paths, now.version, database, details, exc, action="rollback")
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
    lines = (
        f"rolled back {now.version} → {target}; services are healthy",
        f"`stellarbase rollback` returns to {now.version}",
    )
    return Result("rollback", details, lines)


def roll_back_to(
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
