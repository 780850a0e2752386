"""Root never writes, chowns, chmods, reads or deletes through a path another account can change.

Each test plays the unprivileged account (`nobody` owns the directories it could write
on a real host) planting a link, a hard link or a swapped temp file in a directory root
works in; a root-owned canary outside must keep its content, owner and mode, and nothing
may be created next to it. The tests run as root, as the installer does.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stellarbase import fdops
from stellarbase.backup import postmaster, restore
from stellarbase.backup.filerepo import FileRepository
from stellarbase.backup.prefetch import HEARTBEAT, Prefetcher
from stellarbase.errors import ExitCode, StellarError
from stellarbase.files import copy_atomic, write_atomic

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root plants and checks owners")

NOBODY = pwd.getpwnam("nobody")
CANARY = b"root's own file\n"


class Canary:
    """A root-owned file (0644) in a root-owned directory that no test may touch."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "outside"
        self.dir.mkdir(mode=0o755)
        self.file = self.dir / "canary"
        self.file.write_bytes(CANARY)
        self.file.chmod(0o644)

    def assert_untouched(self) -> None:
        st = self.file.lstat()
        assert self.file.read_bytes() == CANARY
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
        dst = self.dir.stat()
        assert (dst.st_uid, stat.S_IMODE(dst.st_mode)) == (0, 0o755)
        assert sorted(os.listdir(self.dir)) == ["canary"], "something was created outside"


@pytest.fixture
def canary(tmp_path: Path) -> Canary:
    return Canary(tmp_path)


def users_dir(path: Path) -> Path:
    """A directory the unprivileged account owns (and so can plant links in)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    return path


def plant(link: Path, target: Path) -> None:
    """A symlink made by the unprivileged account."""
    link.symlink_to(target)
    os.lchown(link, NOBODY.pw_uid, NOBODY.pw_gid)


# --------------------------------------------------------------------------- files


def test_write_atomic_sets_mode_and_owner_on_its_own_file_even_when_the_temp_is_swapped(
    tmp_path: Path, canary: Canary
) -> None:
    """The account swaps the temp file for a link while root fills it (a FIFO as the
    source holds the write open): mode and owner go to root's file, never the canary."""
    dest_dir = users_dir(tmp_path / "data")
    source = tmp_path / "source"
    os.mkfifo(source)

    def racing_user() -> None:
        with open(source, "wb") as feed:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                temps = [n for n in os.listdir(dest_dir) if n.startswith(".conf.")]
                if temps:
                    for name in temps:
                        (dest_dir / name).unlink()
                        plant(dest_dir / name, canary.file)
                    break
                time.sleep(0.005)
            feed.write(b"new content\n")

    racer = threading.Thread(target=racing_user)
    racer.start()
    with contextlib.suppress(OSError):  # refusing is fine; touching the canary is not
        copy_atomic(dest_dir / "conf", source, mode=0o600, uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)
    racer.join()
    canary.assert_untouched()


def test_write_atomic_refuses_a_directory_link_planted_on_its_path(
    tmp_path: Path, canary: Canary
) -> None:
    data = users_dir(tmp_path / "data")
    plant(data / "sub", canary.dir)
    with pytest.raises(fdops.UnsafePath) as caught:
        write_atomic(data / "sub" / "canary", b"x", mode=0o666, uid=NOBODY.pw_uid)
    assert caught.value.code == ExitCode.HOST and "symbolic link" in caught.value.message
    canary.assert_untouched()


def test_write_atomic_replaces_a_link_at_its_destination_instead_of_following_it(
    tmp_path: Path, canary: Canary
) -> None:
    data = users_dir(tmp_path / "data")
    plant(data / "postgresql.auto.conf", canary.file)
    write_atomic(data / "postgresql.auto.conf", b"x = 1\n", mode=0o600, uid=NOBODY.pw_uid)
    assert not (data / "postgresql.auto.conf").is_symlink()
    assert (data / "postgresql.auto.conf").read_bytes() == b"x = 1\n"
    canary.assert_untouched()


# --------------------------------------------------------------------------- the spool


def test_prefetch_spool_writes_never_follow_planted_part_files(
    tmp_path: Path, canary: Canary
) -> None:
    """The temp names the prefetcher used (`.<name>.part`) and every name it answers
    are planted as links; the heartbeat and a `.missing` answer still land in the spool."""
    spool = users_dir(tmp_path / "spool")
    wanted = "000000010000000000000009"
    for name in (HEARTBEAT, f"{wanted}.missing"):
        plant(spool / f".{name}.part", canary.file)
    (spool / f"{wanted}.want").touch()
    catalog: Any = SimpleNamespace(wal={})  # the wanted segment is not in the repository
    with Prefetcher(catalog, spool, [wanted], NOBODY):
        deadline = time.monotonic() + 5
        while not (spool / f"{wanted}.missing").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert (spool / f"{wanted}.missing").exists()
    beat = (spool / HEARTBEAT).lstat()
    assert stat.S_ISREG(beat.st_mode) and beat.st_uid == NOBODY.pw_uid
    canary.assert_untouched()


