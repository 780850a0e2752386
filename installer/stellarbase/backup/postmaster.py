"""A temporary postmaster for recovery: private socket and pg_hba, started as the data's owner.

It runs on a restored data directory whose postgresql.auto.conf came with the backup:
archiving, every `*_command` and the preload libraries of the cluster that was backed up.
Left alone, the recovery server would archive its new timeline through the live
cluster's archive_command and spool, and a fast shutdown would wait on that archiver.
`recovery_overrides` turns all of it off on the command line, where a setting wins over
postgresql.auto.conf, and `Cluster.stop` returns only once every process of it is gone.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog

from stellarbase.backup.prefetch import Prefetcher
from stellarbase.errors import ExitCode, StellarError

log = structlog.get_logger()

STOP_DEADLINE_S = 60.0  # for a fast shutdown; then SIGKILL
KILL_WAIT_S = 10.0  # for killed processes to be gone
SUPERUSER = "postgres"


def chown_tree(root: Path, owner: pwd.struct_passwd) -> None:
    os.chown(root, owner.pw_uid, owner.pw_gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), owner.pw_uid, owner.pw_gid, follow_symlinks=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Cluster:
    """A postmaster this module started; reachable only over its private Unix socket."""

    data_dir: Path
    port: int
    socket_dir: Path
    log_file: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def conninfo(self, dbname: str = "postgres", user: str = SUPERUSER) -> dict[str, Any]:
        return {
            "host": str(self.socket_dir),
            "port": self.port,
            "user": user,
            "dbname": dbname,
            "connect_timeout": 5,
        }

    def stop(self) -> None:
        """Fast shutdown (SIGINT); after a deadline SIGKILL to the postmaster and every
        process it started. Returns once none is left; removes the socket dir, and a
        postmaster.pid that a killed postmaster could not remove."""
        family = _descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(2)
            try:
                self.process.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                log.warning(
                    "recovery server ignored a fast shutdown: killing it", pid=self.process.pid
                )
                family = [*family, *_descendants(self.process.pid)]
                self.process.kill()
                self.process.wait(timeout=KILL_WAIT_S)
        # A postmaster that exited cleanly has reaped its children; these are only the
        # ones a killed postmaster left behind (now children of init).
        _gone, alive = psutil.wait_procs(family, timeout=0)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=KILL_WAIT_S)
        _remove_stale_pidfile(self.data_dir, self.process.pid)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def log_tail(self, lines: int = 5) -> list[str]:
        try:
            return self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []


# Only the local socket (a 0700 directory of the cluster's account) lets anyone in, so
# nothing reaches the restored cluster over the network before it is checked.
_PRIVATE_HBA = "local all all trust\nlocal replication all trust\n"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _remove_stale_pidfile(data_dir: Path, pid: int) -> None:
    """postmaster.pid of our postmaster, now dead (a killed one cannot remove it)."""
    pidfile = data_dir / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError):
        if int(pidfile.read_text().split("\n", 1)[0]) == pid:
            pidfile.unlink()


def recovery_overrides(data_dir: Path) -> dict[str, str]:
    """Settings that keep a recovery server to itself, whatever the backup's
    postgresql.auto.conf says: no archiving, no other command, no preloaded library."""
    major = int((data_dir / "PG_VERSION").read_text().strip().split(".")[0])
    settings = {
        "archive_mode": "off",
        "archive_command": "",
        "archive_cleanup_command": "",
        "recovery_end_command": "",
        "ssl": "off",
        "ssl_passphrase_command": "",
        "shared_preload_libraries": "",
        "session_preload_libraries": "",
        "local_preload_libraries": "",
    }
    if major >= 15:  # archive modules arrived in 15; 14 refuses an unknown setting
        settings["archive_library"] = ""
    return settings


def mark_history_for_archiving(data_dir: Path, owner: pwd.struct_passwd) -> None:
    """Have the live server archive the history file of the timeline the restore began.

    The recovery server promoted without archiving (`recovery_overrides`), so
    PostgreSQL never marked the new `<timeline>.history` `.ready`, and a server archives
    only what is marked: without the file in the repository, no later restore can follow
    that timeline. A history file with no status yet gets the `.ready` PostgreSQL writes
    itself; the live archive_command still decides when it is archived.
    """
    status = data_dir / "pg_wal" / "archive_status"
    for history in sorted((data_dir / "pg_wal").glob("*.history")):
        if any((status / f"{history.name}{end}").exists() for end in (".ready", ".done")):
            continue
        # Root in the cluster owner's directory: never through a link planted there.
        fd = os.open(
            status / f"{history.name}.ready",
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
            0o600,
        )
        try:
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
        finally:
            os.close(fd)


def start_postmaster(
    data_dir: Path,
    bindir: Path,
    owner: pwd.struct_passwd,
    *,
    port: int | None = None,
    settings: Mapping[str, str] | None = None,
    log_file: Path | None = None,
) -> Cluster:
    socket_dir = Path(tempfile.mkdtemp(prefix="sb-restore-"))
    (socket_dir / "pg_hba.conf").write_text(_PRIVATE_HBA)
    chown_tree(socket_dir, owner)
    socket_dir.chmod(0o700)
    port = port or free_port()
    log_file = log_file or data_dir / "log" / "stellarbase-restore.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    os.chown(log_file.parent, owner.pw_uid, owner.pw_gid)
    all_settings = {
        **recovery_overrides(data_dir),
        "port": str(port),
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(socket_dir),
        "hba_file": str(socket_dir / "pg_hba.conf"),
        "logging_collector": "off",
        **(settings or {}),
    }
    argv = [str(bindir / "postgres"), "-D", str(data_dir)]
    for name, value in all_settings.items():
        argv += ["-c", f"{name}={value}"]
    log.debug("start postmaster", argv=argv)
    with open(log_file, "ab") as out:
        # A long-running server, not a command: the one-shot wrapper in run.py does not fit.
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            env={"LANG": "C.UTF-8", "PATH": "/usr/bin:/bin", "HOME": owner.pw_dir},
            user=owner.pw_uid,
            group=owner.pw_gid,
            extra_groups=os.getgrouplist(owner.pw_name, owner.pw_gid),
        )
    return Cluster(data_dir, port, socket_dir, log_file, process)


def _promoted(cluster: Cluster) -> bool:
    import psycopg

    try:
        with psycopg.connect(**cluster.conninfo(), autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    except psycopg.Error:
        return False
    return row is not None and row[0] is False


def wait_promoted(cluster: Cluster, prefetcher: Prefetcher | None, deadline_s: float) -> None:
    """Until recovery has ended and the cluster runs read-write; stops it on failure."""
    deadline = time.monotonic() + deadline_s
    while not _promoted(cluster):
        failure = None
        if prefetcher is not None and prefetcher.error:
            failure = prefetcher.error
        elif cluster.process.poll() is not None:
            failure = f"PostgreSQL stopped during recovery (exit {cluster.process.returncode})"
        elif time.monotonic() > deadline:
            failure = f"recovery did not finish within {deadline_s:.0f} s"
        if failure is not None:
            cluster.stop()
            tail = cluster.log_tail()
            raise StellarError(
                f"{failure}; {cluster.data_dir} is left half-restored",
                hint=f"see {cluster.log_file}; fix the cause and restore again with --force",
                code=ExitCode.BACKUP,
            ).with_details(tail)
        time.sleep(0.2)
