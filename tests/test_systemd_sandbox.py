"""The systemd sandbox is a real, working systemd whose writes never reach the host."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures_systemd import SandboxRoot, on_both_roots
from tests.systemd_sandbox import (
    GENERATOR_DIRS,
    KEPT_GENERATORS,
    SandboxCommandError,
    SandboxError,
    SystemdSandbox,
)

pytestmark = pytest.mark.systemd


def _wait_for(what: str, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _is_running_systemd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
    except OSError:
        return False


@on_both_roots
def test_boots_a_real_systemd_as_pid1(
    systemd_sandbox: SystemdSandbox, sandbox_root: SandboxRoot
) -> None:
    sb = systemd_sandbox
    state = sb.systemctl("is-system-running", check=False).stdout.strip()
    assert state in ("running", "degraded"), sb.failed_units
    assert _is_running_systemd(sb.pid)
    version = sb.systemctl("--version").stdout.split()[1]
    assert version == str(sandbox_root.systemd)
    assert sb.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert sb.run(["hostname"]).stdout.strip() == sb.hostname
    # Container mode is what makes systemd leave host hardware, clock and loop devices alone.
    assert sb.run(["systemd-detect-virt", "--container"]).stdout.strip() == "container-other"


def test_failed_command_reports_its_output(systemd_sandbox: SystemdSandbox) -> None:
    with pytest.raises(SandboxCommandError) as info:
        systemd_sandbox.run(["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"])
    assert info.value.returncode == 3
    assert "to-stdout" in str(info.value)
    assert "to-stderr" in str(info.value)


def test_run_timeout_kills_the_command(systemd_sandbox: SystemdSandbox) -> None:
    sb = systemd_sandbox
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        sb.run(["sleep", "1000"], timeout=1)
    assert time.monotonic() - started < 10
    leftover = sb.run(["pgrep", "-x", "sleep"], check=False)
    assert leftover.returncode == 1, leftover.stdout


def test_sigkilled_service_is_restarted(systemd_sandbox: SystemdSandbox) -> None:
    sb = systemd_sandbox
    sb.run(["systemd-run", "--unit=t1", "--property=Restart=always", "sleep", "1000"])
    old_pid = sb.main_pid("t1.service")
    assert old_pid > 0

    sb.run(["kill", "-9", str(old_pid)])

    def restarted() -> bool:
        active = sb.systemctl("is-active", "t1.service", check=False).stdout.strip()
        return active == "active" and sb.main_pid("t1.service") not in (0, old_pid)

    _wait_for("t1.service to be restarted", restarted)
    restarts = sb.systemctl("show", "--property=NRestarts", "--value", "t1.service").stdout
    assert int(restarts) == 1


def test_notify_service_becomes_active_only_once_ready(systemd_sandbox: SystemdSandbox) -> None:
    sb = systemd_sandbox
    ready = (
        "[Service]\n"
        "Type=notify\n"
        "NotifyAccess=all\n"
        "ExecStart=/bin/sh -c 'systemd-notify --ready; sleep 1000'\n"
    )
    # Same, minus the notification: proves systemd really waits for READY=1.
    silent = "[Service]\nType=notify\nTimeoutStartSec=1\nExecStart=/bin/sleep 1000\n"
    sb.run(["tee", "/etc/systemd/system/notify-ready.service"], input=ready)
    sb.run(["tee", "/etc/systemd/system/notify-silent.service"], input=silent)
    sb.systemctl("daemon-reload")

    sb.systemctl("start", "notify-ready.service")
    assert sb.systemctl("is-active", "notify-ready.service").stdout.strip() == "active"

    assert sb.systemctl("start", "notify-silent.service", check=False).returncode != 0
    result = sb.systemctl("show", "--property=Result", "--value", "notify-silent.service")
    assert result.stdout.strip() == "timeout"


def test_unit_with_resource_limits_starts(systemd_sandbox: SystemdSandbox) -> None:
    # Whether the limits are enforced depends on the host's cgroup controllers (none reach the
    # sandbox on hybrid cgroup v1/v2 hosts); rendered units must start either way.
    sb = systemd_sandbox
    limits = ["-p", "MemoryMax=64M", "-p", "CPUQuota=50%", "-p", "TasksMax=64"]
    sb.run(["systemd-run", "--unit=limited", *limits, "sleep", "1000"])
    assert sb.systemctl("is-active", "limited.service").stdout.strip() == "active"
    memory_max = sb.systemctl("show", "--property=MemoryMax", "--value", "limited.service")
    assert int(memory_max.stdout) == 64 * 1024 * 1024


@on_both_roots
def test_writes_inside_do_not_reach_the_host(systemd_sandbox: SystemdSandbox) -> None:
    sb = systemd_sandbox
    lower = sb.lower or Path("/")
    token = secrets.token_hex(8)
    for directory in ("/etc", "/tmp", "/var/lib", "/root"):
        probe = f"{directory}/stellarbase-sandbox-probe-{token}"
        sb.run(["sh", "-c", f"echo {token} > {probe}"])
        assert sb.path(probe).read_text().strip() == token
        assert not os.path.lexists(probe)
        assert not os.path.lexists(lower / probe.lstrip("/"))

    # Deleting a file of the lower layer inside only hides it there (an overlay whiteout).
    sb.run(["rm", "/etc/os-release"])
    assert not os.path.lexists(sb.path("/etc/os-release"))
    assert os.path.lexists(lower / "etc/os-release")
    assert os.path.lexists("/etc/os-release")


def test_debian13_root_boots_clean_with_its_own_units_and_generators(
    request: pytest.FixtureRequest, debian13_root: Path
) -> None:
    # The masks must fit the lower layer's systemd (257 here, 252 on the host): a unit that
    # reaches for host state (TPM, EFI, network) would fail and leave the boot degraded.
    with SystemdSandbox.boot(lower=debian13_root) as sb:
        assert sb.systemctl("is-system-running").stdout.strip() == "running", sb.failed_units
        release = sb.run(["sh", "-c", ". /etc/os-release && echo $VERSION_ID"]).stdout.strip()
        assert release == "13"
        masked = sb.path("/etc/systemd/system-generators")
        lower_only = "systemd-ssh-generator"  # shipped by systemd 257, not by the host's 252
        assert (debian13_root / "usr/lib/systemd/system-generators" / lower_only).exists()
        assert os.readlink(masked / lower_only) == "/dev/null"
        shipped = {
            name
            for directory in GENERATOR_DIRS
            if (debian13_root / directory.lstrip("/")).is_dir()
            for name in os.listdir(debian13_root / directory.lstrip("/"))
        }
        assert {p.name for p in masked.iterdir()} >= shipped - KEPT_GENERATORS
        for kept in KEPT_GENERATORS & shipped:
            assert not (masked / kept).exists(), kept
        # Nothing enabled in the root's image runs: its Redis and Valkey stay off.
        for unit in ("redis-server.service", "valkey-server.service"):
            assert sb.systemctl("is-active", unit, check=False).stdout.strip() == "inactive"
    assert not (debian13_root / "etc/systemd/system-generators").exists()


@pytest.fixture
def host_tmp_marker() -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix="stellarbase-sandbox-marker-", dir="/tmp")
    os.close(fd)
    marker = Path(name)
    try:
        yield marker
    finally:
        marker.unlink(missing_ok=True)


def test_boot_leaves_host_tmp_alone(host_tmp_marker: Path, systemd_sandbox: SystemdSandbox) -> None:
    # The marker fixture is requested first, so the marker exists before the sandbox boots and
    # runs systemd-tmpfiles --remove, which empties /tmp on a real boot.
    assert host_tmp_marker.exists()
    hidden = systemd_sandbox.run(["test", "-e", str(host_tmp_marker)], check=False)
    assert hidden.returncode != 0, "the sandbox should have a private /tmp"


def test_loopback_is_shared_with_the_host(systemd_sandbox: SystemdSandbox) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), 5).close()"
        systemd_sandbox.run(["python3", "-c", connect])
        server.settimeout(5)
        conn, _ = server.accept()
        conn.close()


def test_killing_popen_kills_the_command_inside(systemd_sandbox: SystemdSandbox) -> None:
    sb = systemd_sandbox
    proc = sb.popen(["sh", "-c", "echo $$; exec sleep 1000"])
    assert proc.stdout is not None
    inner_pid = int(proc.stdout.readline())
    assert sb.run(["kill", "-0", str(inner_pid)], check=False).returncode == 0

    proc.kill()
    proc.communicate(timeout=10)

    assert proc.returncode == -signal.SIGKILL
    assert not sb.path(f"/proc/{inner_pid}").exists()


def test_terminating_popen_signals_the_command_inside(systemd_sandbox: SystemdSandbox) -> None:
    script = 'trap "echo got-term; exit 7" TERM; echo ready; while :; do sleep 0.1; done'
    proc = systemd_sandbox.popen(["sh", "-c", script])
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"

    proc.terminate()
    stdout, _ = proc.communicate(timeout=10)

    assert proc.returncode == 7
    assert "got-term" in stdout


def test_poweroff_ends_systemd_and_cleans_up(systemd_sandbox: SystemdSandbox) -> None:
    sb = systemd_sandbox
    pid, workdir, cgroup = sb.pid, sb.workdir, sb.cgroup
    assert workdir.is_dir()
    assert cgroup.is_dir()

    sb.poweroff()

    assert not _is_running_systemd(pid)
    assert not workdir.exists()
    assert not cgroup.exists()
    with pytest.raises(SandboxError):
        sb.run(["true"])
