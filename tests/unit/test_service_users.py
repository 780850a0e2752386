"""One user per service and per local server, and the move from the one shared user.

Installs into a temp root (files only; systemd-sysusers --root creates the users there).
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from stellarbase import facts, layout, render
from stellarbase.commands.install import install
from stellarbase.configload import load_config
from stellarbase.envfile import read_env_file
from stellarbase.facts import Facts
from stellarbase.localdeps import ServerBinary
from stellarbase.paths import LEGACY_USER, HostPaths
from stellarbase.plan import with_local_servers
from stellarbase.reown import hand_back, reown_tree
from stellarbase.service_settings import service_credentials
from tests.filetree import file_states

pytestmark = pytest.mark.host_commands  # systemd-sysusers --root=<tmp> creates the users

OLD, NEW = 4242, 4343


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    path = tmp_path / "stellarbase-bin"
    path.write_bytes(b"#!/bin/sh\necho fake release\n")
    return path


def _canaries(root: Path) -> tuple[Path, Path]:
    """A root-only file and a root-owned directory outside the data, that links point at."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    canary = root / "etc" / "canary"
    canary.write_text("root's own")
    canary.chmod(0o600)
    outside = root / "etc" / "canary.d"
    outside.mkdir()
    (outside / "inner").write_text("root's too")
    return canary, outside


def test_reowning_never_follows_a_link_the_old_owner_planted(tmp_path: Path) -> None:
    canary, outside = _canaries(tmp_path)
    before = file_states(canary, outside)
    data = tmp_path / "data"
    (data / "base").mkdir(parents=True)
    (data / "base" / "16384").write_text("rows")
    (data / "base" / "to-file").symlink_to(canary)
    (data / "to-dir").symlink_to(outside)
    (data / "roots").write_text("left by root")
    for path in [data, data / "base", data / "base" / "16384", data / "to-dir"]:
        os.chown(path, OLD, OLD, follow_symlinks=False)
    os.chown(data / "base" / "to-file", OLD, OLD, follow_symlinks=False)

    assert reown_tree(data, OLD, NEW, NEW) == 5
    assert file_states(canary, outside) == before
    for path in [data, data / "base", data / "base" / "16384", data / "to-dir"]:
        assert path.lstat().st_uid == NEW and path.lstat().st_gid == NEW, path
    assert (data / "base" / "to-file").lstat().st_uid == NEW
    assert (data / "roots").stat().st_uid == 0  # not the old owner's: left as it was
    assert reown_tree(data, OLD, NEW, NEW) == 0


def _legacy_host(root: Path, binary: Path) -> HostPaths:
    """A host as a release that ran everything as `stellarbase` left it: its data and
    WAL spool owned by that user, secrets.env readable by its group."""
    install(load_config(sets=["backup.repository=file:///srv/backups"], env={}),
                       HostPaths(root), binary)  # fmt: skip
    paths = HostPaths(root)
    legacy = root / "legacy-sysusers.conf"
    legacy.write_text(f'u {LEGACY_USER} - "StellarBase services" /var/lib/stellarbase\n')
    subprocess.run(["systemd-sysusers", f"--root={root}", str(legacy)], check=True)
    uid, gid = facts.lookup_ids(paths, LEGACY_USER, LEGACY_USER)
    (paths.postgres_data / "PG_VERSION").write_text("15\n")
    (paths.postgres_data / "global").mkdir()
    (paths.postgres_data / "global" / "pg_control").write_bytes(b"control")
    (paths.postgres_data / "base").mkdir()
    (paths.postgres_data / "base" / "16384").write_bytes(b"canary rows")
    (paths.redis_data / "appendonly.aof").write_bytes(b"*1\r\n")
    (paths.wal_spool / "archived").mkdir()
    for top in (paths.postgres_data, paths.redis_data, paths.wal_spool, root / "srv/backups"):
        for path in [top, *top.rglob("*")]:
            os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(paths.postgres_data, 0o700)
    os.chown(paths.secrets_file, 0, gid)
    os.chmod(paths.secrets_file, 0o640)
    return paths


