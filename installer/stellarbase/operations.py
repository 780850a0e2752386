"""install, plan, status and uninstall: glue between config, facts, plan, apply and output."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import structlog

from stellarbase import (
    __version__,
    audit,
    facts,
    gpu,
    install_state,
    layout,
    plan,
    release_key,
    systemd,
    trust,
    validate,
    verify,
)
from stellarbase.agent.targets import AGENT_UNIT
from stellarbase.apply import Executor, remove_path
from stellarbase.config import Config
from stellarbase.configload import LoadedConfig
from stellarbase.errors import ExitCode, StellarError
from stellarbase.host import for_paths
from stellarbase.output import Result, Status
from stellarbase.paths import HostPaths
from stellarbase.preflight import Check, Context, Finding, failed, noted, passed, report
from stellarbase.steps import EnsureDatabase, Migrate, Plan, WaitHealthy

log = structlog.get_logger()

SCHEMA_STEPS = (EnsureDatabase, Migrate, WaitHealthy)


def require_root(paths: HostPaths) -> None:
    if paths.live and os.geteuid() != 0:
        raise StellarError(
            "this command changes the host and must run as root",
            hint="run it with sudo, or aim it at a test root with --root DIR",
            code=ExitCode.HOST,
        )


def require_systemd(paths: HostPaths) -> None:
    """A live host must run systemd as its service manager: every step after talks to it."""
    from stellarbase.preflight.host import NOT_BOOTED_HINT, init_problem

    problem = init_problem() if paths.live else None
    if problem:
        raise StellarError(f"this host is {problem}", hint=NOT_BOOTED_HINT, code=ExitCode.HOST)


def preflight_context(config: Config, paths: HostPaths) -> Context:
    """Checks of this config; ports this installation already listens on count as free."""
    current = install_state.load(paths.state_file)
    own = set(current.ports.values())
    for unit, port in (
        (layout.POSTGRES_UNIT, config.local.postgres.port),
        (layout.REDIS_UNIT, config.local.redis.port),
    ):
        if unit in current.units:
            own.add(port)
    inventory = functools.cache(gpu.default_source().inventory)
    return Context(config, paths, gpus=inventory, own_ports=frozenset(own))


def preflight(
    loaded: LoadedConfig, paths: HostPaths, skip: list[str]
) -> tuple[Result, report.Report]:
    validate.check_install(loaded, paths)
    found = report.run(preflight_context(loaded.config, paths), skip)
    return _report_result("preflight", found), found


def doctor(loaded: LoadedConfig, paths: HostPaths, skip: list[str]) -> tuple[Result, report.Report]:
    """The preflight checks against the live system: local servers included, plus units."""
    the_facts = facts.dependency_facts(paths, loaded.config)
    config = plan.with_local_servers(loaded.config, the_facts)
    units = Check("units", lambda: _unit_findings(paths), timeout=5.0)
    found = report.run(preflight_context(config, paths), skip, extra=[units])
    return _report_result("doctor", found), found


def _unit_findings(paths: HostPaths) -> list[Finding]:
    current = install_state.load(paths.state_file)
    if not current.units:
        return [noted("units", "stellarbase is not installed", "run `stellarbase install`")]
    out = []
    for unit, s in systemd.show(list(current.units)).items():
        if s.active:
            out.append(passed(f"units.{unit}", f"{s.active_state}/{s.sub_state}", "active"))
        else:
            out.append(
                failed(
                    f"units.{unit}",
                    f"{s.active_state}/{s.sub_state}",
                    "active",
                    f"journalctl -u {unit} -n 50; then stellarbase install to converge",
                )
            )
    return out


def _report_result(operation: str, found: report.Report) -> Result:
    result = Result(operation, info=found.as_dict())
    result.lines = report.table_lines(found)
    return result


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
        steps = executor.apply(the_plan)
    except StellarError as exc:
        if paths.live:
            details = {**(audit_details or {}), "error": exc.message, "skipped_checks": skip}
            record_audit(the_plan.database, action, "failure", details)
        raise
    changed = [s.step for s in steps if s.status == Status.CHANGED]
    if paths.live:
        details = {**(audit_details or {}), "changed": changed, "skipped_checks": skip,
                   "version": __version__}  # fmt: skip
        record_audit(the_plan.database, action, "success", details)
    result = Result(action, steps, info={"endpoints": dict(the_plan.endpoints)})
    result.lines.append(f"{result.changed} changed, {len(steps) - result.changed} unchanged")
    if paths.live:
        result.lines.append("endpoints (each serves /healthz, /readyz, /metrics):")
        result.lines += [f"  {unit:<32} {url}" for unit, url in the_plan.endpoints]
    return result


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
    from stellarbase.bundle import verify_bundle
    from stellarbase.upgrade import hand_over

    require_root(paths)
    with verify_bundle(source) as verified:
        release = verified.release
        trust.check_release_allowed(
            paths, release.version, allow_downgrade=allow_downgrade,
            revoked_by_bundle=release.revoked,
        )  # fmt: skip
        if release.version != __version__:
            hand_over(verified.binary, release.version)
        details = audit.release_key_details(verified.key_override)
        result = install(
            loaded, paths, verified.binary, skip, retire_local=retire_local,
            allow_downgrade=allow_downgrade, audit_details=details,
        )  # fmt: skip
        trust.remember(
            paths, revoked=release.revoked, key_override=verified.key_override,
            action="install", version=release.version,
        )  # fmt: skip
    result.lines.insert(
        0, f"bundle {source}: release {release.version}, signature and checksums OK"
    )
    if verified.key_override is not None:
        result.lines.insert(
            1, f"verified with the keys of {release_key.OVERRIDE_ENV}="
            f"{verified.key_override['file']}, not the built-in release keys",
        )  # fmt: skip
    return result


def record_audit(
    database: tuple[str, str | None] | None,
    action: str,
    outcome: Literal["success", "failure"],
    details: dict[str, Any],
) -> None:
    """One audit row per operation; a database that cannot take it is logged, not fatal."""
    if database is not None:
        audit.try_record(
            *database,
            action=action,
            outcome=outcome,
            details=details,
            correlation_id=audit.current_correlation_id(),
        )


def dry_run(
    loaded: LoadedConfig, paths: HostPaths, binary: Path | None, *, retire_local: bool = False
) -> Result:
    the_plan = make_plan(loaded, paths, binary, retire_local=retire_local)
    steps = Executor(paths, dry_run=True).apply(the_plan)
    result = Result("plan", steps)
    result.lines.append(f"{result.changed} to change, {len(steps) - result.changed} unchanged")
    return result


def status(paths: HostPaths) -> Result:
    current = install_state.load(paths.state_file)
    info: dict[str, Any] = {
        "installed": bool(current.units or current.files),
        "version": current.version or None,
        "config_source": current.config_source or None,
        "config_file": str(paths.host_view(paths.config_file)),
        "features": current.features,
        "units": [],
    }
    result = Result("status", info=info)
    override_now = release_key.override_in_use()
    info["release_trust"] = {
        **trust.load_record(paths),
        "override_in_environment": override_now,
    }
    if not info["installed"]:
        result.lines.append("stellarbase is not installed on this host")
        result.lines += trust.status_lines(paths, override_now)
        return result
    result.lines.append(f"version {current.version}, config from {current.config_source}")
    result.lines += trust.status_lines(paths, override_now)
    if current.features.get("vector") is False:
        result.lines.append(
            "semantic search: off (the local PostgreSQL has no pgvector; install the "
            "pgvector package for its version and re-run install)"
        )
    if not paths.live:
        return result
    require_systemd(paths)
    units = [*current.units]
    shown = systemd.show(units)
    agent = agent_readiness(current.ports.get(AGENT_UNIT))
    info["agent"] = agent
    if agent is not None:
        failing = [c["name"] for c in agent.get("checks", []) if c.get("status") != "pass"]
        result.lines.append(
            f"host {agent.get('status', 'unknown')} (from the agent)"
            + (": failing " + ", ".join(failing) if failing else "")
        )
    for unit in units:
        s = shown[unit]
        port = current.ports.get(unit)
        ready = None
        if unit == AGENT_UNIT and agent is not None:
            ready = agent.get("status") == "ready"
        elif port:
            ready = _agent_says_ready(agent, unit) if agent is not None else None
            if not ready:  # the agent's view is up to one interval old: ask the service
                code, _ = verify.probe(f"http://127.0.0.1:{port}/readyz")
                ready = code == 200
        info["units"].append(
            {
                "unit": unit,
                "active": s.active_state,
                "sub": s.sub_state,
                "pid": s.main_pid,
                "restarts": s.restarts,
                "ready": ready,
                "port": port,
            }
        )
        mark = "" if ready is None else ("ready" if ready else "NOT READY")
        result.lines.append(
            f"  {unit:<32} {s.active_state}/{s.sub_state:<10} pid {s.main_pid:<7} "
            f"restarts {s.restarts:<3} {mark}"
        )
    return result


def agent_readiness(port: int | None) -> dict[str, Any] | None:
    """The agent's /readyz report, or None when it does not answer with one (then each
    service is probed directly). One request instead of one per service: the agent has
    the answers cached."""
    if not port:
        return None
    code, body = verify.probe(f"http://127.0.0.1:{port}/readyz", timeout=2.0)
    if code not in (200, 503):
        return None
    try:
        report = json.loads(body)
    except ValueError:
        return None
    return report if isinstance(report, dict) and "checks" in report else None


def _agent_says_ready(agent: dict[str, Any], unit: str) -> bool | None:
    for check in agent.get("checks", []):
        if check.get("name") == f"readyz:{unit}":
            return bool(check.get("status") == "pass")
    return None


def uninstall(paths: HostPaths, *, purge: bool) -> Result:
    require_root(paths)
    require_systemd(paths)
    current = install_state.load(paths.state_file)
    result = Result("uninstall")
    if paths.live:
        known = systemd.show([layout.TARGET, *(u for u in current.units if u != layout.TARGET)])
        loaded = [u for u, s in known.items() if s.load_state == "loaded"]
        if current.database_url:  # written while a local PostgreSQL still runs
            password = facts.generated_secrets(paths).get(layout.POSTGRES_PASSWORD)
            details = {"purge": purge, "units": loaded}
            record_audit((current.database_url, password), "uninstall", "success", details)
        systemd.stop(loaded)
        systemd.reset_failed(loaded)
    keep = () if purge else (paths.etc, paths.state_dir)

    def kept(view: str) -> bool:
        path = paths.at(view)
        return any(path == k or k in path.parents for k in keep)

    removed: list[str] = []
    doomed = [view for view in current.files if not kept(view)]
    for view in sorted(doomed, key=lambda p: len(Path(p).parts), reverse=True):
        path = paths.at(view)
        if path.exists() or path.is_symlink():
            remove_path(path)
            removed.append(view)
    for path in [paths.state_dir, paths.etc] if purge else []:
        if path.exists():
            remove_path(path)
            removed.append(paths.host_view(path))
    if paths.live:
        systemd.daemon_reload()
    if not purge and paths.state_dir.is_dir():
        still_ours = [view for view in current.files if kept(view)]
        install_state.save(
            paths.state_file, install_state.State(version=current.version, files=still_ours)
        )
    result.info = {"removed": removed, "purged": purge}
    result.lines.append(f"removed {len(removed)} paths")
    if not purge:
        result.lines.append(
            f"kept {paths.host_view(paths.etc)} and {paths.host_view(paths.state_dir)}; "
            "--purge removes them too"
        )
    log.info("uninstalled", removed=len(removed), purge=purge)
    return result
