"""Inference units follow the GPUs and MIG instances that NVML (here: the fake) reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stellarbase import gpu, layout
from stellarbase.configload import load_config
from stellarbase.facts import Facts
from stellarbase.gpu.fake import FAKE_ENV, FakeSource
from stellarbase.paths import HostPaths
from stellarbase.plan import make_plan
from stellarbase.steps import StartUnit, WaitHealthy

TWO_GPUS = {
    "driver_version": "550.54.15",
    "cuda_version": "12.4",
    "gpus": [
        {"uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "name": "H100"},
        {
            "uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000",
            "name": "H100",
            "mig_devices": [
                {"uuid": f"MIG-cccccccc-0000-0000-0000-00000000000{n}"} for n in range(3)
            ],
        },
    ],
}
SLICES = [
    "GPU-aaaaaaaa-0000-0000-0000-000000000000",
    "MIG-cccccccc-0000-0000-0000-000000000000",
    "MIG-cccccccc-0000-0000-0000-000000000001",
    "MIG-cccccccc-0000-0000-0000-000000000002",
]


@pytest.fixture
def fake_nvml(tmp_path: Path) -> Path:
    path = tmp_path / "nvml.json"
    path.write_text(json.dumps(TWO_GPUS))
    return path


def _plan(devices: list[str], *sets: str) -> list[object]:
    config = load_config(sets=["dependencies.mode=external", *sets], env={}).config
    facts = Facts("0.1.0", Path("/bin/true"), "digest", gpu_devices=tuple(devices))
    return list(make_plan(config, HostPaths(), facts).steps)


def test_two_gpus_one_in_mig_mode_give_four_units(fake_nvml: Path) -> None:
    inventory = FakeSource(fake_nvml).inventory()
    devices = gpu.serving_devices(inventory, "all", "slices")
    assert devices == SLICES
    steps = _plan(devices)
    started = [s.unit for s in steps if isinstance(s, StartUnit) and "inference" in s.unit]
    assert started == [f"stellarbase-inference@{d}.service" for d in SLICES]
    wait = next(s for s in steps if isinstance(s, WaitHealthy))
    assert set(started) <= set(wait.units)
    envs = {
        s.path.name: s.content.decode()
        for s in steps
        if getattr(s, "path", Path()).parent == HostPaths().inference_env_dir
    }
    assert envs == {f"{d}.env": envs[f"{d}.env"] for d in SLICES}
    assert 'PORT="8403"' in envs[f"{SLICES[3]}.env"]
    template = next(
        s.content.decode()
        for s in steps
        if getattr(s, "path", None) == HostPaths().unit_dir / layout.INFERENCE_TEMPLATE
    )
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in template
    assert "PrivateDevices=yes" not in template and "DeviceAllow=char-nvidia-uvm rw" in template


def test_whole_gpus_counts_and_lists(fake_nvml: Path) -> None:
    inventory = FakeSource(fake_nvml).inventory()
    whole = gpu.serving_devices(inventory, "all", "whole")
    assert whole == [g["uuid"] for g in TWO_GPUS["gpus"]]  # type: ignore[index]
    assert gpu.serving_devices(inventory, 2, "slices") == SLICES[:2]
    assert gpu.serving_devices(inventory, [SLICES[2]], "slices") == [SLICES[2]]


def test_no_gpu_no_inference_unit() -> None:
    steps = _plan([])
    touched = [str(getattr(s, "path", getattr(s, "unit", ""))) for s in steps]
    assert not [t for t in touched if "inference" in t]


def test_plan_cli_follows_the_fake_nvml(fake_nvml: Path, tmp_path: Path) -> None:
    """Removing a GPU from the inventory removes exactly its units' files."""
    binary = tmp_path / "bin"
    binary.write_text("x")
    root = tmp_path / "root"
    env = {
        **os.environ,
        FAKE_ENV: str(fake_nvml),
        "STELLARBASE_POSTGRES__PASSWORD": "pg-pw",
        "STELLARBASE_REDIS__PASSWORD": "r-pw",
    }
    argv = [
        sys.executable,
        "-m",
        "stellarbase",
        "install",
        "--root",
        str(root),
        "--binary",
        str(binary),
        "--set",
        "dependencies.mode=external",
        "--set",
        "postgres.url=postgresql://sb@db.example:5432/sb",
        "--set",
        "redis.url=redis://cache.example:6379/0",
        "-o",
        "json",
    ]
    subprocess.run(argv, env=env, check=True, capture_output=True)
    env_dir = HostPaths(root).inference_env_dir
    assert sorted(p.stem for p in env_dir.glob("*.env")) == sorted(SLICES)
    fewer = dict(TWO_GPUS, gpus=TWO_GPUS["gpus"][:1])  # type: ignore[index]
    fake_nvml.write_text(json.dumps(fewer))
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    removed = [s for s in json.loads(out.stdout)["data"]["steps"] if s["step"].startswith("remove")]
    assert len(removed) == 1 and all(m in removed[0]["step"] for m in SLICES[1:])
    assert sorted(p.stem for p in env_dir.glob("*.env")) == SLICES[:1]
