"""Boot a real systemd in a throwaway PID + mount namespace over a copy-on-write view of `/`
or of another distribution's root directory.

The sandbox lets tests exercise the installer against a genuine service manager without a VM:

* The root is an overlay with a read-only lower layer and a tmpfs as upper layer, so
  everything the sandbox writes (its boot-time `/tmp` cleanup included) vanishes with it.
  The lower layer is the host `/` (only the host root filesystem is visible; other host
  mounts appear as empty dirs) or, with `boot(lower=DIR)`, a distribution tree such as the
  Debian 13 root that scripts/test-root.sh builds: its own systemd, libraries and packages
  then run on the host kernel.
* `/proc`, `/sys`, `/dev`, `/run` and `/tmp` are fresh, private instances. `/proc/sys`,
  `/proc/sysrq-trigger` and `/sys` are read-only because, without a network or user namespace,
  writes there would change the host kernel.
* systemd runs in container mode (`container=` in its environment), which makes it skip
  hardware setup, clock warping and loop/DM detaching at shutdown, and it gets a private
  cgroup2 subtree of the caller's cgroup, entered through a cgroup namespace.
* Loopback (and every other network interface) is shared with the host, so servers started
  by the test session on 127.0.0.1 are reachable from services inside.
* Units enabled in the lower layer (everything under `/etc/systemd/system/*.wants`), the
  generators it ships (but a few harmless ones) and units that would touch hardware, the
  network configuration or kernel state are disabled or masked.

Everything runs as root; callers must check `can_boot()` first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

SYSTEMD = "/lib/systemd/systemd"
DEFAULT_HOSTNAME = "stellarbase-sandbox"
CONTAINER_NAME = "stellarbase-sandbox"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CAP_SYS_ADMIN = 21
_REQUIRED_TOOLS = ("unshare", "nsenter", "setpriv", "pivot_root", "mount", "umount")

# Units that would act on host-global state (kernel, clock, network configuration, hardware,
# firmware stores) or grab the host console. Masking them beats relying on each unit's
# ConditionVirtualization=, which differs between distributions and systemd versions.
MASKED_UNITS: tuple[str, ...] = (
    # Consoles and terminals: /dev/console is a log file here and the host's VTs are not ours.
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "container-getty@.service",
    "getty-static.service",
    # Network configuration and time: the network namespace and the clock are the host's.
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",
    "systemd-networkd-persistent-storage.service",
    "systemd-resolved.service",
    "networking.service",
    "ifupdown-pre.service",
    "NetworkManager.service",
    "NetworkManager-wait-online.service",
    "systemd-timesyncd.service",
    "systemd-time-wait-sync.service",
    # Devices and kernel state: udev would re-trigger host uevents, the rest writes globals.
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-hwdb-update.service",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "systemd-random-seed.service",
    "systemd-pstore.service",
    "systemd-journald-audit.socket",
    "systemd-pcrphase.service",
    "systemd-pcrphase-sysinit.service",
    "systemd-pcrmachine.service",
    "systemd-pcrfs-root.service",
    "systemd-pcrfs@.service",
    "systemd-pcrphase-initrd.service",
    "systemd-pcrextend.socket",
    "systemd-pcrextend@.service",
    "systemd-pcrlock.socket",
    "systemd-pcrlock@.service",
    "systemd-tpm2-setup-early.service",
    "systemd-tpm2-setup.service",
    # Credentials sealed to the host (TPM, /var/lib/systemd/credential.secret) and EFI or
    # ESP state (hibernation variables, the boot loader's random seed) are the host's.
    "systemd-creds.socket",
    "systemd-creds@.service",
    "systemd-hibernate-clear.service",
    "systemd-boot-random-seed.service",
    "systemd-bsod.service",
    "systemd-battery-check.service",
    # System extension images would be merged over /usr and /etc of the lower layer.
    "systemd-sysext.service",
    "systemd-sysext.socket",
    "systemd-sysext@.service",
    "systemd-confext.service",
    # Root filesystem handling: the root is an overlay that must be left as it is.
    "systemd-remount-fs.service",
    "systemd-fsck-root.service",
    "systemd-fsck@.service",
    "systemd-repart.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "e2scrub_reap.service",
    "e2scrub_all.service",
    "e2scrub_all.timer",
    "fstrim.service",
    "fstrim.timer",
)

# Generators are masked unless listed here: distribution and cloud generators (sysv, rc.local,
# fstab, cloud-init, netplan, snapd, ...) would start host scripts or mount host disks.
KEPT_GENERATORS: frozenset[str] = frozenset(
    {
        "systemd-debug-generator",
        "systemd-run-generator",
        "systemd-system-update-generator",
        # Only adds cluster instances below postgresql.service, mirroring a real host.
        "postgresql-generator",
    }
)
GENERATOR_DIRS = (
    "/etc/systemd/system-generators",
    "/usr/local/lib/systemd/system-generators",
    "/lib/systemd/system-generators",
    "/usr/lib/systemd/system-generators",
)

# Capabilities that only matter for host-global state (modules, clock, kernel log, raw I/O).
# Dropped from the bounding set of systemd and of every command run inside.
DROPPED_CAPS: tuple[str, ...] = ("sys_module", "sys_time", "syslog", "sys_rawio", "wake_alarm")
_BOUNDING_SET = ",".join(f"-{cap}" for cap in DROPPED_CAPS)

# Runs as PID 1 of fresh PID, mount, UTS, IPC and cgroup namespaces (see `_launch_argv`);
# configured through SB_* environment variables. Every mount below is private to the
# namespace, which dies with systemd.
_BOOT_SCRIPT = r"""
set -eu
base=$SB_BASE
root=$base/root

