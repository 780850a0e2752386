"""The hardening the rendered units carry: what a compromised service may bind, reach and
share, and a root backup unit without root's privileges (scored on a real systemd in
tests/integration/test_unit_hardening_systemd.py)."""

from __future__ import annotations

from pathlib import Path

from stellarbase import layout, render
from stellarbase.configload import load_config
from stellarbase.localdeps import ServerBinary
from stellarbase.paths import HostPaths

LOCAL = layout.LocalServers(
    ServerBinary(Path("/usr/lib/postgresql/17/bin"), (17, 2)),
    ServerBinary(Path("/usr/bin/redis-server"), (7, 2)),
)
S3_ENV = {"STELLARBASE_S3__ACCESS_KEY": "a", "STELLARBASE_S3__SECRET_KEY": "b"}


def _units(*sets: str, env: dict[str, str] | None = None) -> dict[str, list[str]]:
    config = load_config(tier="pilot", sets=list(sets), env=env or {}).config
    units = render.render_units(config, HostPaths(), LOCAL)
    return {name: text.splitlines() for name, text in units.items()}


def test_services_bind_only_their_own_ports() -> None:
    units = _units(
        "api.port=9100", "agent.port=9101", "worker.port=9200", "agent.remote_port=9443",
        env={"STELLARBASE_AGENT__METRICS_TOKEN": "t"},
    )  # fmt: skip
    assert {"SocketBindAllow=tcp:9100", "SocketBindDeny=any"} <= set(
        units["stellarbase-api.service"]
    )
    agent = units["stellarbase-agent.service"]
    assert {"SocketBindAllow=tcp:9101", "SocketBindAllow=tcp:9443", "SocketBindDeny=any"} <= set(
        agent
    )
    assert "SocketBindAllow=tcp:9200-9263" in units["stellarbase-worker@.service"]
    for unit in ("stellarbase-api.service", "stellarbase-agent.service"):
        assert any(line.startswith("RestrictFileSystems=~") for line in units[unit])


def test_adding_a_worker_leaves_the_running_workers_unit_unchanged() -> None:
    one = _units("worker.port=9200", "worker.instances=1")["stellarbase-worker@.service"]
    two = _units("worker.port=9200", "worker.instances=2")["stellarbase-worker@.service"]
    assert one == two


def test_local_servers_keep_to_loopback_their_port_and_their_ipc() -> None:
    units = _units("local.postgres.port=8432", "local.redis.port=8379")
    for unit, port in (("stellarbase-postgres.service", 8432), ("stellarbase-redis.service", 8379)):
        lines = set(units[unit])
        assert {
            "IPAddressAllow=localhost",
            "IPAddressDeny=any",
            f"SocketBindAllow=tcp:{port}",
            "PrivateIPC=yes",
        } <= lines, unit
        assert lines & {"SocketBindDeny=any", "SocketBindDeny=tcp"}, unit


def test_the_backup_unit_is_root_without_roots_privileges() -> None:
    s3 = _units(
        "backup.repository=s3", "s3.bucket=backups", "s3.endpoint=http://127.0.0.1:9000",
        env=S3_ENV,
    )["stellarbase-backup.service"]  # fmt: skip
    for line in (
        "CapabilityBoundingSet=",
        "PrivateDevices=yes",
        "RestrictNamespaces=yes",
        "RestrictSUIDSGID=yes",
        "MemoryDenyWriteExecute=yes",
        "SystemCallFilter=@system-service",
    ):
        assert line in s3, line
    local = _units("backup.repository=file:///srv/backups")["stellarbase-backup.service"]
    assert "CapabilityBoundingSet=CAP_DAC_OVERRIDE CAP_FOWNER" in local
    assert "IPAddressDeny=any" in local  # a file repository needs no network but loopback