# --------------------------------------------------------------------------- data directory


def test_chown_tree_refuses_a_hard_link_to_a_file_outside(tmp_path: Path, canary: Canary) -> None:
    """On a host without protected_hardlinks the account can link root's file into its tree."""
    tree = users_dir(tmp_path / "data")
    (tree / "base").mkdir()
    os.link(canary.file, tree / "base" / "16384")
    with pytest.raises(fdops.UnsafePath, match="hard links"):
        postmaster.chown_tree(tree, NOBODY)
    (tree / "base" / "16384").unlink()
    canary.assert_untouched()


def test_chown_tree_changes_links_not_their_targets(tmp_path: Path, canary: Canary) -> None:
    tree = users_dir(tmp_path / "data")
    plant(tree / "pg_wal", canary.dir)
    plant(tree / "PG_VERSION", canary.file)
    postmaster.chown_tree(tree, NOBODY)
    assert (tree / "pg_wal").lstat().st_uid == NOBODY.pw_uid
    canary.assert_untouched()


def test_restore_settings_never_read_or_write_through_a_planted_auto_conf(
    tmp_path: Path, canary: Canary
) -> None:
    """After recovery root strips its settings from postgresql.auto.conf: a link there
    must neither be followed for writing nor copy root's file into the account's file."""
    data = users_dir(tmp_path / "data")
    plant(data / "postgresql.auto.conf", canary.file)
    with pytest.raises(fdops.UnsafePath, match=r"postgresql\.auto\.conf"):
        restore.clear_recovery_settings(data, NOBODY)
    assert (data / "postgresql.auto.conf").is_symlink()
    canary.assert_untouched()


def test_history_marking_refuses_a_planted_archive_status_link(
    tmp_path: Path, canary: Canary
) -> None:
    data = users_dir(tmp_path / "data")
    users_dir(data / "pg_wal")
    (data / "pg_wal" / "00000002.history").write_text("1\t0/3000000\tno recovery target\n")
    plant(data / "pg_wal" / "archive_status", canary.dir)
    with pytest.raises(fdops.UnsafePath, match="archive_status"):
        postmaster.mark_history_for_archiving(data, NOBODY)
    canary.assert_untouched()


def test_recovery_server_log_is_never_opened_through_a_planted_link(
    tmp_path: Path, canary: Canary
) -> None:
    """A link in place of the log directory (or the log) is refused before any server
    starts: root would otherwise chown the directory it points to and append to it."""
    data = users_dir(tmp_path / "data")
    (data / "PG_VERSION").write_text("18\n")
    plant(data / "log", canary.dir)
    with pytest.raises(StellarError):
        postmaster.start_postmaster(data, tmp_path / "no-bindir", NOBODY)
    (data / "log").unlink()
    users_dir(data / "log")
    plant(data / "log" / "stellarbase-restore.log", canary.file)
    with pytest.raises(StellarError):
        postmaster.start_postmaster(data, tmp_path / "no-bindir", NOBODY)
    (data / "log" / "stellarbase-restore.log").unlink()
    os.mkfifo(data / "log" / "stellarbase-restore.log")  # would block an open for writing
    with pytest.raises(StellarError, match="not a regular file"):
        postmaster.start_postmaster(data, tmp_path / "no-bindir", NOBODY)
    canary.assert_untouched()


def test_claimed_data_dir_is_roots_and_empty_and_its_links_are_removed_not_followed(
    tmp_path: Path, canary: Canary
) -> None:
    data = users_dir(tmp_path / "data")
    plant(data / "base", canary.dir)
    plant(data / "global", canary.file)
    fdops.claim_dir(data)
    st = data.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode), os.listdir(data)) == (0, 0o700, [])
    canary.assert_untouched()


# --------------------------------------------------------------------------- file://


def repo_with_user_dirs(tmp_path: Path) -> FileRepository:
    """A file:// repository whose directories the archiver's account owns."""
    root = users_dir(tmp_path / "repo")
    for sub in ("wal", "backups"):
        users_dir(root / sub)
    return FileRepository(root)