mount -t tmpfs -o mode=0700 stellarbase-sandbox "$base"
mkdir "$base/upper" "$base/work" "$root"
mount -t overlay -o "lowerdir=$SB_LOWER,upperdir=$base/upper,workdir=$base/work" \
    stellarbase-sandbox "$root"
# Everything below writes and deletes through $root, so make sure it is the overlay.
if [ "$(stat -f -c %T "$root")" != overlayfs ]; then
    echo "stellarbase sandbox: $root is not an overlay, refusing to go on" >&2
    exit 1
fi

mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
for p in sys sysrq-trigger; do
    [ -e "$root/proc/$p" ] || continue
    mount --bind "$root/proc/$p" "$root/proc/$p"
    mount -o remount,bind,ro,nosuid,nodev,noexec "$root/proc/$p"
done
# A bind remount only changes this mount's flags; "mount -t sysfs -o ro" could flip the
# superblock that the host shares.
mount -t sysfs -o nosuid,nodev,noexec sysfs "$root/sys"
mount -o remount,bind,ro,nosuid,nodev,noexec "$root/sys"
# Mounted inside the cgroup namespace, so its root is the sandbox's private subtree.
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"

# A private /dev keeps host disks, loop devices and consoles out of reach.
mount -t tmpfs -o mode=0755,nosuid,size=4m stellarbase-sandbox "$root/dev"
for node in /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty /dev/nvidia*; do
    [ -c "$node" ] || continue
    touch "$root$node"
    mount --bind "$node" "$root$node"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts \
    "$root/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev stellarbase-sandbox "$root/dev/shm"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
# systemd itself logs to its journal; anything that still writes to /dev/console (units with
# StandardOutput=tty, emergency messages) lands in a host file next to the boot script's errors.
touch "$root/dev/console"
mount --bind "$SB_CONSOLE" "$root/dev/console"

mount -t tmpfs -o mode=0755,nosuid,nodev stellarbase-sandbox "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev stellarbase-sandbox "$root/tmp"

