"""The GPU interface: the fake source, the serving devices, and NVML read through a stand-in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pynvml
import pytest

from stellarbase.gpu import default_source, serving_devices
from stellarbase.gpu.fake import FAKE_ENV, FakeSource
from stellarbase.gpu.inventory import Inventory
from stellarbase.gpu.nvml import NvmlSource, cuda_version

GIB = 1 << 30
TWO_GPUS = {
    "driver_version": "550.54.15",
    "cuda_version": "12.4",
    "gpus": [
        {"uuid": "GPU-aaaa", "name": "NVIDIA L40S", "memory_total_bytes": 48 * GIB},
        {
            "uuid": "GPU-bbbb",
            "name": "NVIDIA A100-SXM4-80GB",
            "memory_total_bytes": 80 * GIB,
            "mig_devices": [
                {"uuid": "MIG-b001", "memory_total_bytes": 20 * GIB},
                {"uuid": "MIG-b002", "memory_total_bytes": 20 * GIB},
                {"uuid": "MIG-b003", "memory_total_bytes": 40 * GIB},
            ],
        },
    ],
}


@pytest.fixture
def two_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Inventory:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(TWO_GPUS))
    monkeypatch.setenv(FAKE_ENV, str(path))
    source = default_source()
    assert isinstance(source, FakeSource)
    return source.inventory()


def test_fake_source_describes_two_gpus_one_in_mig_mode(two_gpus: Inventory) -> None:
    assert two_gpus.error is None and two_gpus.driver_version == "550.54.15"
    whole, mig = two_gpus.gpus
    assert (whole.index, whole.mig_enabled, whole.mig_devices) == (0, False, ())
    assert mig.index == 1 and mig.mig_enabled
    assert [m.uuid for m in mig.mig_devices] == ["MIG-b001", "MIG-b002", "MIG-b003"]


@pytest.mark.parametrize(
    ("gpus", "mig", "expected"),
    [
        ("all", "slices", ["GPU-aaaa", "MIG-b001", "MIG-b002", "MIG-b003"]),
        ("all", "whole", ["GPU-aaaa", "GPU-bbbb"]),
        (1, "slices", ["GPU-aaaa"]),
        (2, "slices", ["GPU-aaaa", "MIG-b001"]),
        (2, "whole", ["GPU-aaaa", "GPU-bbbb"]),
        (9, "slices", ["GPU-aaaa", "MIG-b001", "MIG-b002", "MIG-b003"]),
        (0, "slices", []),
        # A listed order does not matter: units come in device order.
        (["MIG-b003", "GPU-aaaa"], "slices", ["GPU-aaaa", "MIG-b003"]),
        # The MIG GPU's own UUID is only a serving device with mig=whole.
        (["GPU-bbbb"], "slices", []),
        (["GPU-bbbb"], "whole", ["GPU-bbbb"]),
        (["MIG-b001"], "whole", []),
    ],
)
def test_serving_devices(
    two_gpus: Inventory, gpus: str | int | list[str], mig: str, expected: list[str]
) -> None:
    assert serving_devices(two_gpus, gpus, mig) == expected


def test_no_driver_serves_nothing() -> None:
    assert serving_devices(Inventory(error="no NVIDIA driver"), "all", "slices") == []


# --- NVML through a stand-in for the pynvml module ------------------------------------


def _error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


class FakeNvml:
    """Answers like pynvml does, from a dict per GPU; handles are GPU indexes or MIG keys."""

    NVMLError = pynvml.NVMLError
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE

    def __init__(
        self,
        gpus: list[dict[str, Any]],
        *,
        driver: str | bytes = b"550.54.15",
        init_error: int | None = None,
        system_error: int | None = None,
    ) -> None:
        self.gpus = gpus
        self.driver = driver
        self.init_error = init_error
        self.system_error = system_error
        self.calls: list[str] = []

    def _answer(self, value: Any) -> Any:
        if isinstance(value, pynvml.NVMLError):
            raise value
        return value

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise _error(self.init_error)

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        if self.system_error is not None:
            raise _error(self.system_error)
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._answer(self.gpus[index].get("handle", index))
        return index

    def nvmlDeviceGetUUID(self, handle: Any) -> Any:
        if isinstance(handle, tuple):
            return self.gpus[handle[0]]["mig"][handle[1]][0]
        return self.gpus[handle]["uuid"]

    def nvmlDeviceGetName(self, handle: int) -> Any:
        return self.gpus[handle]["name"]

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        if isinstance(handle, tuple):
            total = self.gpus[handle[0]]["mig"][handle[1]][1]
            return pynvml.c_nvmlMemory_t(total=total, free=total, used=0)
        gpu = self.gpus[handle]
        return pynvml.c_nvmlMemory_t(total=gpu["total"], free=0, used=gpu["used"])

    def nvmlDeviceGetMigMode(self, handle: int) -> list[int]:
        return list(self._answer(self.gpus[handle].get("mig_mode", [0, 0])))

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: int) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: int, slot: int) -> tuple[int, int]:
        if slot not in self.gpus[handle].get("mig", {}):
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        return (handle, slot)

    def nvmlDeviceGetTotalEccErrors(self, handle: int, kind: int, counter: int) -> int:
        assert (kind, counter) == (1, 0)  # uncorrected, volatile
        return int(self._answer(self.gpus[handle]["ecc"]))

    def nvmlDeviceGetPersistenceMode(self, handle: int) -> int:
        return int(self.gpus[handle]["persistence"])

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return int(self.gpus[handle]["temperature"])

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return int(self.gpus[handle]["power_mw"])

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        gpu = self._answer(self.gpus[handle]["utilization"])
        return pynvml.c_nvmlUtilization_t(gpu=gpu, memory=0)


NOT_SUPPORTED = _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
WHOLE = {
    "uuid": b"GPU-aaaa",  # old pynvml releases answer bytes
    "name": b"NVIDIA L40S",
    "total": 48 * GIB,
    "used": 1 * GIB,
    "ecc": NOT_SUPPORTED,
    "persistence": 1,
    "temperature": 41,
    "power_mw": 250_500,
    "utilization": 37,
}
MIG = {
    "uuid": "GPU-bbbb",
    "name": "NVIDIA A100-SXM4-80GB",
    "total": 80 * GIB,
    "used": 0,
    "mig_mode": [1, 1],
    # Sparse slots, as after instances were destroyed and created again.
    "mig": {0: ("MIG-b001", 20 * GIB), 3: (b"MIG-b002", 20 * GIB), 5: ("MIG-b003", 40 * GIB)},
    "ecc": 3,
    "persistence": 0,
    "temperature": 55,
    "power_mw": 90_000,
    "utilization": NOT_SUPPORTED,  # not reported in MIG mode
}


def test_nvml_reads_every_field_as_str_and_numbers() -> None:
    fake = FakeNvml([WHOLE, MIG])
    inv = NvmlSource(fake).inventory()
    assert inv.error is None and inv.problems == ()
    assert (inv.driver_version, inv.cuda_version) == ("550.54.15", "12.4")
    whole, mig = inv.gpus
    assert (whole.uuid, whole.name) == ("GPU-aaaa", "NVIDIA L40S")
    assert (whole.memory_total_bytes, whole.memory_used_bytes) == (48 * GIB, 1 * GIB)
    assert whole.ecc_uncorrected is None  # NotSupported
    assert (whole.persistence, whole.temperature_c) == (True, 41.0)
    assert (whole.power_w, whole.utilization_pct) == (250.5, 37.0)
    assert (whole.mig_enabled, whole.mig_devices) == (False, ())
    assert mig.mig_enabled and mig.mig_pending is True
    assert [(m.uuid, m.memory_total_bytes // GIB) for m in mig.mig_devices] == [
        ("MIG-b001", 20),
        ("MIG-b002", 20),
        ("MIG-b003", 40),
    ]
    assert (mig.ecc_uncorrected, mig.persistence, mig.utilization_pct) == (3, False, None)
    assert fake.calls == ["init", "shutdown"]


def test_nvml_mig_devices_serve_as_slices() -> None:
    inv = NvmlSource(FakeNvml([WHOLE, MIG])).inventory()
    assert serving_devices(inv, "all", "slices") == ["GPU-aaaa", "MIG-b001", "MIG-b002", "MIG-b003"]


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "kernel driver is not loaded"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "versions differ"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no permission"),
        (pynvml.NVML_ERROR_UNKNOWN, "NVML could not start: Unknown Error"),
    ],
)
def test_nvml_init_failure_is_a_state(code: int, says: str) -> None:
    fake = FakeNvml([WHOLE], init_error=code)
    inv = NvmlSource(fake).inventory()
    assert inv.error is not None and says in inv.error
    assert inv.gpus == () and inv.driver_version is None
    assert fake.calls == ["init"]  # nothing to shut down


def test_nvml_failure_after_init_is_a_state_and_shuts_down() -> None:
    fake = FakeNvml([WHOLE], system_error=pynvml.NVML_ERROR_UNKNOWN)
    inv = NvmlSource(fake).inventory()
    assert inv.error == "NVML: Unknown Error"
    assert fake.calls == ["init", "shutdown"]


def test_lost_gpu_is_named_and_gets_no_unit() -> None:
    lost = {**MIG, "handle": _error(pynvml.NVML_ERROR_GPU_IS_LOST)}
    inv = NvmlSource(FakeNvml([WHOLE, lost])).inventory()
    assert [g.uuid for g in inv.gpus] == ["GPU-aaaa"]
    assert inv.problems == ("GPU 1: GPU is lost",)
    assert serving_devices(inv, "all", "slices") == ["GPU-aaaa"]


def test_str_driver_version_from_current_nvidia_ml_py() -> None:
    inv = NvmlSource(FakeNvml([WHOLE], driver="535.104.05")).inventory()
    assert inv.driver_version == "535.104.05"


def test_real_pynvml_without_the_library_reports_no_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "CDLL", missing)
    inv = NvmlSource().inventory()
    assert inv.error == "no NVIDIA driver: libnvidia-ml.so.1 was not found"
    assert inv.gpus == ()


@pytest.mark.parametrize(("number", "text"), [(12040, "12.4"), (11080, "11.8"), (13000, "13.0")])
def test_cuda_version_as_cuda_writes_it(number: int, text: str) -> None:
    assert cuda_version(number) == text
