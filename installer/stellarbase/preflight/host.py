"""Preflight of the host: OS, kernel, systemd, architecture, CPUs, memory, disk, ports,
clock, open-file limit, security modules and root.

Split into a few Checks so that one slow answer (timedatectl waits on D-Bus, a hung mount
stalls statvfs) cannot hold the others. Facts of the running system come from /proc, /sys,
/run and /etc directly; only systemd's version and the clock need a command.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import resource
import shutil
from collections.abc import Mapping
from pathlib import Path

from stellarbase import facts, resources
from stellarbase.agent import local_address
from stellarbase.config import Config
from stellarbase.errors import StellarError
from stellarbase.paths import HostPaths
from stellarbase.preflight import Check, Context, Finding, failed, noted, passed, warned
from stellarbase.proc import BASE_ENV, run, running_as_root

GIB = 1 << 30
SUPPORTED_OS: dict[str, tuple[str, ...]] = {
    "debian": ("12",),
    "ubuntu": ("22.04", "24.04"),
    "rhel": ("9",),
    "rocky": ("9",),
    "almalinux": ("9",),
}
SUPPORTED_TEXT = "debian 12, ubuntu 22.04/24.04, rhel/rocky/almalinux 9"
ARCHES = ("x86_64", "aarch64")
MIN_SYSTEMD = 249
MIN_NOFILE = 65536
# A "16 GiB" machine shows less in MemTotal: the kernel and firmware keep some for themselves.
MEMORY_SLACK = 0.9
COMMAND_TIMEOUT = 5.0
LOOPBACK = "127.0.0.1"  # where the local PostgreSQL and Redis listen
OS_RELEASE = (Path("/etc/os-release"), Path("/usr/lib/os-release"))
# systemd creates this directory when it boots as the service manager: what sd_booted()
# tests. The package alone (a container, WSL, a chroot) has systemctl but not this.
SYSTEMD_RUNTIME_DIR = Path("/run/systemd/system")
PID1_COMM = Path("/proc/1/comm")
NOT_BOOTED_HINT = (
    "StellarBase runs its services as systemd units: install on a VM or host booted with "
    "systemd, or write the files only with --root DIR"
)


def checks(ctx: Context) -> list[Check]:
    return [
        Check("host", lambda: system_findings(ctx), 5.0),
        Check(
            "host.disk",
            lambda: [disk_finding(ctx.paths, ctx.config.requirements.min_disk_gib)],
            10.0,
            "the file system of the data dir does not answer: a hung network mount?",
        ),
        Check("host.ports", lambda: [ports_finding(ctx.config, ctx.own_ports)], 10.0),
        Check(
            "host.backup",
            lambda: [backup_finding(ctx.config, ctx.paths)],
            10.0,
            "the file system of the backup repository does not answer: a hung network mount?",
        ),
        Check(
            "host.systemd",
            lambda: [systemd_finding(ctx.paths)],
            COMMAND_TIMEOUT + 5,
            "`systemctl --version` did not answer",
        ),
        Check(
            "host.clock",
            lambda: [clock_finding()],
            COMMAND_TIMEOUT + 5,
            "`timedatectl` did not answer: is systemd-timedated or D-Bus stuck?",
        ),
    ]


def system_findings(ctx: Context) -> list[Finding]:
    req = ctx.config.requirements
    return [
        os_finding(read_os_release()),
        kernel_finding(),
        arch_finding(platform.machine()),
        cpus_finding(len(os.sched_getaffinity(0)), req.min_cpus),
        memory_finding(
            os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), req.min_memory_gib
        ),
        nofile_finding(resource.getrlimit(resource.RLIMIT_NOFILE)[0], units_set_nofile()),
        lsm_finding(),
        root_finding(ctx.paths, running_as_root()),
    ]


# --- OS, kernel, architecture ---------------------------------------------------------


def read_os_release() -> dict[str, str]:
    for path in OS_RELEASE:
        try:
            return parse_os_release(path.read_text())
        except OSError:
            continue
    return {}


def parse_os_release(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, raw = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key] = raw.strip().strip("\"'")
    return values


def os_finding(release: Mapping[str, str]) -> Finding:
    distro = release.get("ID", "").lower()
    version = release.get("VERSION_ID", "")
    value = release.get("PRETTY_NAME") or f"{distro or 'unknown'} {version}".strip()
    value += f" (ID={distro or '?'}, VERSION_ID={version or '?'})"
    if any(_version_matches(version, want) for want in SUPPORTED_OS.get(distro, ())):
        return passed("host.os", value, SUPPORTED_TEXT)
    return warned(
        "host.os",
        value,
        SUPPORTED_TEXT,
        "not a tested distribution: install goes on, but use a supported one in production",
    )


def _version_matches(version: str, want: str) -> bool:
    # "9" stands for every 9.x point release; "22.04" must match exactly.
    return version == want or ("." not in want and version.split(".")[0] == want)


def kernel_finding() -> Finding:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        cgroups = "cgroup v2"
    elif Path("/sys/fs/cgroup").is_dir():
        cgroups = "cgroup v1 or hybrid"
    else:
        cgroups = "no cgroup file system"
    return passed("host.kernel", f"{platform.release()} ({cgroups})")


def arch_finding(machine: str) -> Finding:
    requirement = " or ".join(ARCHES)
    if machine in ARCHES:
        return passed("host.arch", machine, requirement)
    return failed(
        "host.arch", machine, requirement, "stellarbase is built for x86_64 and aarch64 only"
    )


# --- capacity -------------------------------------------------------------------------


def cpus_finding(cpus: int, minimum: int) -> Finding:
    requirement = f"≥ {minimum}"
    if cpus >= minimum:
        return passed("host.cpus", str(cpus), requirement)
    return failed(
        "host.cpus",
        str(cpus),
        requirement,
        f"give the host {minimum} CPUs, or lower requirements.min_cpus for a trial "
        "(--set requirements.min_cpus=N)",
    )


def memory_finding(total: int, minimum_gib: float) -> Finding:
    value = f"{total / GIB:.1f} GiB"
    requirement = (
        f"≥ {minimum_gib:g} GiB installed (MemTotal ≥ {minimum_gib * MEMORY_SLACK:.1f} GiB)"
    )
    if total >= minimum_gib * MEMORY_SLACK * GIB:
        return passed("host.memory", value, requirement)
    return failed(
        "host.memory",
        value,
        requirement,
        f"give the host {minimum_gib:g} GiB of memory, or lower requirements.min_memory_gib",
    )


def disk_finding(paths: HostPaths, minimum_gib: float) -> Finding:
    """Free space where the data dir is (or will be: its nearest existing parent)."""
    target = paths.state_dir
    at = _nearest_existing(target)
    free = shutil.disk_usage(at).free
    value = f"{free / GIB:.1f} GiB free at {at}"
    requirement = f"≥ {minimum_gib:g} GiB free for {target}"
    if free >= minimum_gib * GIB:
        return passed("host.disk", value, requirement)
    return failed(
        "host.disk",
        value,
        requirement,
        f"free space there or mount a larger volume at {target}, "
        "or lower requirements.min_disk_gib",
    )


def backup_finding(config: Config, paths: HostPaths) -> Finding:
    """Where backups go: off (a warning beyond the pilot), S3 (checked by s3.*), or a dir."""
    repo = config.backup.location
    if not repo.enabled:
        hint = "set backup.repository=s3 (with an s3 section) to archive WAL and back up daily"
        if config.tier == "pilot":
            return noted("host.backup", "backups are off", hint)
        return warned("host.backup", "backups are off", f"backups on the {config.tier} tier", hint)
    if repo.directory is None:
        return passed("host.backup", f"WAL and base backups to s3://{_bucket(config)}")
    target = paths.at(repo.directory)
    at = _nearest_existing(target)
    if not at.is_dir() or not os.access(at, os.W_OK | os.X_OK):
        return failed(
            "host.backup",
            f"{at} is not a writable directory",
            f"a writable directory for {repo}",
            f"create it (`install -d -m 0750 {target}`) or point backup.repository elsewhere",
        )
    free = shutil.disk_usage(at).free
    value = f"WAL and base backups to {target} ({free / GIB:.1f} GiB free)"
    return passed("host.backup", value, "a writable directory; another disk than the data")


def _bucket(config: Config) -> str:
    return config.s3.bucket if config.s3 is not None else "?"


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (where it will be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# --- ports ----------------------------------------------------------------------------


def config_ports(config: Config) -> list[tuple[str, str, int]]:
    """(key, address, port) of every port the services and local servers listen on."""
    bind = str(config.bind)
    where = {
        "agent.port": str(local_address(config.bind)),  # the agent's plain listener
        "agent.remote_port": str(config.agent.remote_bind),
    }
    ports = [
        (key, LOOPBACK if key.startswith("local.") else where.get(key, bind), port)
        for key, port in config.fixed_ports()
    ]
    ports += [
        ("worker.port" + (f"+{n}" if n else ""), bind, port)
        for n, port in enumerate(config.worker_ports())
    ]
    return ports


def port_taken(address: str, port: int) -> tuple[str, str] | None:
    """None when `port` is free on `address`; else ("in use", who holds it) or
    ("cannot bind", the system's reason)."""
    try:
        in_use = facts.port_in_use(address, port)
    except OSError as exc:
        return "cannot bind", str(exc.strerror)
    return ("in use", facts.port_owner(port)) if in_use else None


def ports_finding(config: Config, own_ports: frozenset[int]) -> Finding:
    ports = config_ports(config)
    busy: list[str] = []
    hint_key = ""
    for key, address, port in ports:
        taken = None if port in own_ports else port_taken(address, port)
        if taken is None:
            continue
        reason, why = taken
        if reason == "in use":
            busy.append(f"{key} {port} in use by {why}")
            hint_key = hint_key or key.split("+")[0]
        else:
            busy.append(f"{key} {port}: cannot bind {address} ({why})")
            hint_key = hint_key or "bind"
    requirement = "free (or held by this installation)"
    if not busy:
        shown = ", ".join(f"{port}" for _, _, port in ports)
        own = sorted(own_ports & {port for _, _, port in ports})
        value = f"{shown} free" + (f" ({', '.join(map(str, own))} ours)" if own else "")
        return passed("host.ports", value, requirement)
    if hint_key == "bind":
        hint = "set bind to an address of this host: --set bind=ADDRESS"
    else:
        hint = f"stop the process holding it, or choose another port: --set {hint_key}=PORT"
    return failed("host.ports", "; ".join(busy), requirement, hint)


# --- systemd, clock -------------------------------------------------------------------


def init_problem() -> str | None:
    """Why systemd is not the running service manager here, or None when it is."""
    if SYSTEMD_RUNTIME_DIR.is_dir():
        return None
    try:
        pid1 = PID1_COMM.read_text().strip()
    except OSError:
        pid1 = ""
    return (
        f"not booted with systemd: PID 1 is {pid1 or 'unknown'} "
        f"and {SYSTEMD_RUNTIME_DIR} does not exist"
    )


def systemd_finding(paths: HostPaths) -> Finding:
    if not paths.live:
        return noted("host.systemd", f"not needed: files only, under {paths.root}")
    problem = init_problem()
    if problem:
        return failed("host.systemd", problem, "systemd running as PID 1", NOT_BOOTED_HINT)
    try:
        out = run(["systemctl", "--version"], timeout=COMMAND_TIMEOUT)
    except StellarError as exc:
        return failed(
            "host.systemd",
            exc.message,
            f"systemd ≥ {MIN_SYSTEMD}",
            "StellarBase runs under systemd",
        )
    return systemd_version_finding(out.stdout)


def systemd_version_finding(output: str) -> Finding:
    """From `systemctl --version`, whose first line is "systemd 252 (252.38-1~deb12u1)"."""
    first = output.strip().splitlines()[0] if output.strip() else ""
    words = first.split()
    requirement = f"≥ {MIN_SYSTEMD}"
    if len(words) < 2 or words[0] != "systemd" or not words[1].isdigit():
        return failed(
            "host.systemd",
            first or "no output",
            requirement,
            "could not read the systemd version: check `systemctl --version`",
        )
    if int(words[1]) < MIN_SYSTEMD:
        return failed(
            "host.systemd",
            first,
            requirement,
            f"systemd {words[1]} is too old: use a supported distribution ({SUPPORTED_TEXT})",
        )
    return passed("host.systemd", first, requirement)


def clock_finding() -> Finding:
    """NTP state from timedatectl when it answers, else from the kernel (adjtimex)."""
    synced = _timedatectl_synced() if shutil.which("timedatectl", path=BASE_ENV["PATH"]) else None
    source = "timedatectl"
    if synced is None:
        synced, source = _kernel_synced(), "adjtimex"
    if synced is None:
        return noted("host.clock", "synchronisation state unknown (no timedatectl, no adjtimex)")
    if synced:
        return passed("host.clock", f"synchronised ({source})", "synchronised")
    return warned(
        "host.clock",
        f"not synchronised ({source})",
        "synchronised",
        "backups, TLS and tokens need a correct clock: `timedatectl set-ntp true` "
        "or configure chrony",
    )


def _timedatectl_synced() -> bool | None:
    try:
        out = run(
            ["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
            check=False,
            timeout=COMMAND_TIMEOUT,
        )
    except StellarError:
        return None
    answer = out.stdout.strip()
    if out.returncode != 0 or answer not in ("yes", "no"):
        return None  # no systemd as PID 1 or no D-Bus: ask the kernel instead
    return answer == "yes"


# adjtimex(2) returns TIME_ERROR while the kernel's STA_UNSYNC flag is set.
_TIME_ERROR = 5
_TIMEX_SIZE = 512  # larger than struct timex on every Linux ABI; modes=0 only reads


def _kernel_synced() -> bool | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        timex = ctypes.create_string_buffer(_TIMEX_SIZE)
        state = libc.adjtimex(timex)
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return bool(state != _TIME_ERROR)


# --- limits, security modules, root ---------------------------------------------------


def units_set_nofile() -> str | None:
    """LimitNOFILE= as the service unit templates set it, if they do."""
    try:
        templates = sorted(resources.units_dir().glob("*.j2"))
        for template in templates:
            for line in template.read_text().splitlines():
                if line.startswith("LimitNOFILE="):
                    return line.partition("=")[2].strip()
    except OSError:
        return None
    return None


def nofile_finding(soft: int, unit_limit: str | None) -> Finding:
    shown = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    value = f"soft RLIMIT_NOFILE {shown} here"
    requirement = f"≥ {MIN_NOFILE} open files for the services"
    if unit_limit:
        return passed(
            "host.nofile", f"{value}; the units set LimitNOFILE={unit_limit}", requirement
        )
    if soft == resource.RLIM_INFINITY or soft >= MIN_NOFILE:
        return passed("host.nofile", value, requirement)
    return warned(
        "host.nofile",
        value,
        requirement,
        f"raise it for the services with a drop-in: [Service] LimitNOFILE={MIN_NOFILE} "
        "(or DefaultLimitNOFILE= in /etc/systemd/system.conf)",
    )


def lsm_finding() -> Finding:
    parts = []
    try:
        enforce = Path("/sys/fs/selinux/enforce").read_text().strip()
        parts.append("SELinux " + ("enforcing" if enforce == "1" else "permissive"))
    except OSError:
        parts.append("SELinux off")
    try:
        enabled = Path("/sys/module/apparmor/parameters/enabled").read_text().strip()
        parts.append("AppArmor " + ("on" if enabled == "Y" else "off"))
    except OSError:
        parts.append("AppArmor off")
    hint = ""
    if "SELinux enforcing" in parts:
        hint = "if a unit fails to start, look for denials: `ausearch -m avc -ts recent`"
    return noted("host.lsm", ", ".join(parts), hint)


def root_finding(paths: HostPaths, is_root: bool) -> Finding:
    if not paths.live:
        return noted("host.root", f"not needed: the install root is {paths.root}")
    if is_root:
        return passed("host.root", "running as root", "root")
    return failed(
        "host.root",
        f"running as uid {os.geteuid()}",
        "root",
        "installing users, units and files needs root: run it again with sudo",
    )
