"""Preflight of the NVIDIA GPUs: driver, CUDA, count, serving devices, memory, MIG, ECC,
persistence mode.

Reads only `ctx.gpus()` (a `gpu.Inventory`), never NVML itself, so the same checks run
against the fake source in tests. A host without a driver or without GPUs is fine on a
tier that needs none: one note says GPU inference is off.
"""

from __future__ import annotations

import re

from stellarbase.config import Config
from stellarbase.gpu import serving_devices
from stellarbase.gpu.inventory import Gpu, Inventory
from stellarbase.preflight import Check, Context, Finding, failed, noted, passed, warned
from stellarbase.preflight.host import port_taken

GIB = 1 << 30
# nvmlInit alone can take seconds per GPU when persistence mode is off.
TIMEOUT = 30.0


def checks(ctx: Context) -> list[Check]:
    return [
        Check(
            "gpu",
            lambda: _check(ctx),
            TIMEOUT,
            "the NVIDIA driver did not answer: see whether `nvidia-smi` hangs too "
            "(a GPU that fell off the bus shows as Xid errors in `dmesg`)",
        )
    ]


def _check(ctx: Context) -> list[Finding]:
    return _inference_off(ctx.config) or findings(ctx.config, ctx.gpus(), ctx.own_ports)


def findings(
    config: Config, inventory: Inventory | None, own_ports: frozenset[int] = frozenset()
) -> list[Finding]:
    req = config.requirements
    off = _inference_off(config)
    if off:
        return off
    if inventory is None:
        inventory = Inventory(error="no GPU source was given")
    if inventory.error or not inventory.driver_version:
        return [_no_gpus("gpu.driver", inventory.error or "no NVIDIA driver version", config)]
    if not inventory.gpus and not inventory.problems:
        why = f"driver {inventory.driver_version} sees no GPU"
        return [_no_gpus("gpu.count", why, config)]
    gpus = sorted(inventory.gpus, key=lambda g: g.index)
    return [
        driver_finding(inventory.driver_version, req.min_driver),
        cuda_finding(inventory.cuda_version),
        count_finding(gpus, inventory.problems, req.min_gpus),
        serving_finding(config, inventory, own_ports),
        memory_finding(gpus, req.min_gpu_memory_gib, config.inference.mig),
        mig_finding(gpus, config.inference.mig),
        ecc_finding(gpus),
        persistence_finding(gpus),
    ]


def _inference_off(config: Config) -> list[Finding]:
    """Nothing to check, and no reason to wake the driver, when inference is turned off."""
    if config.inference.gpus == 0 and config.requirements.min_gpus == 0:
        return [noted("gpu.count", "GPU inference is off (inference.gpus=0)")]
    return []


def _no_gpus(check: str, why: str, config: Config) -> Finding:
    req = config.requirements
    if req.min_gpus == 0:
        return noted(
            check,
            f"{why}: GPU inference is off",
            f"to serve inference on GPUs, install the NVIDIA driver ≥ {req.min_driver}",
        )
    return failed(
        check,
        why,
        f"≥ {req.min_gpus} NVIDIA GPU(s) with driver ≥ {req.min_driver} ({config.tier} tier)",
        f"install the NVIDIA driver ≥ {req.min_driver} until `nvidia-smi -L` lists the GPUs, "
        "or use a tier that needs no GPU (--tier pilot)",
    )


def driver_finding(version: str, minimum: str) -> Finding:
    requirement = f"≥ {minimum}"
    have, want = version_tuple(version), version_tuple(minimum)
    if have is None or want is None:
        return warned(
            "gpu.driver", version, requirement, "could not read the version: check `nvidia-smi`"
        )
    if have < want:
        return failed(
            "gpu.driver",
            version,
            requirement,
            f"upgrade the NVIDIA driver to {minimum} or newer and reboot",
        )
    return passed("gpu.driver", version, requirement)


