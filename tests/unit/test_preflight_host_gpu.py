"""Preflight of the GPUs (against fake inventories) and of the host (against this host)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from stellarbase.config import Config
from stellarbase.configload import load_config
from stellarbase.gpu.fake import FakeSource
from stellarbase.gpu.inventory import Gpu, Inventory, MigDevice
from stellarbase.paths import HostPaths
from stellarbase.preflight import Context, Finding, Level, run_checks
from stellarbase.preflight import gpu as gpu_checks
from stellarbase.preflight import host as host_checks
from tests.servers import distinct_free_ports

GIB = 1 << 30
HOST_FINDINGS = {
    "host.os",
    "host.kernel",
    "host.arch",
    "host.cpus",
    "host.memory",
    "host.disk",
    "host.ports",
    "host.backup",
    "host.systemd",
    "host.clock",
    "host.nofile",
    "host.lsm",
    "host.root",
}
# Checks that run commands; the others only read /proc, /sys, /etc and bind sockets.
COMMAND_CHECKS = ["host.systemd", "host.clock"]


def _config(*sets: str, tier: str = "pilot") -> Config:
    return load_config(sets=list(sets), tier=tier, env={}).config


def _gpu(index: int, **kw: object) -> Gpu:
    fields: dict[str, object] = {
        "uuid": f"GPU-{index:04d}",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total_bytes": 80 * GIB,
        "ecc_uncorrected": 0,
        "persistence": True,
    }
    fields.update(kw)
    return Gpu(index, **fields)  # type: ignore[arg-type]


HEALTHY = Inventory(
    driver_version="550.54.15",
    cuda_version="12.4",
    gpus=(
        _gpu(0),
        _gpu(
            1,
            mig_enabled=True,
            mig_pending=True,
            mig_devices=tuple(MigDevice(f"MIG-{n}", 40 * GIB) for n in range(2)),
        ),
    ),
)


def _gpu_findings(config: Config, inventory: Inventory | None) -> dict[str, Finding]:
    ctx = Context(config, HostPaths(), gpus=lambda: inventory)
    found = run_checks(gpu_checks.checks(ctx))
    by_name = {f.check: f for f in found}
    assert len(by_name) == len(found), "one finding per name"
    return by_name


# --- GPU ------------------------------------------------------------------------------


def test_healthy_gpus_pass_with_mig_as_a_note() -> None:
    found = _gpu_findings(_config(tier="enterprise"), HEALTHY)
    assert set(found) == {
        "gpu.driver",
        "gpu.cuda",
        "gpu.count",
        "gpu.serving",
        "gpu.memory",
        "gpu.mig",
        "gpu.ecc",
        "gpu.persistence",
    }
    assert {f.level for name, f in found.items() if name != "gpu.mig"} == {Level.PASS}
    mig = found["gpu.mig"]
    assert mig.level == Level.NOTE
    assert "GPU 0 MIG off" in mig.value and "GPU 1 MIG on, 2 MIG device(s)" in mig.value
    assert found["gpu.serving"].value == (
        "3 inference unit(s) on port 8400-8402: GPU-0000, MIG-0, MIG-1"
    )
    assert found["gpu.cuda"].value.startswith("CUDA 12.4")


def test_fake_source_file_feeds_the_checks(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"driver_version": "550.54.15", "gpus": [{"uuid": "GPU-x"}]}))
    found = _gpu_findings(_config(tier="enterprise"), FakeSource(path).inventory())
    assert found["gpu.count"].level == Level.PASS
    assert found["gpu.count"].value == "1 GPU(s), 1 x Fake GPU"
    assert found["gpu.cuda"].level == Level.NOTE  # the file names no CUDA version


@pytest.mark.parametrize(
    "inventory",
    [
        Inventory(error="no NVIDIA driver: libnvidia-ml.so.1 was not found"),
        Inventory(driver_version="550.54.15"),  # a driver, but no GPU
        None,  # no GPU source at all
    ],
)
def test_no_gpu_on_pilot_is_one_note(inventory: Inventory | None) -> None:
    found = run_checks(gpu_checks.checks(Context(_config(), HostPaths(), gpus=lambda: inventory)))
    assert len(found) == 1
    assert found[0].level == Level.NOTE
    assert "GPU inference is off" in found[0].value


def test_inference_turned_off_does_not_ask_the_driver() -> None:
    def never() -> Inventory:
        raise AssertionError("the GPU source was asked")

    ctx = Context(_config("inference.gpus=0"), HostPaths(), gpus=never)
    [finding] = run_checks(gpu_checks.checks(ctx))
    assert finding.level == Level.NOTE and "inference.gpus=0" in finding.value


def test_no_driver_on_enterprise_fails_with_the_driver_to_install() -> None:
    found = _gpu_findings(_config(tier="enterprise"), Inventory(error="no NVIDIA driver"))
    assert list(found) == ["gpu.driver"]
    driver = found["gpu.driver"]
    assert driver.level == Level.FAIL
    assert driver.value == "no NVIDIA driver"
    assert "≥ 1 NVIDIA GPU" in driver.requirement
    assert "install the NVIDIA driver ≥ 535" in driver.hint


def test_no_gpu_on_enterprise_fails() -> None:
    found = _gpu_findings(_config(tier="enterprise"), Inventory(driver_version="550.54.15"))
    assert list(found) == ["gpu.count"]
    assert found["gpu.count"].level == Level.FAIL


def test_old_driver_fails_with_value_and_requirement() -> None:
    old = replace(HEALTHY, driver_version="470.82.01")
    driver = _gpu_findings(_config(tier="enterprise"), old)["gpu.driver"]
    assert (driver.level, driver.value, driver.requirement) == (
        Level.FAIL,
        "470.82.01",
        "≥ 535",
    )
    assert "upgrade the NVIDIA driver" in driver.hint


def test_driver_versions_compare_as_numbers() -> None:
    # As text "535.104.05" < "535.54" would fail; as numbers 104 > 54 passes.
    config = _config("requirements.min_driver='535.54'", tier="enterprise")
    newer = replace(HEALTHY, driver_version="535.104.05")
    assert _gpu_findings(config, newer)["gpu.driver"].level == Level.PASS
    older = replace(HEALTHY, driver_version="535.9")
    assert _gpu_findings(config, older)["gpu.driver"].level == Level.FAIL


def test_too_few_gpus_fail() -> None:
    config = _config("requirements.min_gpus=4", tier="enterprise")
    count = _gpu_findings(config, HEALTHY)["gpu.count"]
    assert (count.level, count.requirement) == (Level.FAIL, "≥ 4")
    assert count.value.startswith("2 GPU(s)")


def test_small_gpu_fails_memory() -> None:
    small = replace(HEALTHY, gpus=(_gpu(0, memory_total_bytes=16 * GIB), _gpu(1)))
    memory = _gpu_findings(_config(tier="enterprise"), small)["gpu.memory"]
    assert memory.level == Level.FAIL
    assert memory.value == "GPU 0 16.0 GiB, GPU 1 80.0 GiB"
    assert memory.requirement == "≥ 24 GiB per GPU"
    assert memory.hint.startswith("GPU 0 below 24 GiB")


def test_small_mig_slices_warn_on_memory() -> None:
    config = _config("requirements.min_gpu_memory_gib=60", tier="enterprise")
    memory = _gpu_findings(config, HEALTHY)["gpu.memory"]
    assert memory.level == Level.WARN
    assert "MIG-0 40.0 GiB" in memory.value and "inference.mig=whole" in memory.hint


def test_uncorrected_ecc_errors_warn() -> None:
    bad = replace(HEALTHY, gpus=(_gpu(0), _gpu(1, ecc_uncorrected=3)))
    ecc = _gpu_findings(_config(tier="enterprise"), bad)["gpu.ecc"]
    assert ecc.level == Level.WARN
    assert ecc.value == "GPU 0 0, GPU 1 3"
    assert "nvidia-smi -q -d ECC -i 1" in ecc.hint and "nvidia-smi -r -i 1" in ecc.hint


def test_ecc_not_supported_is_a_note() -> None:
    plain = replace(HEALTHY, gpus=(_gpu(0, ecc_uncorrected=None),))
    assert _gpu_findings(_config(), plain)["gpu.ecc"].level == Level.NOTE


def test_persistence_off_warns() -> None:
    off = replace(HEALTHY, gpus=(_gpu(0, persistence=False), _gpu(1)))
    persistence = _gpu_findings(_config(), off)["gpu.persistence"]
    assert persistence.level == Level.WARN
    assert persistence.value == "GPU 0 off, GPU 1 on"
    assert "nvidia-smi -pm 1" in persistence.hint


def test_mig_change_waiting_for_a_reset_warns() -> None:
    pending = replace(HEALTHY, gpus=(_gpu(0, mig_pending=True),))
    mig = _gpu_findings(_config(), pending)["gpu.mig"]
    assert mig.level == Level.WARN
    assert "on after a GPU reset" in mig.value and "nvidia-smi -r -i 0" in mig.hint


def test_mig_gpu_without_instances_warns() -> None:
    empty = replace(HEALTHY, gpus=(_gpu(0, mig_enabled=True, mig_pending=True),))
    mig = _gpu_findings(_config(), empty)["gpu.mig"]
    assert mig.level == Level.WARN and "-cgi" in mig.hint


def test_unreadable_gpu_warns_on_count() -> None:
    lost = replace(HEALTHY, gpus=(_gpu(0),), problems=("GPU 1: GPU is lost",))
    count = _gpu_findings(_config(), lost)["gpu.count"]
    assert count.level == Level.WARN
    assert count.value.endswith("unreadable: GPU 1: GPU is lost")


def test_listed_device_that_is_not_there_fails_serving() -> None:
    config = _config("inference.gpus=[GPU-0000, MIG-9]")
    serving = _gpu_findings(config, HEALTHY)["gpu.serving"]
    assert (serving.level, serving.value) == (Level.FAIL, "not found: MIG-9")


def test_busy_inference_port_fails_serving() -> None:
    with _listening() as port:
        config = _config(f"inference.port={port}")
        serving = _gpu_findings(config, HEALTHY)["gpu.serving"]
    assert serving.level == Level.FAIL
    assert f"in use: {port} by pid" in serving.value
    assert "--set inference.port=PORT" in serving.hint


# --- host -----------------------------------------------------------------------------


@pytest.fixture
def free_ports() -> list[str]:
    """--set values that move every port of the config to ports free right now."""
    keys = ["api.port", "agent.port", "worker.port", "local.postgres.port", "local.redis.port"]
    return [f"{key}={port}" for key, port in zip(keys, distinct_free_ports(len(keys)), strict=True)]


def _host_findings(
    config: Config,
    paths: HostPaths | None = None,
    *,
    own_ports: frozenset[int] = frozenset(),
    skip: list[str] | None = None,
) -> dict[str, Finding]:
    ctx = Context(config, paths or HostPaths(), own_ports=own_ports)
    return {f.check: f for f in run_checks(host_checks.checks(ctx), skip=skip or [])}


@contextmanager
def _listening(address: str = "127.0.0.1") -> Iterator[int]:
    """A port some other process holds, as far as the checks can tell."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        sock.listen()
        yield sock.getsockname()[1]


