"""The agent on an installed pilot, in a real (throwaway) systemd: host readiness follows a
dependency, an unhealthy service is restarted and counted, a stopped one is left alone, and
a stuck collection loop gets the agent restarted by the watchdog."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from stellarbase.verify import probe
from tests.fixtures_systemd import on_both_roots
from tests.integration.conftest import copy_binary, free_port_block, wait_for
from tests.systemd_sandbox import SystemdSandbox

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

INTERVAL = 2
K = 3
AGENT = "stellarbase-agent.service"
API = "stellarbase-api.service"
REDIS = "stellarbase-redis.service"
FAULT_DIR = "/run/stellarbase/fault"


def _metric(text: str, name: str, **labels: str) -> float | None:
    shown = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + shown + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else None


class Pilot:
    def __init__(self, sandbox: SystemdSandbox, binary: Path) -> None:
        self.sandbox = sandbox
        self.binary = binary
        base = free_port_block(8)
        self.agent = f"http://127.0.0.1:{base + 1}"
        self.sets = [
            f"--set=api.port={base}",
            f"--set=agent.port={base + 1}",
            f"--set=worker.port={base + 2}",
            f"--set=local.postgres.port={base + 4}",
            f"--set=local.redis.port={base + 5}",
            f"--set=agent.interval_seconds={INTERVAL}",
            f"--set=agent.restart_after_failures={K}",
            "--set=agent.restart_backoff_seconds=5",
            "--set=health.watchdog_seconds=6",
        ]

    def sb(self, *args: str) -> str:
        out = self.sandbox.run([str(self.binary), *args], check=False, timeout=240)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def readyz(self, query: str = "") -> tuple[int, str]:
        return probe(f"{self.agent}/readyz{query}", timeout=5)

    def failing(self) -> list[str]:
        code, body = self.readyz()
        if code not in (200, 503):
            return ["(no answer)"]
        return [c["name"] for c in json.loads(body)["checks"] if c["status"] != "pass"]

    def metrics(self) -> str:
        return probe(f"{self.agent}/metrics", timeout=5)[1]

    def restarts(self, unit: str) -> float:
        return _metric(self.metrics(), "stellarbase_supervisor_restarts_total", unit=unit) or 0

    def prop(self, unit: str, name: str) -> str:
        out = self.sandbox.systemctl("show", f"--property={name}", "--value", unit)
        return out.stdout.strip()

    def journal(self, unit: str) -> str:
        return self.sandbox.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit]).stdout


@on_both_roots
def test_agent_readiness_supervision_and_watchdog(
    systemd_sandbox: SystemdSandbox, binary: Path
) -> None:
    pilot = Pilot(systemd_sandbox, copy_binary(systemd_sandbox, binary))
    pilot.sb("install", "--tier", "pilot", *pilot.sets)
    wait_for("the agent's /readyz to pass", lambda: pilot.readyz()[0] == 200, timeout=30)
    code, body = pilot.readyz()
    names = {c["name"] for c in json.loads(body)["checks"]}
    assert {"collection", "postgres", "redis", f"unit:{REDIS}", f"readyz:{API}"} <= names
    assert re.match(r"ready: \d+/\d+ units active, 2/2 deps up", pilot.prop(AGENT, "StatusText"))
    scrape = pilot.metrics()
    assert _metric(scrape, "stellarbase_host_ready") == 1
    assert _metric(scrape, "stellarbase_unit_active", unit=API) == 1
    assert _metric(scrape, "stellarbase_collector_success", collector="units") == 1
    assert _metric(scrape, "stellarbase_migrations_pending") == 0
    assert _metric(scrape, "stellarbase_unit_restarts_total", unit=API) == 0

    # Redis stops: /readyz turns 503 naming it within one interval (plus the round itself).
    pilot.sandbox.systemctl("stop", REDIS)
    stopped = time.monotonic()
    wait_for("/readyz to name redis", lambda: "redis" in pilot.failing(), timeout=15)
    noticed = time.monotonic() - stopped
    print(f"redis down noticed after {noticed:.1f}s")
    assert noticed <= INTERVAL + 3, noticed
    code, body = pilot.readyz()
    assert code == 503
    assert f"unit:{REDIS}" in pilot.failing()
    code, text = pilot.readyz("?verbose")
    assert code == 503 and "[-]redis failed: " in text and "[+]postgres ok" in text
    excluded = "&".join(f"exclude={name}" for name in pilot.failing())
    code, text = pilot.readyz(f"?verbose&{excluded}")
    assert code == 200 and "[+]redis excluded: ok" in text, text
    assert pilot.prop(AGENT, "StatusText").startswith("not ready (")
    pilot.sandbox.systemctl("start", REDIS)
    wait_for("/readyz to pass with Redis back", lambda: pilot.readyz()[0] == 200, timeout=20)

    # The API's /healthz fails (test hook): after K failed probes the agent restarts it.
    api_pid = pilot.sandbox.main_pid(API)
    pilot.sandbox.run(["mkdir", "-p", FAULT_DIR])
    pilot.sandbox.run(["touch", f"{FAULT_DIR}/{API}.healthz"])
    wait_for("the agent to restart the API", lambda: pilot.restarts(API) >= 1, timeout=K * 5 + 20)
    pilot.sandbox.run(["rm", f"{FAULT_DIR}/{API}.healthz"])
    wait_for(
        "the API back under a new PID",
        lambda: pilot.sandbox.main_pid(API) not in (0, api_pid) and pilot.readyz()[0] == 200,
        timeout=30,
    )
    assert "restarting an unhealthy service" in pilot.journal(AGENT)
    # Root did it, on the agent's request: the helper's own log line.
    assert f"try-restart {API} queued" in pilot.journal("stellarbase-supervise@*.service")
    audit = json.loads(pilot.sb("audit", "-o", "json"))["data"]
    rows = [r for r in audit["rows"] if r["action"] == "supervise restart"]
    assert rows and rows[0]["outcome"] == "success" and rows[0]["details"]["unit"] == API

    # An admin stops the API: the agent leaves it stopped, well past K intervals.
    restarts = pilot.restarts(API)
    pilot.sandbox.systemctl("stop", API)
    time.sleep((K + 3) * INTERVAL)
    assert pilot.sandbox.systemctl("is-active", API, check=False).stdout.strip() == "inactive"
    assert pilot.restarts(API) == restarts
    assert f"unit:{API}" in pilot.failing()
    pilot.sandbox.systemctl("start", API)

    # The collection loop freezes (test hook): no watchdog ping, systemd restarts the agent.
    agent_pid = pilot.sandbox.main_pid(AGENT)
    before = int(pilot.prop(AGENT, "NRestarts"))
    pilot.sandbox.run(["touch", f"{FAULT_DIR}/agent.freeze"])
    wait_for(
        "the watchdog to restart the agent",
        lambda: int(pilot.prop(AGENT, "NRestarts")) > before,
        timeout=40,
    )
    assert pilot.sandbox.main_pid(AGENT) != agent_pid
    assert (
        "watchdog timeout"
        in pilot.sandbox.run(["journalctl", "--no-pager", "-o", "cat", "-u", AGENT]).stdout.lower()
    )
    # The flag is older than the new agent, which therefore runs normally.
    wait_for("the agent ready again", lambda: pilot.readyz()[0] == 200, timeout=40)