def version_tuple(text: str) -> tuple[int, ...] | None:
    """ "535.104.05" → (535, 104, 5), so versions compare as numbers, not as text."""
    if not re.fullmatch(r"\d+(\.\d+)*", text.strip()):
        return None
    return tuple(int(part) for part in text.strip().split("."))


def cuda_finding(version: str | None) -> Finding:
    if not version:
        return noted("gpu.cuda", "not reported by the driver")
    return passed("gpu.cuda", f"CUDA {version} (highest the driver supports)")


def count_finding(gpus: list[Gpu], problems: tuple[str, ...], minimum: int) -> Finding:
    names: dict[str, int] = {}
    for gpu in gpus:
        names[gpu.name] = names.get(gpu.name, 0) + 1
    value = f"{len(gpus)} GPU(s)" + "".join(f", {count} x {name}" for name, count in names.items())
    if problems:
        value += "; unreadable: " + "; ".join(problems)
    requirement = f"≥ {minimum}"
    if len(gpus) < minimum:
        return failed(
            "gpu.count",
            value,
            requirement,
            "this tier needs more GPUs than the driver can use: check `nvidia-smi -L`, "
            "or lower requirements.min_gpus",
        )
    if problems:
        return warned(
            "gpu.count",
            value,
            requirement,
            "no inference unit is planned on an unreadable GPU: check `nvidia-smi -q` and "
            "`dmesg | grep -i xid`; a lost GPU needs a reset (`nvidia-smi -r`) or a reboot",
        )
    return passed("gpu.count", value, requirement)


def serving_finding(config: Config, inventory: Inventory, own_ports: frozenset[int]) -> Finding:
    """Which devices get an inference unit, and whether their ports are free."""
    wanted = config.inference.gpus
    devices = serving_devices(inventory, wanted, config.inference.mig)
    requirement = f"inference.gpus={wanted}, inference.mig={config.inference.mig}"
    if isinstance(wanted, list):
        missing = [d for d in wanted if d not in devices]
        if missing:
            return failed(
                "gpu.serving",
                "not found: " + ", ".join(missing),
                requirement,
                "`nvidia-smi -L` lists the GPU and MIG UUIDs: fix inference.gpus "
                "(a MIG UUID needs inference.mig=slices, a MIG GPU's own UUID mig=whole)",
            )
    first = config.inference.port
    ports = [first + n for n in range(len(devices))]
    value = f"{len(devices)} inference unit(s)"
    if devices:
        value += f" on port {first}" + (f"-{ports[-1]}" if len(ports) > 1 else "")
        value += ": " + ", ".join(devices)
    busy = _busy_ports(str(config.bind), ports, own_ports)
    if busy:
        return failed(
            "gpu.serving",
            value + "; in use: " + ", ".join(busy),
            requirement + f", ports from inference.port={first} free",
            "stop what holds the port or move the range: --set inference.port=PORT",
        )
    if isinstance(wanted, int) and len(devices) < wanted:
        return warned(
            "gpu.serving",
            value,
            requirement,
            f"inference.gpus={wanted} but only {len(devices)} device(s) can serve: "
            "lower inference.gpus or set it to all",
        )
    return passed("gpu.serving", value, requirement)


def _busy_ports(host: str, ports: list[int], own_ports: frozenset[int]) -> list[str]:
    busy = []
    for port in ports:
        taken = None if port in own_ports else port_taken(host, port)
        if taken is None:
            continue
        reason, why = taken
        busy.append(
            f"{port} by {why}" if reason == "in use" else f"{port} (cannot bind {host}: {why})"
        )
    return busy


