"""Data is never removed or re-initialised by install: only `uninstall --purge` removes it.

Installs into a temp root (files only): a cluster is planted in the data directories to
stand for a pilot whose local servers hold data.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stellarbase.apply import Executor
from stellarbase.commands.install import install
from stellarbase.commands.uninstall import uninstall
from stellarbase.configload import load_config
from stellarbase.errors import ExitCode, StellarError
from stellarbase.facts import Facts
from stellarbase.layout import POSTGRES_UNIT, REDIS_UNIT, LocalServers
from stellarbase.localdeps import ServerBinary
from stellarbase.paths import HostPaths
from stellarbase.plan import make_plan
from stellarbase.steps import InitPostgres, Plan, RemoveStale, StartUnit, StopUnits
from tests.filetree import file_states

pytestmark = pytest.mark.host_commands  # systemd-sysusers --root=<tmp> creates the user

EXTERNAL = [
    "dependencies.mode=external",
    "postgres.url=postgresql://sb@db.example:5432/sb",
    "redis.url=redis://cache.example:6379/0",
]
EXTERNAL_SECRETS = {
    "STELLARBASE_POSTGRES__PASSWORD": "pg-pw",
    "STELLARBASE_REDIS__PASSWORD": "r-pw",
}


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    path = tmp_path / "stellarbase-bin"
    path.write_bytes(b"#!/bin/sh\necho fake release\n")
    return path


def _secrets(sets: list[str]) -> dict[str, str]:
    """The password of each dependency given by URL (a password alone is half a section)."""
    return {
        name: value
        for name, value in EXTERNAL_SECRETS.items()
        if any(s.startswith(f"{name.split('_')[1].lower()}.url=") for s in sets)
    }


def _install(root: Path, binary: Path, *sets: str, retire: bool = False) -> None:
    loaded = load_config(sets=list(sets), env=_secrets(list(sets)))
    if retire:
        install(loaded, HostPaths(root), binary, retire_local=True)
    else:
        install(loaded, HostPaths(root), binary)


def _pilot_with_data(root: Path, binary: Path) -> HostPaths:
    """A pilot whose local PostgreSQL and Redis hold data."""
    _install(root, binary)
    paths = HostPaths(root)
    (paths.postgres_data / "PG_VERSION").write_text("15\n")
    (paths.postgres_data / "global").mkdir()
    (paths.postgres_data / "global" / "pg_control").write_bytes(b"control")
    (paths.postgres_data / "base").mkdir()
    (paths.postgres_data / "base" / "16384").write_bytes(b"canary rows")
    (paths.redis_data / "appendonlydir").mkdir()
    (paths.redis_data / "appendonlydir" / "appendonly.aof.1.incr.aof").write_bytes(b"*1\r\n")
    return paths


def _refused(root: Path, binary: Path, *sets: str, tier: str | None = None) -> StellarError:
    with pytest.raises(StellarError) as info:
        loaded = load_config(sets=list(sets), tier=tier, env=_secrets(list(sets)))
        install(loaded, HostPaths(root), binary)
    assert "\n" not in info.value.message and info.value.hint
    return info.value


def test_switching_to_external_with_local_data_is_refused_before_any_change(
    tmp_path: Path, binary: Path
) -> None:
    root = tmp_path / "root"
    _pilot_with_data(root, binary)
    before = file_states(root)
    err = _refused(root, binary, *EXTERNAL)
    assert err.code == ExitCode.CONFIG
    assert "--retire-local" in err.hint and "backup" in err.hint
    assert file_states(root) == before


@pytest.mark.parametrize("dep", ["postgres", "redis"])
def test_one_dependency_switched_is_refused_too(tmp_path: Path, binary: Path, dep: str) -> None:
    root = tmp_path / "root"
    _pilot_with_data(root, binary)
    before = file_states(root)
    url = next(s for s in EXTERNAL if s.startswith(f"{dep}.url"))
    err = _refused(root, binary, f"dependencies.{dep}=external", url)
    assert err.code == ExitCode.CONFIG and dep in err.message
    assert file_states(root) == before


@pytest.mark.parametrize(
    ("sets", "tier", "needle"),
    [
        (["dependencies.mode=external"], None, "postgres.url"),
        (["dependencies.redis=external"], None, "redis.url"),
        ([], "department", "postgres.url"),  # the department tier is external by default
    ],
)
def test_external_without_a_url_is_refused(
    tmp_path: Path, binary: Path, sets: list[str], tier: str | None, needle: str
) -> None:
    root = tmp_path / "root"
    _pilot_with_data(root, binary)
    before = file_states(root)
    err = _refused(root, binary, *sets, tier=tier)
    assert err.code == ExitCode.CONFIG and needle in err.message
    assert file_states(root) == before


def test_retire_local_keeps_the_data_and_drops_the_local_units(
    tmp_path: Path, binary: Path
) -> None:
    root = tmp_path / "root"
    paths = _pilot_with_data(root, binary)
    data = file_states(paths.postgres_data, paths.redis_data, paths.admin_secrets_file)
    _install(root, binary, *EXTERNAL, retire=True)
    assert file_states(paths.postgres_data, paths.redis_data, paths.admin_secrets_file) == data
    assert not (paths.unit_dir / POSTGRES_UNIT).exists()
    assert not (paths.unit_dir / REDIS_UNIT).exists()
    assert POSTGRES_UNIT not in (paths.unit_dir / "stellarbase.target").read_text()
    # the way back: local again adopts the cluster left on disk
    _install(root, binary)
    assert file_states(paths.postgres_data, paths.redis_data, paths.admin_secrets_file) == data


def test_retire_local_stops_the_local_units_on_a_live_host(binary: Path) -> None:
    config = load_config(sets=EXTERNAL, env=EXTERNAL_SECRETS).config
    facts = Facts(
        "0.1.0",
        binary,
        "digest",
        previous_files=(f"/etc/systemd/system/{POSTGRES_UNIT}", "/etc/stellarbase/redis.conf"),
        previous_units=(POSTGRES_UNIT, REDIS_UNIT, "stellarbase-api.service"),
        local_data=("postgres", "redis"),
    )
    with pytest.raises(StellarError):
        make_plan(config, HostPaths(), facts)
    steps = make_plan(config, HostPaths(), facts, retire_local=True).steps
    stops = [s for s in steps if isinstance(s, StopUnits)]
    assert stops and set(stops[0].units) == {POSTGRES_UNIT, REDIS_UNIT}
    first_removal = next(i for i, s in enumerate(steps) if isinstance(s, RemoveStale))
    assert steps.index(stops[0]) < first_removal  # stopped before their files go


def test_data_dirs_an_older_release_recorded_as_its_own_are_never_stale(binary: Path) -> None:
    """State files of earlier releases list the data dirs among the installer's files."""
    paths = HostPaths()
    views = [paths.host_view(p) for p in (paths.postgres_data, paths.redis_data, paths.wal_spool)]
    facts = Facts("0.1.0", binary, "digest", previous_files=(*views, "/etc/stellarbase/x.conf"))
    # both dependencies external: none of the three is wanted any more
    config = load_config(sets=EXTERNAL, env=EXTERNAL_SECRETS).config
    plan = make_plan(config, paths, facts)
    removed = [p for s in plan.steps if isinstance(s, RemoveStale) for p in s.paths]
    assert [paths.host_view(p) for p in removed] == ["/etc/stellarbase/x.conf"]


