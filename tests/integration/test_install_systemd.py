"""The built binary converges a real (throwaway) systemd host to healthy services."""

from __future__ import annotations

import json
import re

import pytest

from stellarbase.verify import probe
from tests.integration.conftest import Host, ready, wait_for

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

SERVICES = ["stellarbase-agent.service", "stellarbase-api.service", "stellarbase-worker@1.service"]


def test_install_rerun_change_kill_uninstall(host: Host) -> None:
    # 1. first install ends healthy and says where each endpoint is
    out = host.install()
    endpoints = out["endpoints"]
    assert sorted(endpoints) == sorted(SERVICES)
    for unit in [*SERVICES, "stellarbase.target"]:
        assert host.active(unit) == "active", unit
    for unit, url in endpoints.items():
        code, body = probe(f"{url}/readyz")
        assert code == 200, body
        names = {c["name"] for c in json.loads(body)["checks"]}
        # The agent's /readyz adds the host's own checks (collection, unit:…, readyz:…).
        deps = {n for n in names if ":" not in n and n != "collection"}
        # Only the agent holds the S3 keys (the backup repository's), so only it checks S3.
        assert deps == ({"postgres", "redis", "s3"} if "agent" in unit else {"postgres", "redis"})
        metrics = probe(f"{url}/metrics")[1]
        assert "stellarbase_build_info{" in metrics and "stellarbase_dependency_up" in metrics

    # each service runs as its own user, with its secrets only in its own env file
    api_pid = host.sandbox.main_pid("stellarbase-api.service")
    owner = host.sandbox.run(["ps", "-o", "user:32=", "-p", str(api_pid)]).stdout.strip()
    assert owner == "stellarbase-api"
    cmdline = host.sandbox.path(f"/proc/{api_pid}/cmdline").read_bytes().decode()
    for secret in host.secrets.values():
        assert secret not in cmdline
        for unit in host.sandbox.path("/etc/systemd/system").glob("stellarbase*"):
            if unit.is_file():
                assert secret not in unit.read_text()
    journal = host.sandbox.run(["journalctl", "--no-pager", "-o", "cat", "-u", "stellarbase-api"])
    assert any(line.startswith("{") for line in journal.stdout.splitlines())
    for secret in host.secrets.values():
        assert secret not in journal.stdout

    # hardened: every service unit scores at most 2.0 and passes verify
    for unit in [
        "stellarbase-api.service",
        "stellarbase-agent.service",
        "stellarbase-worker@.service",
    ]:
        sec = host.sandbox.run(
            ["systemd-analyze", "security", "--offline=yes", f"/etc/systemd/system/{unit}"],
            check=False,
        )
        level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", sec.stdout)
        assert level and float(level.group(1)) <= 2.0, sec.stdout[-2000:]
    verify = host.sandbox.run(
        ["systemd-analyze", "verify", "--man=no", "stellarbase.target", *SERVICES], check=False
    )
    assert verify.returncode == 0, verify.stderr

    # 2. the same command again: nothing changes, nothing restarts
    pids = host.pids(SERVICES)
    again = host.install()
    assert again["changed"] == 0, [s for s in again["steps"] if s["status"] != "unchanged"]
    assert host.pids(SERVICES) == pids

    # 3a. one more worker: only worker@2 starts
    host.site["worker"]["instances"] = 2
    out = host.install()
    started = {s["step"] for s in out["steps"] if s["status"] == "changed"}
    assert "start stellarbase-worker@2.service" in started
    assert host.pids(SERVICES) == pids
    assert host.active("stellarbase-worker@2.service") == "active"

    # 3b. a new API port: only the API restarts
    new_port = host.site["worker"]["port"] + 4
    host.site["api"]["port"] = new_port
    out = host.install()
    now = host.pids(SERVICES)
    assert now["stellarbase-api.service"] != pids["stellarbase-api.service"]
    assert {u: p for u, p in now.items() if "api" not in u} == {
        u: p for u, p in pids.items() if "api" not in u
    }
    assert ready(f"http://127.0.0.1:{new_port}")

    # 3c. back to one worker: worker@2 stops
    host.site["worker"]["instances"] = 1
    host.install()
    assert host.active("stellarbase-worker@2.service") == "inactive"

    # 4. kill -9 of the API's main PID: systemd restarts it and status shows it
    api_pid = host.sandbox.main_pid("stellarbase-api.service")
    host.sandbox.run(["kill", "-9", str(api_pid)])
    wait_for(
        "the API to come back",
        lambda: (
            host.sandbox.main_pid("stellarbase-api.service") not in (0, api_pid)
            and ready(f"http://127.0.0.1:{new_port}")
        ),
    )
    status = json.loads(host.sb("status", "-o", "json", check=True).stdout)["data"]
    api = next(u for u in status["units"] if u["unit"] == "stellarbase-api.service")
    assert api["restarts"] == 1 and api["active"] == "active" and api["ready"] is True

    # the Python child of the one-file binary dying restarts the unit too
    main = host.sandbox.main_pid("stellarbase-api.service")
    child = host.sandbox.run(["pgrep", "-P", str(main)]).stdout.split()[0]
    host.sandbox.run(["kill", "-9", child])
    wait_for(
        "the API to come back after its child died",
        lambda: (
            host.sandbox.main_pid("stellarbase-api.service") not in (0, main)
            and ready(f"http://127.0.0.1:{new_port}")
        ),
    )

    # 6. uninstall: no unit file, no process; config stays until --purge
    host.sb("uninstall", "--yes", check=True)
    assert not list(host.sandbox.path("/etc/systemd/system").glob("stellarbase*"))
    users = "stellarbase-api,stellarbase-worker,stellarbase-agent"
    assert host.sandbox.run(["pgrep", "-u", users], check=False).stdout == ""
    assert host.sandbox.path("/etc/stellarbase/stellarbase.yaml").exists()
    host.sb("uninstall", "--purge", "--yes", check=True)
    for gone in ["/etc/stellarbase", "/var/lib/stellarbase", "/opt/stellarbase"]:
        assert not host.sandbox.path(gone).exists(), gone
