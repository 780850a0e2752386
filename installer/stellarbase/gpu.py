"""GPUs behind one small interface: the real NVML, or a fake described by a JSON file.

`inventory()` never raises: no driver, no library or no GPU is a state to report
(`Inventory.error`), not a crash.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Test-only: a JSON file describing GPUs, read instead of NVML (CI machines have no GPU).
FAKE_ENV = "STELLARBASE_FAKE_NVML"


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


@dataclass(frozen=True)
class FakeSource:
    """GPUs as described by a JSON file: {"driver_version", "cuda_version", "gpus": [...]}."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    def inventory(self) -> Inventory:
        data = json.loads(self.path.read_text())
        gpus = tuple(
            Gpu(
                index=i,
                uuid=g["uuid"],
                name=g.get("name", "Fake GPU"),
                memory_total_bytes=int(g.get("memory_total_bytes", 80 << 30)),
                memory_used_bytes=int(g.get("memory_used_bytes", 0)),
                mig_enabled=bool(g.get("mig_devices")) or bool(g.get("mig_enabled")),
                mig_devices=tuple(
                    MigDevice(
                        m["uuid"],
                        int(m.get("memory_total_bytes", 0)),
                        int(m.get("memory_used_bytes", 0)),
                    )
                    for m in g.get("mig_devices", [])
                ),
                mig_pending=g.get("mig_pending"),
                ecc_uncorrected=g.get("ecc_uncorrected"),
                persistence=g.get("persistence"),
                temperature_c=g.get("temperature_c"),
                power_w=g.get("power_w"),
                utilization_pct=g.get("utilization_pct"),
                xid_errors=g.get("xid_errors"),
            )
            for i, g in enumerate(data.get("gpus", []))
        )
        return Inventory(
            driver_version=data.get("driver_version"),
            cuda_version=data.get("cuda_version"),
            gpus=gpus,
            error=data.get("error"),
            source=f"fake ({self.path})",
            problems=tuple(data.get("problems", [])),
        )


def default_source() -> GpuSource:
    fake = os.environ.get(FAKE_ENV)
    if fake:
        return FakeSource(Path(fake))
    from stellarbase.nvml import NvmlSource

    return NvmlSource()


def serving_devices(inventory: Inventory, gpus: str | int | list[str], mig: str) -> list[str]:
    """The CUDA_VISIBLE_DEVICES ids to run one inference unit each on, in a stable order.

    A GPU in MIG mode gives one id per MIG instance with mig=slices, or its own UUID with
    mig=whole; `gpus` narrows the list to all, the first N, or the listed UUIDs.
    """
    devices: list[str] = []
    for gpu in sorted(inventory.gpus, key=lambda g: g.index):
        if gpu.mig_enabled and mig == "slices" and gpu.mig_devices:
            devices += [m.uuid for m in gpu.mig_devices]
        else:
            devices.append(gpu.uuid)
    if gpus == "all":
        return devices
    if isinstance(gpus, int):
        return devices[:gpus]
    wanted = set(gpus)
    return [d for d in devices if d in wanted]
