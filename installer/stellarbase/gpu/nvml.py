"""The GPUs as the NVIDIA driver reports them, read through NVML (nvidia-ml-py, `pynvml`).

No library, no driver or a driver that does not answer is a state (`Inventory.error`),
never an exception. A field one GPU does not support is None. A GPU the driver counts but
cannot describe (lost, needs a reset) is left out and named in `Inventory.problems`, so no
inference unit is planned on it.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from stellarbase.errors import one_line
from stellarbase.gpu.inventory import Gpu, Inventory, MigDevice

T = TypeVar("T")

# Per-field errors that mean "this GPU or driver does not report it": the field is None.
_ABSENT = ("NotSupported", "FunctionNotFound", "NoPermission", "NotFound")

# Why nvmlInit failed, in words a platform engineer can act on.
_INIT_ERRORS = {
    "LibraryNotFound": "no NVIDIA driver: libnvidia-ml.so.1 was not found",
    "DriverNotLoaded": "the NVIDIA kernel driver is not loaded (nvidia module missing)",
    "LibRmVersionMismatch": (
        "the NVIDIA driver library and kernel module versions differ "
        "(a driver upgrade without a reboot)"
    ),
    "NoPermission": "no permission to open the NVIDIA devices (/dev/nvidia*)",
}


@dataclass(frozen=True)
class NvmlSource:
    """GpuSource backed by NVML; `library` is the pynvml module (tests pass a stand-in)."""

    library: Any = None

    def inventory(self) -> Inventory:
        try:
            nvml = self.library or importlib.import_module("pynvml")
        except ImportError:
            return Inventory(error="nvidia-ml-py (pynvml) is not installed")
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return Inventory(error=_init_error(nvml, exc))
        except OSError as exc:  # a library that exists but cannot be loaded
            return Inventory(error=f"NVML could not be loaded: {exc}")
        try:
            return _read(nvml)
        except nvml.NVMLError as exc:
            return Inventory(error=f"NVML: {one_line(exc)}")
        finally:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()


class XidWatcher:
    """Counts XID errors per GPU UUID from NVML's event stream, since the watcher started.

    NVML has no XID counter to read: critical XIDs arrive only as events, so one thread
    waits on them. GPUs that cannot deliver events are left out (no count, not zero).
    """

    WAIT_MS = 1000  # how often the thread looks at its stop flag

    def __init__(self, library: Any = None) -> None:
        self.library = library
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def run(self, stop: threading.Event) -> None:
        try:
            nvml = self.library or importlib.import_module("pynvml")
            nvml.nvmlInit()
        except Exception:  # no library or driver: the inventory already reports why
            return
        try:
            events = nvml.nvmlEventSetCreate()
            try:
                self._register(nvml, events)
                while not stop.is_set():
                    self._wait(nvml, events)
            finally:
                nvml.nvmlEventSetFree(events)
        except nvml.NVMLError:
            return
        finally:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()

    def _register(self, nvml: Any, events: Any) -> None:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
                with self._lock:
                    self._counts[_str(nvml.nvmlDeviceGetUUID(handle))] = 0

    def _wait(self, nvml: Any, events: Any) -> None:
        try:
            data = nvml.nvmlEventSetWait(events, self.WAIT_MS)
        except nvml.NVMLError as exc:
            if _kind(exc) == "Timeout":
                return
            raise
        if data.eventType & nvml.nvmlEventTypeXidCriticalError:
            uuid = _str(nvml.nvmlDeviceGetUUID(data.device))  # a MIG event names its GPU
            with self._lock:
                self._counts[uuid] = self._counts.get(uuid, 0) + 1


def _read(nvml: Any) -> Inventory:
    driver = _str(nvml.nvmlSystemGetDriverVersion())
    cuda = _optional(nvml, lambda: cuda_version(nvml.nvmlSystemGetCudaDriverVersion()))
    gpus: list[Gpu] = []
    problems: list[str] = []
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            gpus.append(_gpu(nvml, index))
        except nvml.NVMLError as exc:
            problems.append(f"GPU {index}: {one_line(exc)}")
    return Inventory(
        driver_version=driver, cuda_version=cuda, gpus=tuple(gpus), problems=tuple(problems)
    )


def _gpu(nvml: Any, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    mig_enabled, mig_pending = _mig_mode(nvml, handle)
    persistence = _optional(nvml, partial(nvml.nvmlDeviceGetPersistenceMode, handle))
    temperature = _optional(
        nvml, partial(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
    )
    power_mw = _optional(nvml, partial(nvml.nvmlDeviceGetPowerUsage, handle))
    utilization = _optional(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    ecc = _optional(
        nvml,
        partial(
            nvml.nvmlDeviceGetTotalEccErrors,
            handle,
            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nvml.NVML_VOLATILE_ECC,
        ),
    )
    return Gpu(
        index=index,
        uuid=_str(nvml.nvmlDeviceGetUUID(handle)),
        name=_str(nvml.nvmlDeviceGetName(handle)),
        memory_total_bytes=int(memory.total),
        memory_used_bytes=int(memory.used),
        mig_enabled=mig_enabled,
        mig_devices=_mig_devices(nvml, handle) if mig_enabled else (),
        mig_pending=mig_pending,
        ecc_uncorrected=None if ecc is None else int(ecc),
        persistence=None if persistence is None else persistence == nvml.NVML_FEATURE_ENABLED,
        temperature_c=None if temperature is None else float(temperature),
        power_w=None if power_mw is None else power_mw / 1000,
        utilization_pct=None if utilization is None else float(utilization),
    )


def _mig_mode(nvml: Any, handle: Any) -> tuple[bool, bool | None]:
    """(current, pending) MIG mode; (False, None) on a GPU without MIG."""
    modes = _optional(nvml, partial(nvml.nvmlDeviceGetMigMode, handle))
    if modes is None:
        return False, None
    current, pending = modes
    return current == nvml.NVML_DEVICE_MIG_ENABLE, pending == nvml.NVML_DEVICE_MIG_ENABLE


def _mig_devices(nvml: Any, handle: Any) -> tuple[MigDevice, ...]:
    devices: list[MigDevice] = []
    slots = _optional(nvml, partial(nvml.nvmlDeviceGetMaxMigDeviceCount, handle)) or 0
    for slot in range(slots):
        # Slots are sparse: an index with no MIG device behind it answers NotFound.
        mig = _optional(nvml, partial(nvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot))
        if mig is None:
            continue
        memory = _optional(nvml, partial(nvml.nvmlDeviceGetMemoryInfo, mig))
        total = int(memory.total) if memory is not None else 0
        used = int(memory.used) if memory is not None else 0
        devices.append(MigDevice(_str(nvml.nvmlDeviceGetUUID(mig)), total, used))
    return tuple(devices)


def cuda_version(number: int) -> str:
    """NVML's CUDA driver version number (12040) as CUDA writes it ("12.4")."""
    return f"{number // 1000}.{number % 1000 // 10}"


def _optional(nvml: Any, read: Callable[[], T]) -> T | None:
    try:
        return read()
    except nvml.NVMLError as exc:
        if _kind(exc) in _ABSENT:
            return None
        raise


def _init_error(nvml: Any, exc: Exception) -> str:
    return _INIT_ERRORS.get(_kind(exc)) or f"NVML could not start: {one_line(exc)}"


def _kind(exc: Exception) -> str:
    """NVMLError_NotSupported → "NotSupported"; pynvml makes one subclass per error code."""
    return type(exc).__name__.removeprefix("NVMLError_")


def _str(value: str | bytes) -> str:
    """nvidia-ml-py returns str; older pynvml releases returned bytes."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
