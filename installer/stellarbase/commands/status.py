"""`status`: units (state, PID, restarts), readiness, version and config source."""

from __future__ import annotations

import json
from typing import Any

from stellarbase import install_state, release_key, trust, verify
from stellarbase.agent.targets import AGENT_UNIT
from stellarbase.commands.guards import require_systemd
from stellarbase.host import for_paths
from stellarbase.paths import HostPaths
from stellarbase.result import Result


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
    lines: list[str] = []
    override_now = release_key.override_in_use()
    info["release_trust"] = {
        **trust.load_record(paths),
        "override_in_environment": override_now,
    }
    if not info["installed"]:
        lines.append("stellarbase is not installed on this host")
        lines += trust.status_lines(paths, override_now)
        return Result("status", info, tuple(lines))
    lines.append(f"version {current.version}, config from {current.config_source}")
    lines += trust.status_lines(paths, override_now)
    if current.features.get("vector") is False:
        lines.append(
            "semantic search: off (the local PostgreSQL has no pgvector; install the "
            "pgvector package for its version and re-run install)"
        )
    host = for_paths(paths)
    if not host.running_system:  # a --root install: no unit runs to show
        return Result("status", info, tuple(lines))
    require_systemd(paths)
    units = [*current.units]
    shown = host.show(units)
    agent = agent_readiness(current.ports.get(AGENT_UNIT))
    info["agent"] = agent
    if agent is not None:
        failing = [c["name"] for c in agent.get("checks", []) if c.get("status") != "pass"]
        lines.append(
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
        lines.append(
            f"  {unit:<32} {s.active_state}/{s.sub_state:<10} pid {s.main_pid:<7} "
            f"restarts {s.restarts:<3} {mark}"
        )
    return Result("status", info, tuple(lines))


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
