"""Plan → apply into a temp root: the executor's convergence without a live systemd."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from stellarbase import install_state
from stellarbase.apply import Executor
from stellarbase.commands.install import install
from stellarbase.commands.install import make_plan as install_plan
from stellarbase.commands.plan import dry_run
from stellarbase.commands.uninstall import uninstall
from stellarbase.configload import load_config
from stellarbase.envfile import read_env_file
from stellarbase.errors import ExitCode, StellarError
from stellarbase.facts import Facts
from stellarbase.paths import HostPaths
from stellarbase.plan import make_plan
from stellarbase.result import Status
from stellarbase.steps import EnsureDatabase, Migrate, Plan, RemoveStale, Step
from tests.filetree import file_states

pytestmark = pytest.mark.host_commands  # systemd-sysusers --root=<tmp> creates the user


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    path = tmp_path / "stellarbase-bin"
    path.write_bytes(b"#!/bin/sh\necho fake release\n")
    return path


def _install(root: Path, binary: Path, *sets: str, env: dict[str, str] | None = None):
    loaded = load_config(sets=list(sets), env=env or {})
    return install(loaded, HostPaths(root), binary)


def test_second_install_changes_nothing(tmp_path: Path, binary: Path) -> None:
    root = tmp_path / "root"
    first = _install(root, binary)
    assert first.changed > 10
    before = file_states(root)
    second = _install(root, binary)
    assert second.changed == 0
    assert all(s.status == Status.UNCHANGED for s in second.steps)
    assert file_states(root) == before


def test_files_have_owner_and_mode(tmp_path: Path, binary: Path) -> None:
    root = tmp_path / "root"
    _install(
        root,
        binary,
        "dependencies.postgres=external",
        "postgres.url=postgresql://sb@db:5432/sb",
        env={"STELLARBASE_POSTGRES__PASSWORD": "pw-123"},
    )
    paths = HostPaths(root)
    # secrets.env is root's alone; each unit gets its own secrets as systemd credentials
    secrets = paths.secrets_file.stat()
    assert stat.S_IMODE(secrets.st_mode) == 0o600 and (secrets.st_uid, secrets.st_gid) == (0, 0)
    assert 'STELLARBASE_POSTGRES__PASSWORD="pw-123"' in paths.secrets_file.read_text()
    for service in ("api", "worker", "agent"):
        credential = paths.credentials_file(service)
        assert read_env_file(credential)["STELLARBASE_POSTGRES__PASSWORD"] == "pw-123"
        assert stat.S_IMODE(credential.stat().st_mode) == 0o600 and credential.stat().st_uid == 0
    assert stat.S_IMODE(paths.credentials_dir.stat().st_mode) == 0o700
    for unit in paths.unit_dir.glob("stellarbase*"):
        assert "pw-123" not in unit.read_text()
        assert "EnvironmentFile=/etc/stellarbase/secrets.env" not in unit.read_text()
    assert "pw-123" not in paths.config_file.read_text()
    assert os.readlink(paths.current) == "releases/0.1.0"
    assert (paths.current / "stellarbase").read_bytes() == binary.read_bytes()
    assert stat.S_IMODE((paths.current / "stellarbase").stat().st_mode) == 0o755


def test_plan_masks_secrets_and_changes_nothing(tmp_path: Path, binary: Path) -> None:
    root = tmp_path / "root"
    loaded = load_config(
        sets=["dependencies.redis=external", "redis.url=redis://cache:6379/0"],
        env={"STELLARBASE_REDIS__PASSWORD": "r-pass-9"},
    )
    result = dry_run(loaded, HostPaths(root), binary)
    assert result.changed > 10
    rendered = repr(result.as_dict())
    assert "r-pass-9" not in rendered and "secret content not shown" in rendered
    assert not (root / "etc" / "stellarbase").exists()


def test_worker_count_changes_only_what_it_concerns(tmp_path: Path, binary: Path) -> None:
    root = tmp_path / "root"
    _install(root, binary)
    result = _install(root, binary, "worker.instances=3")
    changed = {s.step.split(" ")[1] for s in result.steps if s.status == Status.CHANGED}
    assert changed == {
        str(root / "etc/stellarbase/stellarbase.yaml"),
        str(root / "etc/stellarbase/services/agent-units.json"),  # read live, not a unit input
        str(root / "etc/systemd/system/stellarbase.target"),
    }
    target = (root / "etc/systemd/system/stellarbase.target").read_text()
    assert "stellarbase-worker@3.service" in target


def test_interrupted_write_leaves_no_temp_file(tmp_path: Path, binary: Path) -> None:
    root = tmp_path / "root"
    _install(root, binary)
    paths = HostPaths(root)
    leftover = paths.etc / ".stellarbase.yaml.abc123"
    leftover.write_text("half written")
    paths.config_file.write_text("truncated")
    result = _install(root, binary)
    assert result.changed == 1
    assert not leftover.exists()


def test_uninstall_keeps_config_unless_purged(tmp_path: Path, binary: Path) -> None:
    root = tmp_path / "root"
    _install(root, binary)
    paths = HostPaths(root)
    uninstall(paths, purge=False)
    assert not list(paths.unit_dir.glob("stellarbase*"))
    assert not paths.opt.exists()
    assert paths.config_file.exists() and paths.state_dir.is_dir()
    assert install_state.load(paths.state_file).units == {}
    _install(root, binary)
    uninstall(paths, purge=True)
    assert not paths.etc.exists() and not paths.state_dir.exists()
    assert not paths.sysusers_file.exists()


def test_local_servers_get_their_files_and_generated_passwords(
    tmp_path: Path, binary: Path
) -> None:
    root = tmp_path / "root"
    _install(root, binary)
    paths = HostPaths(root)
    redis_conf = paths.redis_conf.read_text()
    assert "maxmemory-policy noeviction" in redis_conf and "appendonly yes" in redis_conf
    # the password sits in the 0640 include file, not in redis.conf
    assert not any(line.startswith("requirepass") for line in redis_conf.splitlines())
    assert stat.S_IMODE(paths.admin_secrets_file.stat().st_mode) == 0o600
    secrets = read_env_file(paths.secrets_file)
    assert len(secrets["STELLARBASE_POSTGRES__PASSWORD"]) >= 24
    assert secrets["STELLARBASE_REDIS__PASSWORD"] in paths.redis_auth.read_text()
    api = json.loads((paths.service_settings_dir / "api.json").read_text())
    assert api["postgres"]["url"] == "postgresql://stellarbase@127.0.0.1:8432/stellarbase"
    assert api["postgres"]["password"] is None  # the service reads it from its credentials
    unit = (paths.unit_dir / "stellarbase-api.service").read_text()
    assert "After=network-online.target stellarbase-postgres.service" in unit
    assert stat.S_IMODE(paths.postgres_data.stat().st_mode) == 0o750  # initdb -g: the agent's WAL
    # the passwords survive a re-run: generated once, then read back
    assert _install(root, binary).changed == 0


def test_missing_server_binaries_stop_the_plan(tmp_path: Path, binary: Path) -> None:
    loaded = load_config(env={})
    facts = Facts(version="0.1.0", binary=binary, binary_digest="x")
    with pytest.raises(StellarError) as info:
        make_plan(loaded.config, HostPaths(tmp_path / "root"), facts)
    assert info.value.code == ExitCode.HOST
    assert "install postgresql" in info.value.hint
    assert not (tmp_path / "root").exists()


def _failing(plan: Plan, dead_port: int, *before: Step) -> Plan:
    """The plan with steps that fail last: the database it migrates does not answer."""
    url = f"postgresql://stellarbase@127.0.0.1:{dead_port}/stellarbase"
    return replace(plan, steps=(*plan.steps, *before, Migrate(url, "pw", 2.0)))


def _refused(root: Path, plan: Plan) -> StellarError:
    with pytest.raises(StellarError) as err:
        Executor(HostPaths(root)).apply(plan)
    return err.value


def _plan(root: Path, binary: Path, *sets: str) -> Plan:
    loaded = load_config(sets=list(sets), env={})
    return install_plan(loaded, HostPaths(root), binary)


def test_a_failure_before_any_service_saw_the_change_puts_every_file_back(
    tmp_path: Path, binary: Path, dead_port: int
) -> None:
    root = tmp_path / "root"
    _install(root, binary)
    before = file_states(root)
    plan = _failing(_plan(root, binary, "worker.instances=3", "api.port=9123"), dead_port)
    err = _refused(root, plan)
    assert err.code == ExitCode.DEPENDENCY
    assert file_states(root) == before
    # the site config, the API's settings and unit (its port is in SocketBindAllow=), the
    # agent's units file and the target
    assert err.details[-1] == (
        "no service was touched: the 5 paths this run changed are as they were"
    )


def test_a_failed_first_install_leaves_only_the_system_user(
    tmp_path: Path, binary: Path, dead_port: int
) -> None:
    root = tmp_path / "root"
    err = _refused(root, _failing(_plan(root, binary), dead_port))
    assert "are as they were" in err.details[-1]
    # systemd-sysusers made the user (kept: harmless, and the next run finds it): the user
    # database in etc/ is all that is left, no directory of ours, no unit, no release.
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert "etc/passwd" in left
    assert [p for p in left if p == "etc" or (p.startswith("etc/") and p.count("/") == 1)] == left
    assert "stellarbase:" in (root / "etc/passwd").read_text()


def test_once_a_step_acts_beyond_files_a_failure_leaves_them_for_the_next_run(
    tmp_path: Path, binary: Path, dead_port: int
) -> None:
    root = tmp_path / "root"
    _install(root, binary)
    stale = HostPaths(root).etc / "left-by-an-older-release.conf"
    stale.write_text("old\n")
    plan = _failing(_plan(root, binary, "worker.instances=3"), dead_port, RemoveStale((stale,)))
    err = _refused(root, plan)
    assert not any("as they were" in line for line in err.details)
    assert "stellarbase-worker@3" in (root / "etc/systemd/system/stellarbase.target").read_text()
    assert not stale.exists()


def test_a_step_that_may_have_acted_before_failing_leaves_the_files_for_the_next_run(
    tmp_path: Path, binary: Path, dead_port: int
) -> None:
    root = tmp_path / "root"
    _install(root, binary)
    # A database step can fail after it changed a role or a password: the files that go
    # with it stay as this run wrote them.
    plan = _plan(root, binary, "worker.instances=3")
    failing = replace(plan, steps=(*plan.steps, EnsureDatabase(dead_port, "a", "b", 1.0)))
    err = _refused(root, failing)
    assert not any("as they were" in line for line in err.details)
    assert "stellarbase-worker@3" in (root / "etc/systemd/system/stellarbase.target").read_text()
