"""Read-only facts about the host: users, ports, the installed state, the running binary.

Below the planner: it gathers `Facts`, which plan reads; it imports neither plan nor render.
"""

from __future__ import annotations

import errno
import re
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from stellarbase import __version__, gpu, install_state, localdeps, resources
from stellarbase.config import Config, DependencyMode
from stellarbase.envfile import read_env_file
from stellarbase.errors import ExitCode, StellarError
from stellarbase.files import file_digest
from stellarbase.layout import POSTGRES_PASSWORD, REDIS_PASSWORD, LocalServers
from stellarbase.localdeps import ADMIN_PASSWORD, ServerBinary
from stellarbase.paths import HostPaths

NO_LOCAL_SERVERS = LocalServers()


@dataclass(frozen=True)
class Facts:
    """What the planner needs to know of the host (gathered read-only by `gather`)."""

    version: str
    binary: Path  # the executable to install as this release
    binary_digest: str
    previous_files: tuple[str, ...] = ()  # host paths an earlier install owns
    previous_units: tuple[str, ...] = ()  # units an earlier install started
    local: LocalServers = NO_LOCAL_SERVERS  # binaries of local dependencies
    found: tuple[tuple[str, tuple[ServerBinary, ...]], ...] = ()  # all servers seen, by dep
    gpu_devices: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES ids that get an inference unit
    # Passwords the installer generates (local servers), reused from the last install.
    generated: tuple[tuple[str, str], ...] = ()
    local_data: tuple[str, ...] = ()  # dependencies whose local data directory holds files
    postgres_leftovers: bool = False  # its data directory holds files but no cluster

    def secret(self, name: str) -> str:
        return dict(self.generated)[name]


def gather(paths: HostPaths, binary: Path | None, config: Config) -> Facts:
    source = binary or release_binary()
    previous = install_state.load(paths.state_file)
    data = {"postgres": paths.postgres_data, "redis": paths.redis_data}
    return replace(
        dependency_facts(paths, config),
        binary=source,
        binary_digest=file_digest(source),
        previous_files=tuple(previous.files),
        previous_units=tuple(previous.units),
        gpu_devices=tuple(inference_devices(config)),
        local_data=tuple(dep for dep, path in data.items() if localdeps.holds_files(path)),
        postgres_leftovers=localdeps.holds_files(paths.postgres_data)
        and not localdeps.cluster_ready(paths.postgres_data),
    )


def dependency_facts(paths: HostPaths, config: Config) -> Facts:
    """Only what the dependencies need: the local servers' binaries and passwords."""
    postgres = redis = None
    found: dict[str, tuple[ServerBinary, ...]] = {}
    if config.mode_of("postgres") == DependencyMode.LOCAL:
        postgres, seen = localdeps.find_postgres()
        found["postgres"] = tuple(seen)
    if config.mode_of("redis") == DependencyMode.LOCAL:
        redis, seen = localdeps.find_redis()
        found["redis"] = tuple(seen)
    return Facts(
        version=__version__,
        binary=Path(),
        binary_digest="",
        local=LocalServers(postgres, redis),
        found=tuple(found.items()),
        generated=tuple(generated_secrets(paths).items()),
    )


def generated_secrets(paths: HostPaths) -> dict[str, str]:
    """Passwords of the local servers: the installed ones, or new ones on a first install."""
    existing: dict[str, str] = {}
    for path in (paths.secrets_file, paths.admin_secrets_file):
        existing |= read_env_file(path)
    names = (ADMIN_PASSWORD, POSTGRES_PASSWORD, REDIS_PASSWORD)
    return {name: existing.get(name) or localdeps.new_password() for name in names}


def inference_devices(config: Config) -> list[str]:
    """GPU or MIG UUIDs to serve; none without a driver (preflight says why)."""
    inventory = gpu.default_source().inventory()
    devices = gpu.serving_devices(inventory, config.inference.gpus, config.inference.mig)
    # Unit instance names take these verbatim; old-style MIG ids (with "/") do not fit.
    return [d for d in devices if re.fullmatch(r"[A-Za-z0-9-]+", d)]


def release_binary() -> Path:
    """The executable to install: this very binary when it is the packaged one."""
    if resources.is_frozen():
        return Path(sys.executable)
    raise StellarError(
        "install needs the packaged stellarbase binary, not the source tree",
        hint="build it with packaging/build.sh, or pass --binary PATH to a built binary",
        code=ExitCode.HOST,
    )


def lookup_ids(paths: HostPaths, user: str, group: str) -> tuple[int, int]:
    """uid/gid from the root's own passwd/group files (a test root has its own)."""
    return _lookup(paths.passwd, user), _lookup(paths.group, group)


def user_exists(paths: HostPaths, user: str) -> bool:
    try:
        _lookup(paths.passwd, user)
    except KeyError:
        return False
    return True


def _lookup(table: Path, name: str) -> int:
    if name == "root":
        return 0
    try:
        lines = table.read_text().splitlines()
    except FileNotFoundError:
        raise KeyError(name) from None
    for line in lines:
        fields = line.split(":")
        if len(fields) > 2 and fields[0] == name:
            return int(fields[2])
    raise KeyError(name)


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def port_owner(port: int) -> str:
    """Best effort name of the process listening on a port, for the error message."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN" and conn.pid:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return "another process"