def test_initdb_never_runs_over_a_directory_that_holds_files(tmp_path: Path) -> None:
    data = tmp_path / "root" / "var/lib/stellarbase/postgres"
    data.mkdir(parents=True)
    (data / "base").mkdir()
    (data / "base" / "1").write_bytes(b"someone's data")
    before = file_states(data)
    step = InitPostgres(Path("/usr/lib/postgresql/15/bin"), data, "pw")
    with pytest.raises(StellarError) as info:
        Executor(HostPaths(tmp_path / "root")).apply(Plan((step,), (), ()))
    assert str(data) in info.value.message
    assert file_states(data) == before


def test_purge_still_removes_the_data(tmp_path: Path, binary: Path) -> None:
    root = tmp_path / "root"
    paths = _pilot_with_data(root, binary)
    uninstall(paths, purge=False)
    assert (paths.postgres_data / "PG_VERSION").is_file()
    assert (paths.redis_data / "appendonlydir").is_dir()
    _install(root, binary)
    assert (paths.postgres_data / "PG_VERSION").is_file()  # adopted, not initialised over
    uninstall(paths, purge=True)
    assert not paths.state_dir.exists() and not paths.etc.exists()


def _local_facts(binary: Path, *, postgres_leftovers: bool = False) -> Facts:
    """A host with local PostgreSQL 15 and Redis 7 binaries and generated passwords."""
    pg = ServerBinary(Path("/usr/lib/postgresql/15/bin"), (15, 4))
    redis = ServerBinary(Path("/usr/bin/redis-server"), (7, 0))
    return Facts(
        "0.1.0",
        binary,
        "digest",
        local=LocalServers(pg, redis),
        postgres_leftovers=postgres_leftovers,
        generated=(
            ("STELLARBASE_LOCAL_POSTGRES_ADMIN_PASSWORD", "a"),
            ("STELLARBASE_POSTGRES__PASSWORD", "b"),
            ("STELLARBASE_REDIS__PASSWORD", "c"),
        ),
    )