@contextmanager
def _listening_after_a_free_port() -> Iterator[int]:
    """A held port P whose neighbour P-1 is free, for a worker range that starts at P-1."""
    for _ in range(50):
        with socket.socket() as below, socket.socket() as sock:
            below.bind(("127.0.0.1", 0))
            port = below.getsockname()[1] + 1
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            below.close()
            sock.listen()
            yield port
            return
    raise AssertionError("no two neighbouring free ports")


@pytest.mark.host_commands  # systemctl --version, timedatectl
def test_this_host_passes_or_warns_quickly(free_ports: list[str]) -> None:
    start = time.monotonic()
    found = _host_findings(_config(*free_ports))
    took = time.monotonic() - start
    assert set(found) == HOST_FINDINGS
    failing = {name: f.value for name, f in found.items() if f.level == Level.FAIL}
    if not Path("/run/systemd/system").is_dir():  # a container: systemd is not PID 1 here
        failing.pop("host.systemd")
    assert not failing
    for finding in found.values():
        assert finding.value
        if finding.level == Level.WARN:
            assert finding.hint and finding.requirement, finding
    assert took < 2.0, f"host preflight took {took:.3f}s"
    for f in found.values():
        print(f"{f.check:15} {f.level.value:4} {f.seconds * 1000:6.1f} ms  {f.value}")


