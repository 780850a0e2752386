"""A temporary postmaster for recovery: private socket and pg_hba, started as the data's owner.

It runs on a restored data directory whose postgresql.auto.conf came with the backup:
archiving, every `*_command` and the preload libraries of the cluster that was backed up.
Left alone, the recovery server would archive its new timeline through the live
cluster's archive_command and spool, and a fast shutdown would wait on that archiver;
a hostile backup would have it load its own `.so`. `recovery_overrides` turns off every
setting that loads code or runs a command on the command line, where a setting wins over
postgresql.auto.conf; `refuse_code` refuses a data directory that carries a shared object
or executable; with systemd running, the server runs as a transient unit with the local
PostgreSQL unit's sandbox (`systemd-run`). `Cluster.stop` returns only once every process
of it is gone.

The data directory belongs to the cluster's account, which can plant links in it: root
touches it only through directory fds (`fdops`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog

from stellarbase import fdops, resources, systemd
from stellarbase.backup.prefetch import Prefetcher
from stellarbase.errors import ExitCode, StellarError
from stellarbase.proc import run

log = structlog.get_logger()

STOP_DEADLINE_S = 60.0  # for a fast shutdown; then SIGKILL
KILL_WAIT_S = 10.0  # for killed processes to be gone
SUPERUSER = "postgres"


def chown_tree(root: Path, owner: pwd.struct_passwd) -> None:
    fdops.chown_tree(root, owner.pw_uid, owner.pw_gid)


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
    unit: str | None = None  # the transient systemd unit it runs in, if any

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
        if self.unit is not None:
            self._stop_unit(self.unit)
            return
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

    def _stop_unit(self, unit: str) -> None:
        """The unit's KillSignal=SIGINT is the fast shutdown; systemd sends SIGKILL to the
        whole cgroup after TimeoutStopSec=, and `systemctl stop` waits for it."""
        main_pid = 0
        with contextlib.suppress(StellarError):  # stopping matters more than the pidfile
            main_pid = systemd.show([unit])[unit].main_pid
        run(["systemctl", "stop", unit], check=False, timeout=STOP_DEADLINE_S + KILL_WAIT_S + 5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=KILL_WAIT_S)
        if main_pid:
            _remove_stale_pidfile(self.data_dir, main_pid)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def log_tail(self, lines: int = 5) -> list[str]:
        """The last lines of the log, read without following a link planted in its place."""
        path = self.log_file
        try:
            with fdops.opened(fdops.open_dir(path.parent)) as dir_fd:
                fd = fdops.open_file(dir_fd, path.name, os.O_RDONLY, str(path))
            with os.fdopen(fd, "rb") as f:
                f.seek(max(0, os.fstat(fd).st_size - 65536))
                data = f.read(65536)
        except (OSError, StellarError):
            return []
        return data.decode(errors="replace").splitlines()[-lines:]


# Only the local socket (a 0700 directory of the cluster's account) lets anyone in, so
# nothing reaches the restored cluster over the network before it is checked.
_PRIVATE_HBA = "local all all trust\nlocal replication all trust\n"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def running_postmaster(data_dir: Path) -> int | None:
    """The PID in postmaster.pid when that process is alive."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by another user
    return pid


def _remove_stale_pidfile(data_dir: Path, pid: int) -> None:
    """postmaster.pid of our postmaster, now dead (a killed one cannot remove it)."""
    with (
        contextlib.suppress(OSError, ValueError, StellarError),
        fdops.opened(fdops.open_dir(data_dir)) as dir_fd,
    ):
        text = (fdops.read_at(dir_fd, "postmaster.pid", "postmaster.pid") or b"").decode()
        if int(text.split("\n", 1)[0]) == pid:
            os.unlink("postmaster.pid", dir_fd=dir_fd)


