"""What runs where: the names of the units, the local servers and each unit instance.

The planner, the executor and the commands name units through this module only; how a
unit's file reads is render's business.
"""

from __future__ import annotations

from dataclasses import dataclass

from stellarbase.localdeps import ServerBinary

TARGET = "stellarbase.target"
INFERENCE_TEMPLATE = "stellarbase-inference@.service"
DEFAULT_INFERENCE_COMMAND = "/opt/stellarbase/current/stellarbase run inference"
POSTGRES_UNIT = "stellarbase-postgres.service"
REDIS_UNIT = "stellarbase-redis.service"
BACKUP_UNIT = "stellarbase-backup.service"
BACKUP_TIMER = "stellarbase-backup.timer"
SUPERVISE_SOCKET = "stellarbase-supervise.socket"
SUPERVISE_TEMPLATE = "stellarbase-supervise@.service"


@dataclass(frozen=True)
class LocalServers:
    """The host's server binaries for the dependencies that run locally (None: external)."""

    postgres: ServerBinary | None = None
    redis: ServerBinary | None = None

    def units(self) -> list[str]:
        return [u for u, b in ((POSTGRES_UNIT, self.postgres), (REDIS_UNIT, self.redis)) if b]


@dataclass(frozen=True)
class UnitInstance:
    """A unit the installer runs: `template` is the file on disk (worker@.service)."""

    name: str
    template: str
    service: str
    port: int
