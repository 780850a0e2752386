"""The alert rules, the Grafana dashboard and the agent's /metrics agree and pass promtool.

config/prometheus/families.txt is the list of the agent's metric families; the rules and
the dashboard may use no other name, and a real scrape of `stellarbase run agent` must
pass `promtool check metrics` (Debian's `prometheus` package ships promtool).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from stellarbase.verify import probe
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = REPO / "config" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
FAMILIES = PROMETHEUS / "families.txt"
DASHBOARD = REPO / "config" / "grafana" / "stellarbase.json"

# Series Prometheus writes itself for every target, not the agent.
SCRAPE_SERIES = {"up"}

PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}


@dataclass(frozen=True)
class Family:
    name: str
    type: str
    labels: tuple[str, ...]


def contract() -> dict[str, Family]:
    families = {}
    for line in FAMILIES.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kind, labels = line.split()
        families[name] = Family(name, kind, () if labels == "-" else tuple(labels.split(",")))
    return families


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables such as $__rate_interval
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr):
        followed_by = expr[match.end() :].lstrip()[:1]
        if followed_by != "(" and match.group() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def rule_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def dashboard_exprs(board: dict[str, Any]) -> dict[str, str]:
    exprs = {}
    for panel in panels(board):
        for target in panel.get("targets", []):
            exprs[f"panel {panel['id']} {panel['title']!r} {target['refId']}"] = target["expr"]
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        found = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
        exprs[f"variable {var['name']}"] = found.group(1) if found else query
    return exprs


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("promtool is missing: scripts/setup.sh installs Debian's prometheus package")
    pytest.skip("promtool is not installed (apt-get install prometheus); CI runs these tests")


# --- the contract itself ---------------------------------------------------------------------


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'sum by (unit) (rate(a_total{unit=~"x.*", job="b"}[5m] offset 1m)) * 1e3'
        " > on (instance) group_left (name) b_info"
        ' or vector(0) and time() - c_seconds{path="/var/lib"} > $threshold'
        " unless d_bytes[1h:5m]"
    )
    assert metric_names(expr) == {"a_total", "b_info", "c_seconds", "d_bytes"}


def test_families_follow_prometheus_naming() -> None:
    for family in contract().values():
        assert family.name.startswith("stellarbase_"), family
        assert re.fullmatch(r"[a-z][a-z0-9_]*", family.name), family
        assert (family.type == "counter") == family.name.endswith("_total"), family
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", label) for label in family.labels), family


# --- alert rules -----------------------------------------------------------------------------


def test_alert_rules_use_only_the_agents_families() -> None:
    known = set(contract()) | SCRAPE_SERIES
    unknown = {
        alert: metric_names(expr) - known
        for alert, expr in rule_exprs().items()
        if metric_names(expr) - known
    }
    assert not unknown, f"names missing from {FAMILIES.name}: {unknown}"


def test_alert_rules_carry_severity_and_a_hint() -> None:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_promtool_accepts_the_alert_rules(promtool: str) -> None:
    out = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_fire_on_the_series_of_their_unit_tests(promtool: str) -> None:
    out = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --- dashboard -------------------------------------------------------------------------------


def test_dashboard_uses_only_the_agents_families() -> None:
    known = set(contract())
    exprs = dashboard_exprs(dashboard())
    unknown = {
        where: metric_names(e) - known for where, e in exprs.items() if metric_names(e) - known
    }
    assert not unknown, f"names missing from {FAMILIES.name}: {unknown}"


def test_dashboard_shows_every_family() -> None:
    shown = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard()).values()))
    assert set(contract()) - shown == set()


def test_dashboard_panels_query_the_chosen_data_source_and_do_not_overlap() -> None:
    board = dashboard()
    assert {v["name"] for v in board["templating"]["list"]} >= {"datasource", "instance"}
    taken: set[tuple[int, int]] = set()
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))


# --- a real scrape ---------------------------------------------------------------------------


@pytest.fixture
def agent_url(tmp_path: Path, dead_port: int) -> Iterator[str]:
    """`stellarbase run agent` on loopback, its PostgreSQL and Redis on a port nobody serves.

    Dependencies that do not answer still give their families (up 0, probe duration).
    """
    port = free_port()
    settings = tmp_path / "agent.json"
    settings.write_text(
        json.dumps(
            {
                "service": "agent",
                "bind": "127.0.0.1",
                "port": port,
                "log_level": "warning",
                "check_timeout_seconds": 1,
                "postgres": {"url": f"postgresql://stellarbase@127.0.0.1:{dead_port}/stellarbase"},
                "redis": {"url": f"redis://127.0.0.1:{dead_port}/0"},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stellarbase", "run", "agent", "--settings", str(settings)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while probe(f"{url}/healthz", timeout=1)[0] != 200:
            assert proc.poll() is None, f"the agent exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the agent did not answer /healthz in 20 s"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape(agent_url: str) -> str:
    """A scrape after the agent's first full round (its dependency probes take a moment)."""
    probe(f"{agent_url}/readyz", timeout=5)  # fills the per-request and per-check series
    deadline = time.monotonic() + 15
    while True:
        code, text = probe(f"{agent_url}/metrics", timeout=10)
        assert code == 200, text
        if "stellarbase_dependency_up{" in text or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_promtool_finds_nothing_to_complain_about_in_a_scrape(
    promtool: str, agent_url: str
) -> None:
    text = scrape(agent_url)
    assert "stellarbase_build_info{" in text
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_a_scrape_holds_only_families_of_the_contract(agent_url: str) -> None:
    """A family renamed in the agent leaves alerts and panels silently empty."""
    text = scrape(agent_url)
    emitted = {f.name for f in text_string_to_metric_families(text)}
    # The parser names counters without _total, as they are declared; prometheus_client's
    # Counter class adds a <name>_created series, its start time.
    counters = {f.name.removesuffix("_total") for f in contract().values() if f.type == "counter"}
    known = {f.removesuffix("_total") for f in contract()} | {f"{c}_created" for c in counters}
    assert emitted - known == set(), f"add them to {FAMILIES.name}, or rename them"
    assert {"stellarbase_build_info", "stellarbase_dependency_up"} <= emitted