# Every setting that loads a library or runs a command (PostgreSQL 14-18), the value that
# does neither, and the first major version that knows it: a server refuses to start
# with a setting it does not know. restore_command is ours (restore.recovery_settings).
_NO_CODE: tuple[tuple[str, str, int], ...] = (
    ("archive_mode", "off", 0),
    ("archive_command", "", 0),
    ("archive_library", "", 15),
    ("archive_cleanup_command", "", 0),
    ("recovery_end_command", "", 0),
    ("ssl", "off", 0),
    ("ssl_passphrase_command", "", 0),
    ("shared_preload_libraries", "", 0),
    ("session_preload_libraries", "", 0),
    ("local_preload_libraries", "", 0),
    ("dynamic_library_path", "$libdir", 0),
    ("jit", "off", 0),
    ("jit_provider", "llvmjit", 0),
    ("external_pid_file", "", 0),
    ("event_triggers", "off", 17),  # login event triggers run on every connection
    ("oauth_validator_libraries", "", 18),
    ("extension_control_path", "$system", 18),
)


def recovery_overrides(data_dir: Path) -> dict[str, str]:
    """Settings that keep a recovery server to itself, whatever the backup's
    postgresql.auto.conf says: no archiving, no command, no library but PostgreSQL's own."""
    version = fdops.read_file(data_dir / "PG_VERSION", 64) or b""
    major = int(version.decode().strip().split(".")[0])
    return {name: value for name, value, since in _NO_CODE if major >= since}


_ELF = b"\x7fELF"


def find_code(data_dir: Path) -> str | None:
    """The first file under `data_dir` that could be loaded or run as code: an ELF object
    (shared library, executable) or a file named like a shared library. PostgreSQL keeps
    neither in a data directory."""
    with fdops.opened(fdops.open_dir(data_dir)) as top:
        for dirpath, _dirs, files, dfd in os.fwalk(".", dir_fd=top):
            for name in sorted(files):
                where = os.path.normpath(os.path.join(dirpath, name))
                if name.endswith(".so") or ".so." in name:
                    return where
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or st.st_size < len(_ELF):
                    continue
                with os.fdopen(os.open(name, fdops.READ_FLAGS, dir_fd=dfd), "rb") as f:
                    if f.read(len(_ELF)) == _ELF:
                        return where
    return None


def refuse_code(data_dir: Path, backup_id: str) -> None:
    """Refuse (exit 9) a restored data directory that carries code, before any server
    runs; what was extracted is removed, so that nobody starts a server on it by hand."""
    found = find_code(data_dir)
    if found is not None:
        with fdops.opened(fdops.open_dir(data_dir)) as dir_fd:
            fdops.empty_dir(dir_fd)
        raise StellarError(
            f"backup {backup_id} carries a shared object or executable in its data "
            f"directory: {found}; refused before recovery, the extracted copy is removed",
            hint="a PostgreSQL data directory holds no code: the backup may have been "
            "tampered with; restore another backup, or inspect this one with `backup verify`",
            code=ExitCode.BACKUP,
        )


def mark_history_for_archiving(data_dir: Path, owner: pwd.struct_passwd) -> None:
    """Have the live server archive the history file of the timeline the restore began.

    Root in the cluster's directory: through directory fds, never a link planted there.

    The recovery server promoted without archiving (`recovery_overrides`), so
    PostgreSQL never marked the new `<timeline>.history` `.ready`, and a server archives
    only what is marked: without the file in the repository, no later restore can follow
    that timeline. A history file with no status yet gets the `.ready` PostgreSQL writes
    itself; the live archive_command still decides when it is archived.
    """
    with (
        fdops.opened(fdops.open_dir(data_dir)) as top,
        fdops.opened(fdops.open_below(top, "pg_wal", where=str(data_dir))) as wal,
        fdops.opened(fdops.open_below(wal, "archive_status", where=f"{data_dir}/pg_wal")) as st,
    ):
        for name in sorted(n for n in os.listdir(wal) if n.endswith(".history")):
            if any(fdops.exists_at(st, f"{name}{end}") for end in (".ready", ".done")):
                continue
            with fdops.opened(os.open(f"{name}.ready", fdops.NEW_FILE, 0o600, dir_fd=st)) as fd:
                os.fchown(fd, owner.pw_uid, owner.pw_gid)


def systemd_running() -> bool:
    """sd_booted(3): systemd is PID 1 and can start transient units."""
    return os.path.isdir("/run/systemd/system") and shutil.which("systemd-run") is not None


def sandbox_properties() -> list[str]:
    """The hardening of the local PostgreSQL unit (units/_hardening.j2), as properties;
    a line that needs template values (`{{ }}`, `{% %}`) is not one of them."""
    text = (resources.units_dir() / "_hardening.j2").read_text()
    return [
        line.strip()
        for line in text.splitlines()
        if "=" in line and not line.lstrip().startswith("#") and "{" not in line
    ]