def memory_finding(gpus: list[Gpu], minimum_gib: float, mig: str) -> Finding:
    value = ", ".join(f"GPU {g.index} {_gib(g.memory_total_bytes)}" for g in gpus)
    requirement = f"≥ {minimum_gib:g} GiB per GPU"
    small = [g for g in gpus if g.memory_total_bytes < minimum_gib * GIB]
    if small:
        return failed(
            "gpu.memory",
            value,
            requirement,
            f"GPU {', '.join(str(g.index) for g in small)} below {minimum_gib:g} GiB: "
            "use GPUs with more memory or lower requirements.min_gpu_memory_gib",
        )
    slices = [
        (g.index, m)
        for g in gpus
        if g.mig_enabled and mig == "slices"
        for m in g.mig_devices
        if 0 < m.memory_total_bytes < minimum_gib * GIB
    ]
    if slices:
        shown = ", ".join(f"{m.uuid} {_gib(m.memory_total_bytes)}" for _, m in slices)
        return warned(
            "gpu.memory",
            f"{value}; MIG devices below {minimum_gib:g} GiB: {shown}",
            requirement,
            "each MIG device runs one inference unit: create larger MIG instances "
            "or serve the whole GPU with --set inference.mig=whole",
        )
    return passed("gpu.memory", value, requirement)


def mig_finding(gpus: list[Gpu], mig: str) -> Finding:
    parts = []
    for g in gpus:
        mode = "on" if g.mig_enabled else "off"
        part = f"GPU {g.index} MIG {mode}"
        if g.mig_enabled:
            part += f", {len(g.mig_devices)} MIG device(s)"
        if g.mig_pending is not None and g.mig_pending != g.mig_enabled:
            part += f" ({'on' if g.mig_pending else 'off'} after a GPU reset)"
        parts.append(part)
    value = "; ".join(parts) + f" (inference.mig={mig})"
    unsettled = (
        (
            [g.index for g in gpus if g.mig_pending is not None and g.mig_pending != g.mig_enabled],
            "MIG mode settled",
            "a MIG mode change waits for a GPU reset: `nvidia-smi -r -i {ids}` "
            "when the GPU is idle, or reboot",
        ),
        (
            [g.index for g in gpus if g.mig_enabled and not g.mig_devices],
            "a GPU in MIG mode has MIG devices",
            "CUDA cannot use a MIG GPU without instances: create them "
            "(`nvidia-smi mig -i {ids} -cgi PROFILE -C`) or turn MIG off "
            "(`nvidia-smi -i {ids} -mig 0`)",
        ),
    )
    for indexes, requirement, hint in unsettled:
        if indexes:
            ids = ",".join(str(i) for i in indexes)
            return warned("gpu.mig", value, requirement, hint.format(ids=ids))
    return noted("gpu.mig", value)


def ecc_finding(gpus: list[Gpu]) -> Finding:
    known = [g for g in gpus if g.ecc_uncorrected is not None]
    if not known:
        return noted("gpu.ecc", "ECC not supported or off on every GPU")
    bad = [g for g in known if g.ecc_uncorrected]
    value = ", ".join(f"GPU {g.index} {g.ecc_uncorrected}" for g in known)
    requirement = "0 uncorrected ECC errors (volatile)"
    if bad:
        ids = ",".join(str(g.index) for g in bad)
        return warned(
            "gpu.ecc",
            value,
            requirement,
            f"inspect with `nvidia-smi -q -d ECC -i {ids}`; drain the GPU and reset it "
            f"(`nvidia-smi -r -i {ids}`) or reboot; errors that come back mean failing memory",
        )
    return passed("gpu.ecc", value, requirement)


def persistence_finding(gpus: list[Gpu]) -> Finding:
    known = [g for g in gpus if g.persistence is not None]
    if not known:
        return noted("gpu.persistence", "persistence mode not reported")
    off = [g for g in known if not g.persistence]
    value = ", ".join(f"GPU {g.index} {'on' if g.persistence else 'off'}" for g in known)
    if off:
        return warned(
            "gpu.persistence",
            value,
            "on",
            "keep the driver loaded between inference restarts: `nvidia-smi -pm 1` "
            "(or enable nvidia-persistenced.service, which survives reboots)",
        )
    return passed("gpu.persistence", value, "on")


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"
