"""`plan`: what install would change, with a diff for every file; changes nothing."""

from __future__ import annotations

from pathlib import Path

from stellarbase.apply import Executor
from stellarbase.commands.install import make_plan
from stellarbase.configload import LoadedConfig
from stellarbase.paths import HostPaths
from stellarbase.result import Result


def dry_run(
    loaded: LoadedConfig, paths: HostPaths, binary: Path | None, *, retire_local: bool = False
) -> Result:
    the_plan = make_plan(loaded, paths, binary, retire_local=retire_local)
    steps = tuple(Executor(paths, dry_run=True).apply(the_plan))
    result = Result("plan", steps=steps)
    summary = f"{result.changed} to change, {len(steps) - result.changed} unchanged"
    return Result("plan", messages=(summary,), steps=steps)