def _open_log(log_file: Path, owner: pwd.struct_passwd) -> int:
    """The recovery server's log, opened for appending by root in the cluster's directory:
    never through a link, a FIFO or a hard link planted there."""
    with fdops.opened(fdops.open_dir(log_file.parent.parent)) as parent:
        with contextlib.suppress(FileExistsError):
            os.mkdir(log_file.parent.name, 0o700, dir_fd=parent)
        where = str(log_file.parent)
        with fdops.opened(fdops.open_below(parent, log_file.parent.name, where=where)) as logs:
            os.fchown(logs, owner.pw_uid, owner.pw_gid)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            fd = fdops.open_file(logs, log_file.name, flags, str(log_file))
    os.fchown(fd, owner.pw_uid, owner.pw_gid)
    return fd


def _in_unit(
    unit: str, argv: list[str], data_dir: Path, socket_dir: Path, owner: pwd.struct_passwd
) -> list[str]:
    """`argv` as a transient unit with the PostgreSQL unit's sandbox; --pipe hands the
    unit our stdout (the log), --wait keeps systemd-run until the unit is gone."""
    properties = [
        *sandbox_properties(),
        f'ReadWritePaths="{data_dir}"',
        f'ReadWritePaths="{socket_dir}"',
        "KillMode=mixed",
        "KillSignal=SIGINT",
        f"TimeoutStopSec={STOP_DEADLINE_S:.0f}",
        "LimitNOFILE=65536",
    ]
    return [
        "systemd-run",
        "--quiet",
        "--pipe",
        "--wait",
        "--collect",
        "--service-type=exec",
        f"--unit={unit}",
        f"--uid={owner.pw_name}",
        f"--gid={owner.pw_gid}",
        f"--working-directory={data_dir}",
        "--setenv=LANG=C.UTF-8",
        *(f"--property={p}" for p in properties),
        "--",
        *argv,
    ]


def start_postmaster(
    data_dir: Path,
    bindir: Path,
    owner: pwd.struct_passwd,
    *,
    port: int | None = None,
    settings: Mapping[str, str] | None = None,
    log_file: Path | None = None,
) -> Cluster:
    """Start a recovery server on `data_dir` as `owner`: in a sandboxed transient unit
    when systemd runs, else as a plain child process (same settings, no sandbox)."""
    sandboxed = systemd_running()
    # /run, not /tmp: the unit's PrivateTmp= would hide a socket made in /tmp from us.
    socket_dir = Path(tempfile.mkdtemp(prefix="sb-restore-", dir="/run" if sandboxed else None))
    (socket_dir / "pg_hba.conf").write_text(_PRIVATE_HBA)
    chown_tree(socket_dir, owner)
    socket_dir.chmod(0o700)
    port = port or free_port()
    log_file = log_file or data_dir / "log" / "stellarbase-restore.log"
    all_settings = {
        **recovery_overrides(data_dir),
        "port": str(port),
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(socket_dir),
        "hba_file": str(socket_dir / "pg_hba.conf"),
        "logging_collector": "off",
        **(settings or {}),  # the caller's (a test archives a restored branch), not the backup's
    }
    argv = [str(bindir / "postgres"), "-D", str(data_dir)]
    for name, value in all_settings.items():
        argv += ["-c", f"{name}={value}"]
    unit = f"stellarbase-recovery-{port}-{os.getpid()}" if sandboxed else None
    if unit is not None:
        argv = _in_unit(unit, argv, data_dir, socket_dir, owner)
    log.debug("start postmaster", argv=argv)
    as_owner: dict[str, Any] = {}
    if unit is None:
        groups = os.getgrouplist(owner.pw_name, owner.pw_gid)
        as_owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": groups}
    with fdops.opened(_open_log(log_file, owner)) as out:
        # A long-running server, not a command: the one-shot wrapper in run.py does not fit.
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            env={"LANG": "C.UTF-8", "PATH": "/usr/bin:/bin", "HOME": owner.pw_dir},
            **as_owner,
        )
    return Cluster(data_dir, port, socket_dir, log_file, process, unit)


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