@pytest.mark.host_commands
def test_systemd_and_clock_of_this_host() -> None:
    found = _host_findings(_config(), skip=["host.disk", "host.ports"])
    if Path("/run/systemd/system").is_dir():
        assert found["host.systemd"].level == Level.PASS
        assert found["host.systemd"].value.startswith("systemd ")
    else:  # a container or chroot: what runs as PID 1 is not systemd
        assert found["host.systemd"].level == Level.FAIL
        assert "--root" in found["host.systemd"].hint
    clock = found["host.clock"]
    assert clock.level in (Level.PASS, Level.WARN, Level.NOTE)
    assert "timedatectl" in clock.value or "adjtimex" in clock.value or "unknown" in clock.value


@pytest.mark.parametrize(
    ("setting", "check", "requirement"),
    [
        ("requirements.min_cpus=999", "host.cpus", "≥ 999"),
        ("requirements.min_memory_gib=99999", "host.memory", "≥ 99999 GiB installed"),
        ("requirements.min_disk_gib=999999", "host.disk", "≥ 999999 GiB free for"),
    ],
)
def test_raised_requirements_fail(
    tmp_path: Path, free_ports: list[str], setting: str, check: str, requirement: str
) -> None:
    config = _config(setting, *free_ports)
    found = _host_findings(config, HostPaths(tmp_path), skip=COMMAND_CHECKS)
    finding = found[check]
    assert finding.level == Level.FAIL
    assert finding.requirement.startswith(requirement)
    assert finding.value and finding.hint
    others = {name for name, f in found.items() if f.level == Level.FAIL}
    assert others == {check}