def test_an_install_of_the_shared_user_release_is_reowned_keeping_every_secret(
    tmp_path: Path, binary: Path
) -> None:
    root = tmp_path / "root"
    canary, outside = _canaries(root)
    paths = _legacy_host(root, binary)
    secrets = read_env_file(paths.secrets_file)
    before = file_states(canary, outside)
    legacy_uid, _ = facts.lookup_ids(paths, LEGACY_USER, LEGACY_USER)
    # What the old user could plant in its data before the move.
    (paths.postgres_data / "base" / "evil").symlink_to(canary)
    os.chown(paths.postgres_data / "base" / "evil", legacy_uid, legacy_uid, follow_symlinks=False)
    (paths.redis_data / "evil.d").symlink_to(outside)
    os.chown(paths.redis_data / "evil.d", legacy_uid, legacy_uid, follow_symlinks=False)

    loaded = load_config(sets=["backup.repository=file:///srv/backups"], env={})
    result = install(loaded, paths, binary)
    details = {s.step: s.detail for s in result.steps}
    pg_step = f"re-own {paths.postgres_data} from stellarbase (stellarbase-pg:stellarbase-pg)"
    assert details[pg_step] == "re-owned from stellarbase to stellarbase-pg: 7 entries"

    assert file_states(canary, outside) == before
    for top, user in [
        (paths.postgres_data, "stellarbase-pg"),
        (paths.redis_data, "stellarbase-redis"),
        (paths.wal_spool, "stellarbase-agent"),
        (root / "srv/backups", "stellarbase-agent"),
    ]:
        uid, gid = facts.lookup_ids(paths, user, user)
        for path in [top, *top.rglob("*")]:
            assert (path.lstat().st_uid, path.lstat().st_gid) == (uid, gid), path
    assert stat.S_IMODE(paths.postgres_data.stat().st_mode) == 0o750
    assert (paths.postgres_data / "base" / "16384").read_bytes() == b"canary rows"
    # Every secret kept, root's alone now; a second run changes nothing.
    assert read_env_file(paths.secrets_file) == secrets
    st = paths.secrets_file.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
    given = {**read_env_file(paths.credentials_file("api")),
             **read_env_file(paths.credentials_file("agent"))}  # fmt: skip
    assert given == secrets
    assert install(loaded, paths, binary).changed == 0


def test_each_unit_names_its_own_user_and_only_its_own_credentials(binary: Path) -> None:
    env = {
        "STELLARBASE_S3__ACCESS_KEY": "ak",
        "STELLARBASE_S3__SECRET_KEY": "sk",
        "STELLARBASE_BACKUP__ENCRYPTION_KEY": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        "STELLARBASE_AGENT__METRICS_TOKEN": "tok",
    }
    sets = ["s3.bucket=backups", "backup.repository=s3", "agent.remote_port=9443"]
    local = layout.LocalServers(
        ServerBinary(Path("/usr/lib/postgresql/15/bin"), (15,)),
        ServerBinary(Path("/usr/bin/redis-server"), (7, 0)),
    )
    generated = {"STELLARBASE_POSTGRES__PASSWORD": "pg", "STELLARBASE_REDIS__PASSWORD": "rd"}
    host = Facts("0.1.0", binary, "digest", local=local, generated=tuple(generated.items()))
    config = with_local_servers(load_config(sets=sets, env=env).config, host)
    units = render.render_units(config, HostPaths(), local, ("GPU-1",))
    database = sorted(generated)
    expected = {
        "stellarbase-api.service": ("stellarbase-api", database),
        "stellarbase-worker@.service": ("stellarbase-worker", database),
        "stellarbase-agent.service": ("stellarbase-agent", sorted([*env, *generated])),
        "stellarbase-inference@.service": ("stellarbase-inference", []),
        "stellarbase-postgres.service": ("stellarbase-pg", []),
        "stellarbase-redis.service": ("stellarbase-redis", []),
    }
    units_of = {
        "api": "stellarbase-api.service",
        "worker": "stellarbase-worker@.service",
        "agent": "stellarbase-agent.service",
        "inference": "stellarbase-inference@.service",
    }
    for unit, (user, credentials) in expected.items():
        lines = units[unit].splitlines()
        assert f"User={user}" in lines and f"Group={user}" in lines, unit
        files = [line for line in lines if line.startswith("EnvironmentFile=/etc/stellarbase/c")]
        service = user.removeprefix("stellarbase-")
        own = [f"EnvironmentFile=/etc/stellarbase/credentials/{service}.env"] if credentials else []
        assert files == own, unit
    for service in ("api", "worker", "agent", "inference"):
        given = sorted(service_credentials(config, service))  # type: ignore[arg-type]
        assert given == expected[units_of[service]][1], service
    assert service_credentials(config, "inference") == {}
    assert "SupplementaryGroups=stellarbase stellarbase-pg" in units["stellarbase-agent.service"]
    assert "SocketGroup=stellarbase-agent" in units["stellarbase-supervise.socket"]


def test_rollback_to_the_shared_user_release_hands_the_data_back(
    tmp_path: Path, binary: Path
) -> None:
    root = tmp_path / "root"
    paths = _legacy_host(root, binary)
    loaded = load_config(sets=["backup.repository=file:///srv/backups"], env={})
    install(loaded, paths, binary)  # re-owned by this release
    canary, outside = _canaries(root)
    before = file_states(canary, outside)
    pg_uid, _ = facts.lookup_ids(paths, "stellarbase-pg", "root")
    (paths.postgres_data / "base" / "evil").symlink_to(canary)
    os.chown(paths.postgres_data / "base" / "evil", pg_uid, pg_uid, follow_symlinks=False)

    done = hand_back(paths, "file:///srv/backups")
    assert len(done) == 4, done
    uid, gid = facts.lookup_ids(paths, LEGACY_USER, "stellarbase")
    for top in (paths.postgres_data, paths.redis_data, paths.wal_spool, root / "srv/backups"):
        for path in [top, *top.rglob("*")]:
            assert (path.lstat().st_uid, path.lstat().st_gid) == (uid, gid), path
    assert file_states(canary, outside) == before
    assert hand_back(paths, "file:///srv/backups") == []  # nothing left to hand back
