"""`install` (from this binary or a release bundle) and the hidden `activate`: converge the
host through facts → plan → apply → verify, with preflight guarding any change."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from stellarbase import __version__, audit, facts, plan, release_key, trust, validate
from stellarbase.apply import Executor
from stellarbase.commands.doctor import preflight_context
from stellarbase.commands.guards import record_audit, require_root, require_systemd
from stellarbase.configload import LoadedConfig
from stellarbase.errors import StellarError
from stellarbase.host import for_paths
from stellarbase.paths import HostPaths
from stellarbase.preflight import report
from stellarbase.releases import hand_over, remember_release, verified_release
from stellarbase.result import Result, Status
from stellarbase.steps import EnsureDatabase, Migrate, Plan, WaitHealthy

log = structlog.get_logger()

SCHEMA_STEPS = (EnsureDatabase, Migrate, WaitHealthy)


def make_plan(
    loaded: LoadedConfig, paths: HostPaths, binary: Path | None, *, retire_local: bool = False
) -> Plan:
    """Every check of the config and the host first, then the plan: a refusal changes nothing."""
    validate.check_install(loaded, paths)
    require_systemd(paths)
    the_facts = facts.gather(paths, binary, loaded.config)
    return plan.make_plan(loaded.config, paths, the_facts, retire_local=retire_local)


def install(
    loaded: LoadedConfig,
    paths: HostPaths,
    binary: Path | None,
    skip: list[str] | None = None,
    *,
    preflight: bool = True,
    rolling: bool = False,
    action: str = "install",
    audit_details: dict[str, Any] | None = None,
    retire_local: bool = False,
    allow_downgrade: bool = False,
) -> Result:
    """Converge the host. `preflight=False` and `rolling=True` serve upgrade and rollback,
    which checked what they need before, and restart one unit at a time. `retire_local`:
    a dependency that goes external stops its local server and keeps its data. A plain
    install of an older release than the installed one needs `allow_downgrade`."""
    skip = skip or []
    if retire_local:
        audit_details = {**(audit_details or {}), "retire_local": True}
    require_root(paths)
    if action == "install":
        trust.check_release_allowed(paths, __version__, allow_downgrade=allow_downgrade)
    the_plan = make_plan(loaded, paths, binary, retire_local=retire_local)
    source = str(loaded.site_file.resolve()) if loaded.site_file else "tier defaults"
    if loaded.site_file and loaded.site_file.resolve() == paths.config_file.resolve():
        source = ""  # the installed config again (upgrade, rollback): keep where it came from
    host = for_paths(paths)
    executor = Executor(
        paths,
        host=host,
        config_source=f"{source} (tier {loaded.config.tier})" if source else "",
        database_url=the_plan.database[0] if the_plan.database else "",
        rolling=rolling,
        unit_timeout=loaded.config.health.timeout_seconds,
    )
    try:
        if host.running_system and preflight:  # a --root install prepares files only
            # Preflight guards changes; a converged host has none to make, and its health
            # gate still proves every dependency through the services' /readyz.
            # Schema steps need the servers up and are not what preflight guards.
            host_steps = [s for s in the_plan.steps if not isinstance(s, SCHEMA_STEPS)]
            pending = Executor(paths, dry_run=True, host=host).apply(
                replace(the_plan, steps=tuple(host_steps))
            )
            if any(step.status == Status.CHANGED for step in pending):
                found = report.run(preflight_context(loaded.config, paths), skip)
                if found.skipped:
                    log.warning("preflight checks skipped", skipped=found.skipped)
                report.refuse_on_failure(found)
        steps = tuple(executor.apply(the_plan))
    except StellarError as exc:
        if host.running_system:
            details = {**(audit_details or {}), "error": exc.message, "skipped_checks": skip}
            record_audit(the_plan.database, action, "failure", details)
        raise
    changed = [s.step for s in steps if s.status == Status.CHANGED]
    if host.running_system:
        details = {**(audit_details or {}), "changed": changed, "skipped_checks": skip,
                   "version": __version__}  # fmt: skip
        record_audit(the_plan.database, action, "success", details)
    messages = [f"{len(changed)} changed, {len(steps) - len(changed)} unchanged"]
    if host.running_system:
        messages.append("endpoints (each serves /healthz, /readyz, /metrics):")
        messages += [f"  {unit:<32} {url}" for unit, url in the_plan.endpoints]
    return Result(action, {"endpoints": dict(the_plan.endpoints)}, tuple(messages), steps=steps)


def install_bundle(
    loaded: LoadedConfig,
    paths: HostPaths,
    source: Path,
    skip: list[str] | None = None,
    *,
    retire_local: bool = False,
    allow_downgrade: bool = False,
) -> Result:
    """Install the binary of a release bundle, once its signature and checksums hold.

    A bundle of another release is installed by its own binary (units and files are
    rendered by the binary that installs): this one hands over once the bundle is verified
    and allowed here (not revoked, not a downgrade unless allowed)."""
    require_root(paths)
    with verified_release(paths, source, allow_downgrade=allow_downgrade) as verified:
        release = verified.release
        if release.version != __version__:
            return hand_over("install", verified.binary, release.version)
        details = audit.release_key_details(verified.key_override)
        result = install(
            loaded, paths, verified.binary, skip, retire_local=retire_local,
            allow_downgrade=allow_downgrade, audit_details=details,
        )  # fmt: skip
        remember_release(paths, verified, "install")
    before = [f"bundle {source}: release {release.version}, signature and checksums OK"]
    if verified.key_override is not None:
        before.append(
            f"verified with the keys of {release_key.OVERRIDE_ENV}="
            f"{verified.key_override['file']}, not the built-in release keys"
        )
    return replace(result, messages=(*before, *result.messages))


def activate(paths: HostPaths) -> Result:
    """Make this installed release current: units, rolling restart, health gate. Run by
    another release's binary (upgrade hand-over, rollback), which reads its -o json."""
    from stellarbase.installed_config import load_installed

    loaded = load_installed(paths, None, None)
    return install(loaded, paths, None, preflight=False, rolling=True, action="activate")
