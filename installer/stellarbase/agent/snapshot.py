"""One round of collection, frozen: what /readyz and /metrics answer from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stellarbase.agent.collectors import (
    DependencySample,
    GpuSample,
    HostSample,
    MigrationSample,
    ServiceProbe,
    UnitSample,
)
from stellarbase.agent.runner import Outcome
from stellarbase.agent.targets import AGENT_UNIT, Targets

# Collector names: the `collector` label of stellarbase_collector_success.
UNITS, SERVICES, DEPENDENCIES, HOST, GPUS, MIGRATIONS, BACKUP = (
    "units",
    "services",
    "dependencies",
    "host",
    "gpus",
    "migrations",
    "backup",
)


@dataclass(frozen=True)
class Snapshot:
    taken: float  # monotonic time the round ended
    targets: Targets
    outcomes: Mapping[str, Outcome]
    dependencies: tuple[str, ...] = ()  # the configured ones, checked or not
    own_unit: str = AGENT_UNIT
    extra: Mapping[str, Any] = field(default_factory=dict)

    def _value(self, name: str) -> Any:
        outcome = self.outcomes.get(name)
        return outcome.value if outcome is not None and outcome.ok else None

    def error(self, name: str) -> str:
        outcome = self.outcomes.get(name)
        return outcome.error if outcome is not None else "not collected yet"

    def units(self) -> dict[str, UnitSample] | None:
        value: dict[str, UnitSample] | None = self._value(UNITS)
        return value

    def services(self) -> dict[str, ServiceProbe] | None:
        value: dict[str, ServiceProbe] | None = self._value(SERVICES)
        return value

    def dependency_samples(self) -> list[DependencySample] | None:
        value: list[DependencySample] | None = self._value(DEPENDENCIES)
        return value

    def host(self) -> HostSample | None:
        value: HostSample | None = self._value(HOST)
        return value

    def gpus(self) -> GpuSample | None:
        value: GpuSample | None = self._value(GPUS)
        return value

    def migrations(self) -> MigrationSample | None:
        value: MigrationSample | None = self._value(MIGRATIONS)
        return value

    def backup(self) -> list[Any] | None:
        """prometheus_client metric families of the backups, read under a deadline."""
        value: list[Any] | None = self._value(BACKUP)
        return value