def test_disk_is_measured_at_the_nearest_existing_parent(tmp_path: Path) -> None:
    finding = host_checks.disk_finding(HostPaths(tmp_path), 0)
    assert finding.level == Level.PASS
    assert finding.value.endswith(f"GiB free at {tmp_path}")  # var/lib/stellarbase is not there
    assert finding.requirement.endswith(str(tmp_path / "var/lib/stellarbase"))


def test_busy_port_fails_and_names_the_holder(free_ports: list[str]) -> None:
    with _listening() as port:
        config = _config(*free_ports, f"api.port={port}")
        ctx = Context(config, HostPaths())
        [ports] = run_checks([c for c in host_checks.checks(ctx) if c.name == "host.ports"])
    assert ports.level == Level.FAIL
    assert ports.value.startswith(f"api.port {port} in use by pid ")
    assert ports.hint.endswith("--set api.port=PORT")


def test_busy_worker_instance_port_names_the_range_key(free_ports: list[str]) -> None:
    with _listening_after_a_free_port() as port:
        config = _config(*free_ports, f"worker.port={port - 1}", "worker.instances=2")
        ports = host_checks.ports_finding(config, frozenset())
    assert ports.level == Level.FAIL
    assert ports.value.startswith(f"worker.port+1 {port} in use by ")
    assert "--set worker.port=PORT" in ports.hint


def test_a_port_of_this_installation_is_not_busy(free_ports: list[str]) -> None:
    with _listening() as port:
        config = _config(*free_ports, f"api.port={port}")
        ports = host_checks.ports_finding(config, frozenset({port}))
    assert ports.level == Level.PASS
    assert f"({port} ours)" in ports.value


def test_bind_address_not_on_this_host_fails() -> None:
    config = _config("bind=192.0.2.1")  # TEST-NET-1: never a local address
    ports = host_checks.ports_finding(config, frozenset())
    assert ports.level == Level.FAIL
    assert "cannot bind 192.0.2.1" in ports.value and "--set bind=" in ports.hint


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ('ID=debian\nVERSION_ID="12"\n', Level.PASS),
        ('ID=ubuntu\nVERSION_ID="24.04"\n', Level.PASS),
        ('ID=ubuntu\nVERSION_ID="20.04"\n', Level.WARN),
        ('ID="rocky"\nVERSION_ID="9.4"\n', Level.PASS),
        ('ID="rhel"\nVERSION_ID="8.10"\n', Level.WARN),
        ("ID=arch\n", Level.WARN),
        ("", Level.WARN),
    ],
)
def test_os_release_against_the_supported_list(text: str, level: Level) -> None:
    finding = host_checks.os_finding(host_checks.parse_os_release(text))
    assert finding.level == level
    assert finding.requirement == "debian 12, ubuntu 22.04/24.04, rhel/rocky/almalinux 9"