def test_file_repository_put_refuses_a_planted_directory_link(
    tmp_path: Path, canary: Canary
) -> None:
    repo = repo_with_user_dirs(tmp_path)
    plant(repo.root / "backups" / "20261122T140000Z", canary.dir)
    with pytest.raises(fdops.UnsafePath, match="symbolic link"):
        repo.put("backups/20261122T140000Z/manifest.json", b"{}", {"sha256": "x"})
    with pytest.raises(fdops.UnsafePath):
        repo.open_write("backups/20261122T140000Z/base.tar.zst", {})
    canary.assert_untouched()


def test_file_repository_expire_unlinks_only_inside_the_repository(
    tmp_path: Path, canary: Canary
) -> None:
    repo = repo_with_user_dirs(tmp_path)
    plant(repo.root / "backups" / "20261122T140000Z", canary.dir)
    plant(repo.root / "wal" / "000000010000000000000001", canary.file)
    with pytest.raises(fdops.UnsafePath):
        repo.delete(["backups/20261122T140000Z/canary"])
    repo.delete(["wal/000000010000000000000001"])  # the link itself goes
    assert not (repo.root / "wal" / "000000010000000000000001").is_symlink()
    canary.assert_untouched()


def test_file_repository_reads_no_object_through_a_link(tmp_path: Path, canary: Canary) -> None:
    """A link in place of an object would hand root's file to the restore (and so to the
    restored cluster's account); it is refused, and listing skips it."""
    repo = repo_with_user_dirs(tmp_path)
    repo.put("wal/000000010000000000000002", b"segment", {})
    plant(repo.root / "wal" / "000000010000000000000003", canary.file)
    with pytest.raises(fdops.UnsafePath):
        repo.get("wal/000000010000000000000003")
    with pytest.raises(fdops.UnsafePath):
        repo.head("wal/000000010000000000000003")
    assert [o.key for o in repo.list("wal/")] == ["wal/000000010000000000000002"]
    assert repo.get("wal/000000010000000000000002") == b"segment"
    canary.assert_untouched()


# --------------------------------------------------------------------------- the recovery server


@pytest.mark.parametrize("major", [15, 17, 18])
def test_recovery_server_loads_no_library_and_runs_no_command(tmp_path: Path, major: int) -> None:
    (tmp_path / "PG_VERSION").write_text(f"{major}\n")
    overrides = postmaster.recovery_overrides(tmp_path)
    for name in (
        "shared_preload_libraries",
        "session_preload_libraries",
        "local_preload_libraries",
        "archive_command",
        "archive_library",
        "archive_cleanup_command",
        "recovery_end_command",
        "ssl_passphrase_command",
        "external_pid_file",
    ):
        assert overrides[name] == "", name
    assert overrides["dynamic_library_path"] == "$libdir"
    assert (overrides["jit"], overrides["archive_mode"], overrides["ssl"]) == ("off",) * 3
    assert ("event_triggers" in overrides) == (major >= 17)
    assert overrides.get("oauth_validator_libraries", "") == ""
    assert ("extension_control_path" in overrides) == (major >= 18)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("base/16384/evil.so", b"not even ELF"),
        ("pg_stat_statements.so.1", b"x"),
        ("global/99999", b"\x7fELF\x02\x01\x01" + b"\0" * 64),
    ],
)
def test_a_data_dir_carrying_code_is_refused_naming_the_file(
    tmp_path: Path, name: str, content: bytes
) -> None:
    data = tmp_path / "data"
    (data / "base" / "16384").mkdir(parents=True)
    (data / "global").mkdir()
    (data / "base" / "16384" / "1259").write_bytes(b"\0" * 8192)
    (data / name).write_bytes(content)
    with pytest.raises(StellarError) as caught:
        postmaster.refuse_code(data, "20261122T140000Z")
    assert caught.value.code == ExitCode.BACKUP
    assert name in caught.value.message and "20261122T140000Z" in caught.value.message


def test_a_plain_data_dir_is_not_refused(tmp_path: Path) -> None:
    (tmp_path / "base" / "1").mkdir(parents=True)
    (tmp_path / "base" / "1" / "1259").write_bytes(b"\0" * 8192)
    (tmp_path / "postgresql.auto.conf").write_text("shared_preload_libraries = 'x'\n")
    postmaster.refuse_code(tmp_path, "b1")


def test_the_recovery_unit_carries_the_postgresql_units_hardening() -> None:
    properties = postmaster.sandbox_properties()
    for wanted in (
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "ProtectSystem=strict",
        "PrivateDevices=yes",
        "MemoryDenyWriteExecute=yes",
        "RestrictSUIDSGID=yes",
        "SystemCallFilter=@system-service",
    ):
        assert wanted in properties
