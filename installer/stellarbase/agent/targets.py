"""The units the agent watches, in a file install writes beside the agent's settings.

A file of its own, read again every round, so that adding a worker or moving a port does
not restart the agent: its settings file is an input of its unit, this file is not.
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog
from pydantic import ValidationError

from stellarbase.config import Model, Port
from stellarbase.paths import HostPaths

log = structlog.get_logger()

AGENT_UNIT = "stellarbase-agent.service"


class Target(Model):
    unit: str
    port: Port | None = None
    probe: bool = False  # serves /healthz and /readyz: probed, and restarted when unhealthy


class Targets(Model):
    units: tuple[Target, ...] = ()

    def probed(self) -> list[Target]:
        """The services the agent probes and supervises (never itself)."""
        return [t for t in self.units if t.probe and t.port and t.unit != AGENT_UNIT]


def targets_file(paths: HostPaths) -> Path:
    return paths.service_settings_dir / "agent-units.json"


def render_targets(targets: Targets) -> str:
    return json.dumps(targets.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


class TargetsReader:
    """Reads the file again only when it changed; a bad file keeps the last good one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._targets = Targets()

    def read(self) -> Targets:
        try:
            st = self.path.stat()
        except OSError as exc:
            if self._stamp is not None:
                log.warning("agent units file unreadable", path=str(self.path), error=str(exc))
                self._stamp = None
            return self._targets
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._targets = Targets.model_validate(json.loads(self.path.read_text()))
            except (OSError, ValueError, ValidationError) as exc:
                log.warning("agent units file invalid", path=str(self.path), error=str(exc))
            self._stamp = stamp
        return self._targets
