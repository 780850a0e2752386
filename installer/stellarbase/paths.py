"""Every host path the installer touches, hung off one root so tests can aim it elsewhere."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The group that may read the site config and the services' settings (no secrets in them).
GROUP = "stellarbase"
# One system user per service and per local server: a process that is taken over reads
# only what its own unit was given, never another's credentials or the database files.
POSTGRES_USER = "stellarbase-pg"
REDIS_USER = "stellarbase-redis"
SERVICE_USERS = {
    "api": "stellarbase-api",
    "worker": "stellarbase-worker",
    "agent": "stellarbase-agent",
    "inference": "stellarbase-inference",
}
AGENT_USER = SERVICE_USERS["agent"]
# The one user every unit ran as before each got its own: releases before that still
# expect it, and install re-owns what it owned (the data directories, the WAL spool).
LEGACY_USER = "stellarbase"


@dataclass(frozen=True)
class HostPaths:
    root: Path = Path("/")

    @property
    def live(self) -> bool:
        """True when the root is the running system, so systemd can be driven."""
        return self.root == Path("/")

    def at(self, absolute: str | Path) -> Path:
        """Map an absolute host path (as seen by the running system) under the root."""
        return self.root / Path(absolute).relative_to("/")

    def host_view(self, path: Path) -> str:
        """The inverse of `at`: how the running system will see `path`."""
        return "/" + str(path.relative_to(self.root)) if path != self.root else "/"

    @property
    def etc(self) -> Path:
        return self.at("/etc/stellarbase")

    @property
    def config_file(self) -> Path:
        return self.etc / "stellarbase.yaml"

    @property
    def secrets_file(self) -> Path:
        """Every credential of the site, root only: what install reads back on a re-run."""
        return self.etc / "secrets.env"

    @property
    def credentials_dir(self) -> Path:
        """Root only: one env file per service with its own secrets, and no other's."""
        return self.etc / "credentials"

    def credentials_file(self, service: str) -> Path:
        """What systemd (as root) loads into that service's environment (EnvironmentFile=)."""
        return self.credentials_dir / f"{service}.env"

    @property
    def service_settings_dir(self) -> Path:
        return self.etc / "services"

    @property
    def inference_env_dir(self) -> Path:
        return self.etc / "inference"

    @property
    def unit_dir(self) -> Path:
        return self.at("/etc/systemd/system")

    @property
    def sysusers_file(self) -> Path:
        return self.at("/etc/sysusers.d/stellarbase.conf")

    @property
    def opt(self) -> Path:
        return self.at("/opt/stellarbase")

    @property
    def releases(self) -> Path:
        return self.opt / "releases"

    @property
    def current(self) -> Path:
        return self.opt / "current"

    def release_binary(self, version: str) -> Path:
        return self.releases / version / "stellarbase"

    @property
    def state_dir(self) -> Path:
        return self.at("/var/lib/stellarbase")

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def admin_secrets_file(self) -> Path:
        """The local PostgreSQL superuser's password: root only, never given to services."""
        return self.etc / "postgres-admin.env"

    @property
    def postgres_data(self) -> Path:
        return self.state_dir / "postgres"

    @property
    def backup_status_file(self) -> Path:
        """The last base backup and the failure count: `backup now` writes, the agent reads."""
        return self.state_dir / "backup-status.json"

    @property
    def wal_spool(self) -> Path:
        """Markers of WAL files the agent has made durable; archive_command reads them."""
        return self.state_dir / "wal-spool"

    @property
    def redis_data(self) -> Path:
        return self.state_dir / "redis"

    @property
    def redis_conf(self) -> Path:
        return self.etc / "redis.conf"

    @property
    def redis_auth(self) -> Path:
        return self.etc / "redis-auth.conf"

    @property
    def passwd(self) -> Path:
        return self.at("/etc/passwd")

    @property
    def group(self) -> Path:
        return self.at("/etc/group")
