"""GPUs behind one small interface: the real NVML, or a fake described by a JSON file.

Modules: `inventory` (what a source reports), `nvml` (the NVIDIA driver), `fake` (a JSON
file, for tests). This module picks the source and the devices inference runs on.
"""

from __future__ import annotations

import os
from pathlib import Path

from stellarbase.gpu.fake import FAKE_ENV, FakeSource
from stellarbase.gpu.inventory import GpuSource, Inventory
from stellarbase.gpu.nvml import NvmlSource


def default_source() -> GpuSource:
    fake = os.environ.get(FAKE_ENV)
    if fake:
        return FakeSource(Path(fake))
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
