"""`plan`: what install would change, with a diff for every file; changes nothing."""

from __future__ import annotations

from pathlib import Path

from stellarbase.apply import Executor
from stellarbase.commands.install import make_plan
from stellarbase.configload import LoadedConfig
from stellarbase.paths import HostPaths
from stellarbase.result import Result, Status


def dry_run(
    loaded: LoadedConfig, paths: HostPaths, binary: Path | None, *, retire_local: bool = False
) -> Result:
    the_plan = make_plan(loaded, paths, binary, retire_local=retire_local)
    steps = tuple(Executor(paths, dry_run=True).apply(the_plan))
    changed = sum(1 for s in steps if s.status == Status.CHANGED)
    summary = f"{changed} to change, {len(steps) - changed} unchanged"
    return Result("plan", messages=(summary,), steps=steps)
