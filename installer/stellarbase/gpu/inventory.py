"""What the GPUs are, whichever source read them: the inventory and the source interface.

`GpuSource.inventory()` never raises: no driver, no library or no GPU is a state to report
(`Inventory.error`), not a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class MigDevice:
    uuid: str  # "MIG-…", what CUDA_VISIBLE_DEVICES takes
    memory_total_bytes: int = 0
    memory_used_bytes: int = 0


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str  # "GPU-…"
    name: str
    memory_total_bytes: int
    memory_used_bytes: int = 0
    mig_enabled: bool = False
    mig_devices: tuple[MigDevice, ...] = ()
    # MIG mode after the next GPU reset; differs from mig_enabled while a change is pending.
    mig_pending: bool | None = None
    ecc_uncorrected: int | None = None  # volatile uncorrected ECC errors; None: not supported
    persistence: bool | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    utilization_pct: float | None = None
    # XID errors counted by the source itself (the fake); NVML reports them only as events,
    # which nvml.XidWatcher counts.
    xid_errors: int | None = None


@dataclass(frozen=True)
class Inventory:
    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: tuple[Gpu, ...] = ()
    error: str | None = None  # why NVML could not be read (no driver, no library)
    source: str = "nvml"
    # GPUs the driver counts but could not describe ("GPU 1: GPU is lost"); left out of gpus.
    problems: tuple[str, ...] = ()


class GpuSource(Protocol):
    def inventory(self) -> Inventory: ...