def test_planner_refuses_a_data_dir_that_is_no_cluster(binary: Path) -> None:
    config = load_config(env={}).config
    facts = _local_facts(binary, postgres_leftovers=True)
    with pytest.raises(StellarError) as info:
        make_plan(config, HostPaths(), facts)
    assert (
        info.value.code == ExitCode.HOST and "/var/lib/stellarbase/postgres" in info.value.message
    )


def test_initdb_writes_aside_and_renames_into_the_empty_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash mid-initdb leaves a scratch dir (started over), never a half cluster."""
    from stellarbase import localdeps

    data = tmp_path / "postgres"
    data.mkdir(mode=0o700)
    scratch = tmp_path / ".postgres.initdb"
    scratch.mkdir()
    (scratch / "PG_VERSION").write_text("15\n")  # what a crash of an earlier initdb left
    seen: list[str] = []

    def initdb(argv: list[str], **_: object) -> None:
        target = Path(next(a for a in argv if a.startswith("--pgdata=")).split("=", 1)[1])
        seen.append(str(target))
        assert not any(target.iterdir())  # started over
        (target / "PG_VERSION").write_text("15\n")
        (target / "global").mkdir()
        (target / "global" / "pg_control").write_bytes(b"control")

    monkeypatch.setattr(localdeps, "run", initdb)
    monkeypatch.setattr(localdeps.shutil, "chown", lambda *a, **k: None)
    localdeps.init_cluster(Path("/usr/lib/postgresql/15/bin"), data, "stellarbase", "pw")
    assert seen == [str(scratch)]
    assert localdeps.cluster_ready(data) and not scratch.exists()
    assert oct(data.stat().st_mode)[-3:] == "700"


def test_a_change_of_the_local_redis_restarts_redis_only(binary: Path) -> None:
    """Each local server's restart digest covers its own inputs: a new Redis port or
    password must not restart PostgreSQL (and with it every open connection)."""
    facts = _local_facts(binary)

    def digests(*sets: str) -> dict[str, str]:
        plan = make_plan(load_config(sets=list(sets), env={}).config, HostPaths(), facts)
        return {s.unit: s.digest for s in plan.steps if isinstance(s, StartUnit)}

    before, after = digests(), digests("local.redis.port=8380")
    assert after[REDIS_UNIT] != before[REDIS_UNIT]
    assert after[POSTGRES_UNIT] == before[POSTGRES_UNIT]
