"""A temporary postmaster for recovery: private socket and pg_hba, started as the data's owner."""

from __future__ import annotations

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

import structlog

from stellarbase.backup.prefetch import Prefetcher
from stellarbase.errors import ExitCode, StellarError

log = structlog.get_logger()

STOP_DEADLINE_S = 60.0
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
        """Fast shutdown (SIGINT), then SIGKILL after a deadline; removes the socket dir."""
        if self.process.poll() is None:
            self.process.send_signal(2)
            try:
                self.process.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_DEADLINE_S)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def log_tail(self, lines: int = 5) -> list[str]:
        try:
            return self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []


# Only the local socket (a 0700 directory of the cluster's account) lets anyone in, so
# nothing reaches the restored cluster over the network before it is checked.
_PRIVATE_HBA = "local all all trust\nlocal replication all trust\n"


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
