"""The whole plan of a live host, applied to a recording fake host: no systemd, no root.

A pilot with a local PostgreSQL and Redis and backups to a file repository, installed
into a temp root. The fake host records every systemctl, database and health-gate call,
so these tests see what a --root run skips: start order, rolling restarts, which units a
change restarts, and what a failure at each step leaves behind.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from stellarbase import install_state
from stellarbase.apply import FILE_STEPS, LEAVES_NOTHING_WHEN_FAILED, Executor
from stellarbase.configload import load_config
from stellarbase.errors import StellarError
from stellarbase.facts import Facts
from stellarbase.files import file_digest
from stellarbase.layout import (
    BACKUP_TIMER,
    BACKUP_UNIT,
    POSTGRES_UNIT,
    REDIS_UNIT,
    SUPERVISE_SOCKET,
    TARGET,
    LocalServers,
)
from stellarbase.localdeps import ServerBinary
from stellarbase.paths import HostPaths
from stellarbase.plan import make_plan
from stellarbase.result import Status, StepResult
from stellarbase.steps import Plan
from tests.fakehost import FakeHost
from tests.filetree import Entry, file_states

PILOT = ("backup.repository=file:///srv/backups", "worker.instances=2")
API = "stellarbase-api.service"
AGENT = "stellarbase-agent.service"
WORKERS = ["stellarbase-worker@1.service", "stellarbase-worker@2.service"]
SERVICES = [*WORKERS, API, AGENT]


def _facts(paths: HostPaths, binary: Path) -> Facts:
    """A host with PostgreSQL 15 and Redis 7, and what the last install recorded."""
    state = install_state.load(paths.state_file)
    return Facts(
        "0.1.0",
        binary,
        file_digest(binary),
        previous_files=tuple(state.files),
        previous_units=tuple(state.units),
        local=LocalServers(
            ServerBinary(Path("/usr/lib/postgresql/15/bin"), (15, 4)),
            ServerBinary(Path("/usr/bin/redis-server"), (7, 0)),
        ),
        generated=(
            ("STELLARBASE_LOCAL_POSTGRES_ADMIN_PASSWORD", "admin-pw"),
            ("STELLARBASE_POSTGRES__PASSWORD", "app-pw"),
            ("STELLARBASE_REDIS__PASSWORD", "redis-pw"),
        ),
    )


def _plan(paths: HostPaths, binary: Path, *sets: str) -> Plan:
    config = load_config(sets=[*PILOT, *sets], env={}).config
    return make_plan(config, paths, _facts(paths, binary))


def _apply(host: FakeHost, plan: Plan, *, rolling: bool = False) -> list[str]:
    """The names of the steps that changed something."""
    results = Executor(host.paths, host=host, rolling=rolling).apply(plan)
    return [r.step for r in results if r.status == Status.CHANGED]


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    path = tmp_path / "stellarbase-bin"
    path.write_bytes(b"#!/bin/sh\necho fake release\n")
    return path


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(HostPaths(tmp_path / "root"))


@pytest.fixture
def installed(host: FakeHost, binary: Path) -> FakeHost:
    """A converged pilot: every unit active, the schema current; calls and restarts reset."""
    _apply(host, _plan(host.paths, binary))
    host.calls.clear()
    host.restarts.clear()
    return host


def test_a_first_install_starts_everything_in_the_order_of_the_flow(
    host: FakeHost, binary: Path
) -> None:
    changed = _apply(host, _plan(host.paths, binary))
    acts = host.named(
        "init-cluster", "start", "restart", "ensure-database", "configure-settings",
        "migrate-up", "wait-healthy",
    )  # fmt: skip
    assert [c[:2] for c in acts] == [
        ("init-cluster", str(host.paths.postgres_data)),
        ("start", POSTGRES_UNIT),
        ("start", REDIS_UNIT),
        ("ensure-database", "8432"),
        ("configure-settings", "8432"),
        ("restart", POSTGRES_UNIT),  # wal_level and archive_mode take a restart
        ("migrate-up",),
        ("start", SUPERVISE_SOCKET),
        *(("start", unit) for unit in SERVICES),
        ("start", BACKUP_TIMER),
        ("start", TARGET),
        ("wait-healthy", POSTGRES_UNIT),
        ("start", BACKUP_UNIT),  # the first base backup, once the gate passed
    ]
    # The agent's targets are written once the schema is current, before the services.
    targets = next(
        i for i, s in enumerate(changed) if s.endswith("agent-units.json (root:stellarbase 0640)")
    )
    assert changed.index("apply database migrations") < targets
    assert targets < changed.index(f"start {SUPERVISE_SOCKET}")
    # users were made in the root's own user database, before any directory needed them
    assert host.calls[0] == ("sysusers", "stellarbase.conf")
    assert "stellarbase-pg:" in host.paths.passwd.read_text()
    gate = host.named("wait-healthy")[0]
    assert set(gate) >= {POSTGRES_UNIT, REDIS_UNIT, SUPERVISE_SOCKET, *SERVICES, TARGET}


def test_a_second_run_on_the_live_host_changes_nothing(installed: FakeHost, binary: Path) -> None:
    before = file_states(installed.paths.root)
    assert _apply(installed, _plan(installed.paths, binary)) == []
    assert installed.named("start", "restart", "stop", "daemon-reload", "migrate-up") == []
    assert file_states(installed.paths.root) == before


def test_a_rolling_upgrade_restarts_one_unit_at_a_time_each_ready_before_the_next(
    installed: FakeHost, binary: Path
) -> None:
    binary.write_bytes(b"#!/bin/sh\necho the next release\n")
    plan = _plan(installed.paths, binary)
    _apply(installed, plan, rolling=True)
    acts = installed.named("start", "restart", "wait-healthy")
    rolled = [(c[0], c[1]) for c in acts[: 2 * len(SERVICES)]]
    assert rolled == [
        step for unit in SERVICES for step in (("restart", unit), ("wait-healthy", unit))
    ]
    assert all(c[2] == "wait" for c in installed.named("restart"))
    # the local servers run no stellarbase binary: a new release leaves them running
    assert installed.restarts[POSTGRES_UNIT] == installed.restarts[REDIS_UNIT] == 0
    assert acts[-1][0] == "wait-healthy"  # and the whole gate after the last one


def test_a_new_api_port_restarts_the_api_only(installed: FakeHost, binary: Path) -> None:
    _apply(installed, _plan(installed.paths, binary, "api.port=9123"))
    assert installed.named("start", "restart", "stop") == [("restart", API, "no-block")]
    assert installed.restarts == {API: 1}
    assert installed.named("daemon-reload") == [("daemon-reload",)]  # the API's unit changed


def test_a_unit_the_config_no_longer_wants_is_stopped_and_forgotten(
    installed: FakeHost, binary: Path
) -> None:
    _apply(installed, _plan(installed.paths, binary, "worker.instances=1"))
    assert installed.named("stop", "start", "restart") == [("stop", WORKERS[1])]
    assert WORKERS[1] not in installed.active
    assert WORKERS[1] not in install_state.load(installed.paths.state_file).units


def test_a_failed_migration_leaves_the_services_as_they_were(
    installed: FakeHost, binary: Path
) -> None:
    installed.applied.clear()  # a release that brings migrations
    installed.fail_call = "migrate-up"
    with pytest.raises(StellarError):
        _apply(installed, _plan(installed.paths, binary, "api.port=9123"))
    assert installed.named("start", "restart", "stop") == []


@dataclass(frozen=True)
class Transition:
    """An installed pilot (kept aside, copied back before each run), the plan of a config
    change that touches files, units and the schema, and what an uninterrupted run does."""

    paths: HostPaths
    host: FakeHost  # as the installed pilot left it
    pristine: Path
    plan: Plan
    results: list[StepResult]
    before: dict[str, Entry]
    after: dict[str, Entry]

    def failing_after(self, n: int) -> FakeHost:
        """The installed pilot back in place, and a host that fails after step n."""
        shutil.rmtree(self.paths.root)
        subprocess.run(["cp", "-a", str(self.pristine), str(self.paths.root)], check=True)
        return replace(_copy(self.host), fail_after_step=n)


@pytest.fixture(scope="module")
def transition(tmp_path_factory: pytest.TempPathFactory) -> Transition:
    top = tmp_path_factory.mktemp("transition")
    binary = top / "stellarbase-bin"
    binary.write_bytes(b"#!/bin/sh\necho fake release\n")
    paths = HostPaths(top / "root")
    host = FakeHost(paths)
    _apply(host, _plan(paths, binary))
    host.applied.clear()  # this release brings migrations
    host.calls.clear()
    pristine = top / "pristine"
    subprocess.run(["cp", "-a", str(paths.root), str(pristine)], check=True)
    before = file_states(paths.root)
    plan = _plan(paths, binary, "api.port=9123", "worker.instances=3", "local.redis.port=8380")
    results = Executor(paths, host=_copy(host)).apply(plan)
    return Transition(paths, host, pristine, plan, results, before, file_states(paths.root))


def _copy(host: FakeHost) -> FakeHost:
    return replace(host, calls=[], active=set(host.active), restarts=host.restarts.copy(),
                   settings=dict(host.settings), applied=set(host.applied))  # fmt: skip


TRANSITION_STEPS = 70  # at least as many as the plan has: the tail checks the count


@pytest.mark.parametrize("n", range(1, TRANSITION_STEPS + 1))
def test_a_failure_after_each_step_puts_files_back_or_leaves_a_run_that_converges(
    transition: Transition, n: int
) -> None:
    plan, results = transition.plan, transition.results
    if n > len(results):
        assert len(plan.steps) == len(results) < n
        return
    host = transition.failing_after(n)
    with pytest.raises(StellarError) as err:
        Executor(transition.paths, host=host).apply(plan)
    # Until a step acts beyond files, the run can be taken back whole; a failing step that
    # may act before it fails (a unit start, a database change) ends that too.
    files_only = isinstance(plan.steps[n - 1], LEAVES_NOTHING_WHEN_FAILED) and all(
        isinstance(step, FILE_STEPS) or r.status == Status.UNCHANGED
        for step, r in zip(plan.steps, results[:n], strict=False)
    )
    now = file_states(transition.paths.root)
    if files_only:
        assert now == transition.before
        touched = [c for c in host.calls if c[0] in ("start", "restart", "stop", "migrate-up")]
        assert touched == []
        changed_files = any(r.status == Status.CHANGED for r in results[:n])
        assert ("as they were" in err.value.details[-1]) if changed_files else not err.value.details
    else:
        # A service or the data saw the change: the files stay as this run wrote them,
        # and running it again converges to where an uninterrupted run ends.
        assert now != transition.before
        assert not any("as they were" in line for line in err.value.details)
        Executor(transition.paths, host=replace(host, fail_after_step=0)).apply(plan)
        assert file_states(transition.paths.root) == transition.after