# Start from "nothing enabled": host services (databases, cron, ssh, timers) stay off.
sd=$root/etc/systemd
rm -rf "$sd"/system/*.wants "$sd"/system/*.requires
for unit in $SB_MASK_UNITS; do
    ln -sfn /dev/null "$sd/system/$unit"
done
mkdir -p "$sd/system-generators" "$sd/journald.conf.d"
for gen in $SB_MASK_GENERATORS; do
    ln -sfn /dev/null "$sd/system-generators/$gen"
done
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n' \
    > "$sd/journald.conf.d/stellarbase-sandbox.conf"
: > "$root/etc/fstab"
printf '%s\n' "$SB_HOSTNAME" > "$root/etc/hostname"
printf '127.0.1.1\t%s\n' "$SB_HOSTNAME" >> "$root/etc/hosts"
printf '%s' "$SB_HOSTNAME" > /proc/sys/kernel/hostname
# A network namespace of its own has only a loopback device, down until brought up.
if [ -n "${SB_LOOPBACK_ONLY:-}" ]; then
    ip link set lo up
fi

cd "$root"
pivot_root . .
umount -l .
cd /
exec env -i container="$SB_CONTAINER" PATH="$PATH" \
    setpriv --bounding-set="$SB_BOUNDING_SET" -- \
    "$SB_SYSTEMD" --system --unit=multi-user.target
"""

# Moves the launcher into the sandbox cgroup before `unshare --cgroup` makes that cgroup the
# namespace root; "0" means "the writing process".
_CGROUP_ENTER = 'echo 0 > "$1/cgroup.procs" && shift && exec "$@"'


class SandboxProcess(subprocess.Popen[str]):
    """A command running inside the sandbox below its nsenter wrapper.

    nsenter forwards no signals, so signals are sent to the command itself; nsenter then reaps
    it and exits the same way, which keeps `returncode` meaningful (-9 after `kill()`). Were
    nsenter killed instead, the command would die by its parent-death signal but, orphaned
    outside the namespace, linger as a zombie until the host's init reaps it, which stalls the
    sandbox's shutdown.
    """

    def send_signal(self, sig: int) -> None:
        if self.poll() is not None:
            return
        commands = _children(self.pid)
        if not commands:  # not forked yet or already gone: the wrapper is all there is
            super().send_signal(sig)
        for pid in commands:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


class SandboxError(RuntimeError):
    """The sandbox could not be booted or driven."""


class SandboxCommandError(subprocess.CalledProcessError):
    """A command run inside the sandbox failed; the message carries its output tails."""

    def __str__(self) -> str:
        return (
            f"{super().__str__()}\n"
            f"--- stdout (tail) ---\n{_tail(self.stdout)}\n"
            f"--- stderr (tail) ---\n{_tail(self.stderr)}"
        )


def _tail(text: str | bytes | None, lines: int = 40) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _decode_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _own_cgroup2_dir() -> Path | None:
    """Host path of the cgroup2 directory this process belongs to, if cgroup2 is mounted."""
    try:
        cgroup_lines = Path("/proc/self/cgroup").read_text().splitlines()
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    own = next((line[3:] for line in cgroup_lines if line.startswith("0::")), None)
    if own is None:
        return None
    for line in mountinfo:
        pre, _, post = line.partition(" - ")
        if post.split(" ", 1)[0] != "cgroup2":
            continue
        fields = pre.split()
        mount_root, mount_point = _decode_mountinfo(fields[3]), _decode_mountinfo(fields[4])
        rel = os.path.relpath(own, mount_root)
        if rel.startswith(".."):
            continue
        path = Path(mount_point) / rel
        if path.is_dir():
            return path
    return None


def _has_cap_sys_admin() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    effective = next(
        (line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), "0"
    )
    return bool(int(effective, 16) & (1 << _CAP_SYS_ADMIN))


def can_boot(lower: Path | None = None) -> tuple[bool, str]:
    """Whether this machine can boot a sandbox (over `lower`, or the host root), and why not
    if it cannot."""
    if os.geteuid() != 0:
        return False, "booting a systemd sandbox needs root"
    if not _has_cap_sys_admin():
        return False, "booting a systemd sandbox needs CAP_SYS_ADMIN (unprivileged container?)"
    systemd = _in_lower(lower, SYSTEMD)
    if not os.access(systemd, os.X_OK):
        return False, f"{systemd} is not installed"
    missing = [tool for tool in _REQUIRED_TOOLS if shutil.which(tool, path=_PATH) is None]
    if missing:
        return False, f"missing tools: {', '.join(missing)}"
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError as exc:
        return False, f"cannot read /proc/filesystems: {exc}"
    if "\toverlay\n" not in filesystems:
        return False, "the kernel has no overlay filesystem"
    if _own_cgroup2_dir() is None:
        return False, "no cgroup2 hierarchy is mounted on the host"
    return True, "ok"


def _in_lower(lower: Path | None, path: str) -> Path:
    """Host-side path of `path` in the lower layer (the host root when `lower` is None)."""
    return Path(path) if lower is None else lower / path.lstrip("/")


def _masked_generators(lower: Path | None) -> list[str]:
    # The systemd that boots is the lower layer's, so are the generators it would run.
    names: set[str] = set()
    for directory in GENERATOR_DIRS:
        with contextlib.suppress(OSError):
            names.update(os.listdir(_in_lower(lower, directory)))
    return sorted(names - KEPT_GENERATORS)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        pass  # a kernel without CONFIG_PROC_CHILDREN, or pid is gone: scan instead
    except (OSError, ValueError):
        return []
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _ppid(int(e)) == pid]


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields after it are safe to split.
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _base_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    # Commands inside should see a root login's environment, not the test runner's.
    env = {
        "PATH": _PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "SYSTEMD_PAGER": "",
        "SYSTEMD_COLORS": "0",
    }
    if extra:
        env.update(extra)
    return env


class SystemdSandbox:
    """A booted systemd (PID 1 of its own PID namespace); see the module docstring."""

    pid: int
    """Host-side PID of systemd, which is PID 1 inside; 0 once powered off."""
    hostname: str
    workdir: Path
    """Host-side scratch directory (boot script, console log); removed at poweroff."""
    console_log: Path
    cgroup: Path
    """Host path of the sandbox's private cgroup2 subtree (its cgroup namespace root)."""
    lower: Path | None
    """The overlay's lower layer: a distribution root on the host, or None for the host `/`."""
    boot_seconds: float
    """Wall time from launch until `is-system-running --wait` returned."""
    failed_units: list[str]
    """Units that had failed when boot finished (boot still succeeds when degraded)."""

    def __init__(
        self,
        workdir: Path,
        cgroup: Path,
        hostname: str,
        loopback_only: bool = False,
        lower: Path | None = None,
    ) -> None:
        self.loopback_only = loopback_only
        self.lower = lower
        self.workdir = workdir
        self.console_log = workdir / "console.log"
        self.hostname = hostname
        self.pid = 0
        self.boot_seconds = 0.0
        self.failed_units = []
        self.cgroup = cgroup
        self._launcher: subprocess.Popen[bytes] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def boot(
        cls,
        timeout: float = 60.0,
        *,
        hostname: str = DEFAULT_HOSTNAME,
        loopback_only: bool = False,
        lower: Path | None = None,
    ) -> SystemdSandbox:
        """Boot a sandbox and return once `systemctl is-system-running` says it is up.

        With loopback_only, it gets a network namespace of its own holding only `lo`: no
        route leads anywhere else, and the host's servers cannot be reached from it.
        With lower, the overlay's read-only layer is that directory (a complete root with
        systemd) instead of the host `/`; it must not be changed while the sandbox runs.
        """
        if lower is not None:
            lower = lower.resolve()
            if lower == Path("/"):
                lower = None
        ok, reason = can_boot(lower)
        if not ok:
            raise SandboxError(reason)
        started = time.monotonic()
        deadline = started + timeout
        workdir = Path(tempfile.mkdtemp(prefix="stellarbase-sandbox-"))
        cgroup_parent = _own_cgroup2_dir()
        assert cgroup_parent is not None  # can_boot() checked it
        sandbox = cls(workdir, cgroup_parent / workdir.name, hostname, loopback_only, lower)
        try:
            sandbox._launch()
            sandbox._wait_for_exec(deadline)
            sandbox._wait_until_up(deadline)
        except BaseException:
            sandbox.poweroff(timeout=10.0)
            raise
        sandbox.boot_seconds = time.monotonic() - started
        log.info("systemd sandbox %s booted in %.2fs", sandbox.pid, sandbox.boot_seconds)
        return sandbox

    def _launch(self) -> None:
        mount_base = self.workdir / "mnt"
        mount_base.mkdir()
        self.console_log.touch()
        # A file rather than `sh -c`, so the script does not clutter `ps` of the launcher.
        boot_script = self.workdir / "boot.sh"
        boot_script.write_text(_BOOT_SCRIPT)
        self.cgroup.mkdir()
        env = {
            "PATH": _PATH,
            "SB_BASE": str(mount_base),
            "SB_LOWER": str(self.lower or "/"),
            "SB_CONSOLE": str(self.console_log),
            "SB_HOSTNAME": self.hostname,
            "SB_CONTAINER": CONTAINER_NAME,
            "SB_SYSTEMD": SYSTEMD,
            "SB_BOUNDING_SET": _BOUNDING_SET,
            "SB_MASK_UNITS": " ".join(MASKED_UNITS),
            "SB_MASK_GENERATORS": " ".join(_masked_generators(self.lower)),
            "SB_LOOPBACK_ONLY": "1" if self.loopback_only else "",
        }
        argv = [
            "sh", "-c", _CGROUP_ENTER, "stellarbase-sandbox-enter", str(self.cgroup),
            # The parent-death signals make a crashed test run take its sandbox along instead
            # of leaving an orphaned systemd behind. Caveat: the signal fires when the *thread*
            # that booted the sandbox exits, so boot from a long-lived thread.
            "setpriv", "--pdeathsig", "KILL", "--",
            "unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--uts", "--ipc",
            "--cgroup", "--mount-proc", "--propagation", "private",
            *(["--net"] if self.loopback_only else []),
            "--", "/bin/sh", str(boot_script),
        ]  # fmt: skip
        with self.console_log.open("ab") as console:
            self._launcher = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # keep the runner's Ctrl-C away from PID 1
            )

    def _wait_for_exec(self, deadline: float) -> None:
        # Until the boot script has pivoted and exec'd systemd, entering its mount namespace
        # would show the host's /run, and on a systemd host systemctl would drive the host.
        assert self._launcher is not None
        while time.monotonic() < deadline:
            if self._launcher.poll() is not None:
                raise SandboxError(
                    f"sandbox launcher exited with {self._launcher.returncode}\n"
                    f"{self.console_tail()}"
                )
            for child in _children(self._launcher.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        self.pid = child
                        return
            time.sleep(0.02)
        raise SandboxError(f"systemd was not started in time\n{self.console_tail()}")

    def _wait_until_up(self, deadline: float) -> None:
        assert self._launcher is not None
        state = ""
        while (remaining := deadline - time.monotonic()) > 0:
            if self._launcher.poll() is not None:
                raise SandboxError(
                    f"sandbox systemd exited with {self._launcher.returncode} during boot\n"
                    f"{self.console_tail()}"
                )
            try:
                result = self.run(
                    ["systemctl", "is-system-running", "--wait"], check=False, timeout=remaining
                )
            except subprocess.TimeoutExpired:
                break
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                break
            if state in ("maintenance", "stopping"):
                raise SandboxError(f"sandbox boot ended in state {state!r}\n{self.console_tail()}")
            # Until systemd listens on its private socket, systemctl cannot connect at all.
            time.sleep(0.05)
        if state not in ("running", "degraded"):
            raise SandboxError(
                f"sandbox did not finish booting (last state {state!r})\n{self.console_tail()}"
            )
        if state == "degraded":
            failed = self.systemctl(
                "list-units", "--state=failed", "--no-legend", "--plain", check=False
            )
            self.failed_units = [line.split()[0] for line in failed.stdout.splitlines() if line]
            log.warning("systemd sandbox booted degraded; failed units: %s", self.failed_units)

    def poweroff(self, timeout: float = 30.0) -> None:
        """Shut the sandbox down, SIGKILL it if it does not stop in time, and clean up."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop(timeout)
        finally:
            self.pid = 0
            self._cleanup()

    def _stop(self, timeout: float) -> None:
        launcher = self._launcher
        if launcher is None:
            return
        if launcher.poll() is None and self.pid:
            # --no-block: the connection dies with the namespace, so do not wait on the job.
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.run(
                    ["systemctl", "--no-block", "poweroff"], check=False, timeout=min(timeout, 10)
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(timeout)
        if launcher.poll() is None:
            log.warning("systemd sandbox %s did not power off; killing it", self.pid)
            # SIGKILL to a namespace's PID 1 kills every process in it. The parent check makes
            # sure the PID still names our systemd and was not reused.
            if self.pid and _ppid(self.pid) == launcher.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, 9)
            with contextlib.suppress(ProcessLookupError):
                launcher.kill()
            launcher.wait(10)

    def _cleanup(self) -> None:
        self._remove_cgroup()
        mount_base = self.workdir / "mnt"
        # The tmpfs lived in the sandbox's mount namespace only; should it ever show up on the
        # host, deleting "through" it would be wrong, so leave the directory for inspection.
        if os.path.ismount(mount_base):
            log.error("%s is mounted on the host; not removing %s", mount_base, self.workdir)
            return
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _remove_cgroup(self) -> None:
        if not self.cgroup.is_dir():
            return
        # Killed processes can take a moment to leave their cgroups.
        deadline = time.monotonic() + 10.0
        while True:
            busy = False
            for dirpath, _dirnames, _files in os.walk(self.cgroup, topdown=False):
                try:
                    os.rmdir(dirpath)
                except FileNotFoundError:
                    pass
                except OSError:
                    busy = True
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if busy:
            log.error("could not remove sandbox cgroup %s", self.cgroup)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.poweroff()

    # -- driving it --------------------------------------------------------------------------

    def _nsenter(self, argv: Sequence[str]) -> list[str]:
        if not self.pid:
            raise SandboxError("the sandbox is not running")
        return [
            "nsenter", f"--target={self.pid}", "--mount", "--pid", "--uts", "--ipc",
            *(["--net"] if self.loopback_only else []),
            "--root", "--wd",
            # nsenter forks to enter the PID namespace; should the nsenter process die (say, a
            # test runner killed), the death signal takes the command along.
            "--", "setpriv", "--pdeathsig", "KILL", f"--bounding-set={_BOUNDING_SET}",
            "--", *argv,
        ]  # fmt: skip

    def run(
        self,
        argv: list[str],
        *,
        check: bool = True,
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the sandbox as root, in text mode, capturing stdout and stderr.

        The command's environment is a clean root environment (PATH, HOME, LANG, ...) updated
        with `env`. Its working directory is `/`.
        """
        with SandboxProcess(
            self._nsenter(argv),
            env=_base_env(env),
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            try:
                stdout, stderr = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
        if check and proc.returncode != 0:
            raise SandboxCommandError(proc.returncode, argv, stdout, stderr)
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
        """Start argv inside the sandbox without waiting (text mode, stdout/stderr piped).

        Keyword arguments go to `subprocess.Popen`; `env` is merged as in `run`. The result is
        a `SandboxProcess`: `kill()`/`terminate()` signal the command itself, whose own
        children are left running, as after a real crash.
        """
        kw["env"] = _base_env(kw.get("env"))
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw["text"] = True
        return SandboxProcess(self._nsenter(argv), **kw)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args], check=check)

    def main_pid(self, unit: str) -> int:
        """MainPID of unit as seen inside the sandbox (0 when it has none)."""
        return int(self.systemctl("show", "--property=MainPID", "--value", unit).stdout)

    def path(self, p: str) -> Path:
        """Host-side path of p inside the sandbox root (valid while the sandbox runs)."""
        if not self.pid:
            raise SandboxError("the sandbox is not running")
        return Path(f"/proc/{self.pid}/root") / p.lstrip("/")

    def console_tail(self, lines: int = 60) -> str:
        """The last lines systemd and the boot script wrote to the sandbox console."""
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "--- sandbox console (tail) ---\n" + _tail(text, lines)
