"""`preflight` (can this host take this config?) and `doctor` (is the installed one well?)."""

from __future__ import annotations

import functools

from stellarbase import facts, gpu, install_state, layout, plan, systemd, validate
from stellarbase.config import Config
from stellarbase.configload import LoadedConfig
from stellarbase.paths import HostPaths
from stellarbase.preflight import Check, Context, Finding, failed, noted, passed, report
from stellarbase.result import Result


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


def preflight(loaded: LoadedConfig, paths: HostPaths, skip: list[str]) -> Result:
    """Exit status 0 when every check passed, 10 on warnings, 11 on a failure."""
    validate.check_install(loaded, paths)
    found = report.run(preflight_context(loaded.config, paths), skip)
    return _report_result("preflight", found)


def doctor(loaded: LoadedConfig, paths: HostPaths, skip: list[str]) -> Result:
    """The preflight checks against the live system: local servers included, plus units."""
    the_facts = facts.dependency_facts(paths, loaded.config)
    config = plan.with_local_servers(loaded.config, the_facts)
    units = Check("units", lambda: _unit_findings(paths), timeout=5.0)
    found = report.run(preflight_context(config, paths), skip, extra=[units])
    return _report_result("doctor", found)


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


def _report_result(command: str, found: report.Report) -> Result:
    return Result(
        command,
        data=found.as_dict(),
        messages=tuple(report.table_lines(found)),
        exit_code=int(found.exit_code()),
    )
