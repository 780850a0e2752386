"""The real NVML on a machine with an NVIDIA driver and GPU: what NvmlSource reads, and what
the GPU preflight makes of it. Skipped where there is no driver.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from stellarbase.configload import load_config
from stellarbase.gpu import serving_devices
from stellarbase.gpu.nvml import NvmlSource
from stellarbase.paths import HostPaths
from stellarbase.preflight import Context, Level, run_checks
from stellarbase.preflight import gpu as gpu_checks


def _nvml_available() -> bool:
    if not Path("/proc/driver/nvidia/version").exists():  # the kernel module is loaded
        return False
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _nvml_available(), reason="no NVIDIA driver (libnvidia-ml.so.1)"),
]


def test_nvml_reads_the_gpus() -> None:
    inv = NvmlSource().inventory()
    print(f"\ndriver {inv.driver_version}, CUDA {inv.cuda_version}, problems {inv.problems}")
    for g in inv.gpus:
        print(
            f"GPU {g.index} {g.uuid} {g.name} {g.memory_total_bytes / (1 << 30):.1f} GiB "
            f"(used {g.memory_used_bytes / (1 << 30):.1f}) mig={g.mig_enabled}"
            f"/{g.mig_pending} ecc={g.ecc_uncorrected} persistence={g.persistence} "
            f"{g.temperature_c} C {g.power_w} W {g.utilization_pct} %"
        )
        for m in g.mig_devices:
            print(f"  {m.uuid} {m.memory_total_bytes / (1 << 30):.1f} GiB")
    print("serving (slices):", serving_devices(inv, "all", "slices"))
    assert inv.error is None, inv.error
    assert inv.driver_version and inv.driver_version[0].isdigit()
    assert inv.cuda_version and "." in inv.cuda_version
    assert inv.gpus, "the driver is loaded but NVML lists no GPU"
    for g in inv.gpus:
        assert g.uuid.startswith("GPU-") and g.name
        assert g.memory_total_bytes > 0
        assert all(m.uuid.startswith("MIG-") for m in g.mig_devices)
        assert g.mig_devices == () or g.mig_enabled


def test_gpu_preflight_on_the_real_gpus() -> None:
    config = load_config(tier="enterprise", env={}).config
    ctx = Context(config, HostPaths(), gpus=NvmlSource().inventory)
    found = run_checks(gpu_checks.checks(ctx))
    for f in found:
        print(f"{f.check:16} {f.level.value:4} {f.seconds * 1000:7.1f} ms  {f.value}")
        if f.hint:
            print(f"{'':16} hint: {f.hint}")
    names = {f.check for f in found}
    assert {"gpu.driver", "gpu.cuda", "gpu.count", "gpu.memory", "gpu.mig"} <= names
    by_name = {f.check: f for f in found}
    assert by_name["gpu.count"].level != Level.FAIL