@pytest.mark.parametrize(
    ("output", "level"),
    [
        ("systemd 252 (252.38-1~deb12u1)\n+PAM +AUDIT", Level.PASS),
        ("systemd 249 (249.11-0ubuntu3)", Level.PASS),
        ("systemd 245 (245.4-4ubuntu3.22)", Level.FAIL),
        ("garbage", Level.FAIL),
    ],
)
def test_systemd_version(output: str, level: Level) -> None:
    finding = host_checks.systemd_version_finding(output)
    assert finding.level == level
    assert finding.requirement == "≥ 249"


def test_open_file_limit() -> None:
    assert host_checks.nofile_finding(1024, None).level == Level.WARN
    assert host_checks.nofile_finding(1 << 20, None).level == Level.PASS
    by_unit = host_checks.nofile_finding(1024, "65536")
    assert by_unit.level == Level.PASS and "LimitNOFILE=65536" in by_unit.value


def test_arch() -> None:
    assert host_checks.arch_finding("aarch64").level == Level.PASS
    assert host_checks.arch_finding("riscv64").level == Level.FAIL


def test_root_needed_only_on_the_live_system(tmp_path: Path) -> None:
    assert host_checks.root_finding(HostPaths(), True).level == Level.PASS
    user = host_checks.root_finding(HostPaths(), False)
    assert user.level == Level.FAIL and "sudo" in user.hint
    assert host_checks.root_finding(HostPaths(tmp_path), False).level == Level.NOTE


def test_memory_allows_what_the_kernel_keeps() -> None:
    assert host_checks.memory_finding(int(15.3 * GIB), 16).level == Level.PASS
    assert host_checks.memory_finding(int(12 * GIB), 16).level == Level.FAIL


def test_host_checks_run_no_commands_when_those_are_skipped(tmp_path: Path) -> None:
    # The autouse fixture makes any command fail the test: only systemd and clock run one.
    found = _host_findings(_config(), HostPaths(tmp_path), skip=COMMAND_CHECKS)
    assert set(found) == HOST_FINDINGS - set(COMMAND_CHECKS)


def test_backup_repository_findings(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    off = host_checks.backup_finding(_config(), paths)
    assert off.level == Level.NOTE and "backup.repository" in off.hint
    assert host_checks.backup_finding(_config(tier="department"), paths).level == Level.WARN
    config = _config("backup.repository=file:///srv/backups")
    assert host_checks.backup_finding(config, paths).level == Level.PASS  # / is writable
    (tmp_path / "srv").write_text("a file where the directory should go")
    blocked = host_checks.backup_finding(config, paths)
    assert blocked.level == Level.FAIL and "install -d" in blocked.hint


@pytest.mark.host_commands  # systemctl --version answers even where systemd is not PID 1
@pytest.mark.parametrize("pid1", ["bash", "init", ""])
def test_systemd_installed_but_not_running_as_init_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pid1: str
) -> None:
    """A container, WSL or a chroot has the package but not the service manager."""
    monkeypatch.setattr(host_checks, "SYSTEMD_RUNTIME_DIR", tmp_path / "absent", raising=False)
    comm = tmp_path / "comm"
    if pid1:
        comm.write_text(pid1 + "\n")
    monkeypatch.setattr(host_checks, "PID1_COMM", comm, raising=False)
    finding = _host_findings(_config(), skip=["host.disk", "host.ports"])["host.systemd"]
    assert finding.level == Level.FAIL
    assert "not booted with systemd" in finding.value
    assert "--root" in finding.hint and "VM" in finding.hint


def test_systemd_running_as_init_is_read_from_the_runtime_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(host_checks, "SYSTEMD_RUNTIME_DIR", tmp_path, raising=False)
    assert host_checks.init_problem() is None
    monkeypatch.setattr(host_checks, "SYSTEMD_RUNTIME_DIR", tmp_path / "absent", raising=False)
    assert host_checks.init_problem() is not None


def test_a_files_only_install_needs_no_running_systemd(tmp_path: Path) -> None:
    finding = host_checks.systemd_finding(HostPaths(tmp_path))
    assert finding.level == Level.NOTE and str(tmp_path) in finding.value
