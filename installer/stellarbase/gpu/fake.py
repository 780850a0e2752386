"""Test-only GPUs: an inventory described by a JSON file, read instead of NVML (CI machines
have no GPU). `STELLARBASE_FAKE_NVML` names the file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stellarbase.gpu.inventory import Gpu, Inventory, MigDevice

FAKE_ENV = "STELLARBASE_FAKE_NVML"


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
