"""Backups on an installed pilot: archiving turned on by install, the agent archiving,
the timer, `backup now|list|verify|drill`, an in-place restore, all in a real systemd."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from stellarbase.envfile import read_env_file
from tests.fixtures_systemd import on_both_roots
from tests.integration.conftest import copy_binary, free_port_block, wait_for
from tests.systemd_sandbox import SystemdSandbox

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

REPO_DIR = "/var/lib/stellarbase-backups"


class Pilot:
    def __init__(self, sandbox: SystemdSandbox, binary: Path) -> None:
        self.sandbox = sandbox
        self.binary = binary
        base = free_port_block(8)
        self.agent_port = base + 1
        self.pg_port = base + 4
        self.sets = [
            f"--set=api.port={base}",
            f"--set=agent.port={base + 1}",
            f"--set=worker.port={base + 2}",
            f"--set=local.postgres.port={base + 4}",
            f"--set=local.redis.port={base + 5}",
            f"--set=backup.repository=file://{REPO_DIR}",
            "--set=backup.archive_timeout_seconds=10",
        ]

    def sb(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run([str(self.binary), *args], check=False, timeout=timeout)

    def sql(self, query: str) -> str:
        admin = read_env_file(self.sandbox.path("/etc/stellarbase/postgres-admin.env"))
        password = admin["STELLARBASE_LOCAL_POSTGRES_ADMIN_PASSWORD"]
        out = self.sandbox.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres", "-d",
             "stellarbase", "-AtqX", "-v", "ON_ERROR_STOP=1", "-c", query],
            env={"PGPASSWORD": password},
        )  # fmt: skip
        return out.stdout.strip()

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.agent_port}/metrics"
        return self.sandbox.run(["curl", "-s", url]).stdout

    def archived(self, name: str) -> bool:
        return self.sandbox.path(f"{REPO_DIR}/postgres/wal/{name}").is_file()

    def switch_and_wait_archived(self) -> None:
        """End the current WAL segment and wait until it is in the repository."""
        self.sql("SELECT pg_switch_wal()")
        last = self.sql("SELECT pg_walfile_name(pg_current_wal_lsn() - 1)")
        wait_for(f"{last} in the repository", lambda: self.archived(last), timeout=60)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in the scrape"
    return float(match.group(1))


@on_both_roots
def test_pilot_with_a_file_repository_is_archived_backed_up_and_restorable(
    systemd_sandbox: SystemdSandbox, binary: Path
) -> None:
    pilot = Pilot(systemd_sandbox, copy_binary(systemd_sandbox, binary))
    out = pilot.sb("install", "--tier", "pilot", *pilot.sets, "-o", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    steps = {s["step"]: s for s in json.loads(out.stdout)["data"]["steps"]}
    archiving = steps["configure WAL archiving"]
    assert archiving["status"] == "changed"
    assert "restarted stellarbase-postgres.service for archive_mode" in archiving["detail"]
    assert steps["start the first base backup (stellarbase-backup.service)"]["status"] == "changed"
    assert pilot.sql("SHOW archive_mode") == "on"
    assert pilot.sql("SHOW archive_timeout") == "10s"
    assert systemd_sandbox.systemctl("is-active", "stellarbase-backup.timer").stdout.strip() == (
        "active"
    )

    # A second run changes nothing, PostgreSQL included.
    again = pilot.sb("install", "--tier", "pilot", *pilot.sets, "-o", "json")
    assert again.returncode == 0, again.stdout + again.stderr
    changed = [s for s in json.loads(again.stdout)["data"]["steps"] if s["status"] != "unchanged"]
    assert changed == []

    # The agent archives what PostgreSQL finishes; archive_command only confirms.
    pilot.sql("CREATE TABLE drill_rows AS SELECT g AS n FROM generate_series(1, 5000) g")
    segment = pilot.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    pilot.sql("SELECT pg_switch_wal()")
    wait_for(f"{segment} in the repository", lambda: pilot.archived(segment), timeout=60)
    wait_for(
        "PostgreSQL to count it archived",
        lambda: pilot.sql("SELECT last_archived_wal FROM pg_stat_archiver") >= segment,
        timeout=30,
    )

    # The first backup install started, or one more through the unit the timer starts.
    systemd_sandbox.systemctl("start", "stellarbase-backup.service")
    listing = pilot.sb("backup", "list", "-o", "json")
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert len(json.loads(listing.stdout)["data"]["backups"]) in (1, 2)

    # The agent reads backup state once per collection round: wait for the next one.
    wait_for(
        "the agent to see the backup",
        lambda: _metric(pilot.metrics(), "stellarbase_backup_last_success_timestamp_seconds") > 0,
        timeout=30,
    )
    scrape = pilot.metrics()
    assert _metric(scrape, "stellarbase_backup_last_size_bytes") > 0
    assert _metric(scrape, 'stellarbase_backup_uploads_total{operation="wal"}') >= 1

    verify = pilot.sb("backup", "verify", "-o", "json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["data"]["problems"] == []

    drill = pilot.sb("backup", "drill", "-o", "json")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert json.loads(drill.stdout)["data"]["rows"] >= 5000

    # Point in time: an in-place restore to T brings back exactly the rows committed
    # before T; those committed after it are gone.
    pilot.sql("INSERT INTO drill_rows SELECT g FROM generate_series(5001, 6000) g")
    target = pilot.sql(  # after that commit and before the next one
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    )
    pilot.sql("INSERT INTO drill_rows SELECT g FROM generate_series(6001, 6500) g")
    pilot.switch_and_wait_archived()
    refused = pilot.sb("backup", "restore", "--to-time", target)
    assert refused.returncode != 0
    assert "--force" in refused.stderr
    restored = pilot.sb("backup", "restore", "--to-time", target, "--force", "-o", "json")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert pilot.sql("SELECT count(*), max(n) FROM drill_rows") == "6000|6000"
    assert pilot.sql("SELECT pg_is_in_recovery()") == "f"

    # The restored cluster, now on a new timeline, goes on archiving and backing up: rows
    # written after a new base backup survive an in-place restore to the latest point.
    systemd_sandbox.systemctl("start", "stellarbase-backup.service")
    pilot.sql("INSERT INTO drill_rows SELECT g FROM generate_series(7001, 7300) g")
    pilot.switch_and_wait_archived()
    restored = pilot.sb("backup", "restore", "--latest", "--force", "-o", "json")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert pilot.sql("SELECT count(*), max(n) FROM drill_rows") == "6300|7300"
    assert pilot.sql("SELECT pg_is_in_recovery()") == "f"
    audit = pilot.sb("audit", "-o", "json")
    actions = [r["action"] for r in json.loads(audit.stdout)["data"]["rows"]]
    assert {"backup", "backup drill", "backup restore"} <= set(actions)
