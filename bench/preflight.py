"""Time of a whole preflight against its 1 s target.

Starts real PostgreSQL, Redis and S3 (moto) on loopback and runs every preflight family
(deps, plus host and gpu where those modules exist) N times, each time in a fresh
interpreter, since that is what a user pays:

- fresh process: a child interpreter imports stellarbase, loads the config and calls
  run_checks; it reports its own phases and the parent times the whole child;
- CLI: `python -m stellarbase preflight -o json`, when that command exists;
- warm: run_checks again and again in this process (imports and clients already loaded),
  to show what the checks themselves cost.

    .venv/bin/python bench/preflight.py [--runs 7]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "installer"))

TARGET_S = 1.0
CHILD_FLAG = "--child"


def families() -> list[str]:
    """deps always; host and gpu only where another part of the tree provides them."""
    found = ["deps"]
    for name in ("host", "gpu"):
        if importlib.util.find_spec(f"stellarbase.preflight.{name}") is None:
            continue
        if hasattr(importlib.import_module(f"stellarbase.preflight.{name}"), "checks"):
            found.append(name)
    return found


def build_checks(spec: dict[str, Any], env: Mapping[str, str] | None = None) -> list[Any]:
    """The checks of every family, in the context the CLI would give them."""
    from stellarbase import log
    from stellarbase.configload import load_config
    from stellarbase.paths import HostPaths
    from stellarbase.preflight import Check, Context

    log.setup("warning")  # as the CLI does: no debug lines between the results
    config = load_config(sets=spec["sets"], tier=spec["tier"], env=env).config
    paths = HostPaths(Path(spec["root"]))
    try:
        from stellarbase.commands.doctor import preflight_context

        ctx = preflight_context(config, paths)
    except ImportError:
        ctx = Context(config, paths)
    checks: list[Check] = []
    for name in families():
        checks += importlib.import_module(f"stellarbase.preflight.{name}").checks(ctx)
    return checks


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One preflight in this (fresh) interpreter; secrets come from the environment."""
    start = time.monotonic()
    from stellarbase.preflight import run_checks, worst  # brings stellarbase.config along

    names = families()
    imported = time.monotonic()
    checks = build_checks(spec)
    configured = time.monotonic()
    findings = run_checks(checks)
    done = time.monotonic()
    per_check: dict[str, float] = {}
    for f in findings:
        family = f.check.split(".", 1)[0]
        per_check[family] = max(per_check.get(family, 0.0), f.seconds)
    return {
        "families": names,
        "import_s": imported - start,
        "config_s": configured - imported,
        "run_s": done - configured,
        "total_s": done - start,
        "per_check": per_check,
        "result": worst(findings).value,
        "failing": [f"{f.check}: {f.value}" for f in findings if f.level.value == "fail"],
    }


def run_child(spec: dict[str, Any], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, __file__, CHILD_FLAG],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    # The JSON is the last line: a module may log to stdout before it.
    return time.monotonic() - start, json.loads(out.stdout.strip().splitlines()[-1])


def cli_argv(spec: dict[str, Any]) -> list[str]:
    argv = [sys.executable, "-m", "stellarbase", "preflight", "--tier", spec["tier"]]
    for item in spec["sets"]:
        argv += ["--set", item]
    return [*argv, "--root", spec["root"], "-o", "json"]


def cli_available(env: dict[str, str]) -> bool:
    probe = subprocess.run(
        [sys.executable, "-m", "stellarbase", "preflight", "--help"],
        capture_output=True,
        env=env,
        check=False,
        timeout=60,
    )
    return probe.returncode == 0


def run_cli(spec: dict[str, Any], env: dict[str, str]) -> float:
    start = time.monotonic()
    out = subprocess.run(
        cli_argv(spec), capture_output=True, text=True, env=env, check=False, timeout=120
    )
    took = time.monotonic() - start
    if out.returncode not in (0, 10, 11):  # pass, warnings, failures: all finished runs
        raise RuntimeError(f"CLI exited {out.returncode}: {out.stderr[-2000:]}")
    return took


def median_line(label: str, values: list[float], target: float | None = None) -> str:
    med = statistics.median(values)
    line = f"  {label:<44} median {med:6.3f} s  [{min(values):.3f}-{max(values):.3f}]"
    if target:
        line += f"  = {med / target:.2f}x the {target:g} s target"
    return line


def warm_runs(spec: dict[str, Any], env: dict[str, str], runs: int) -> list[float]:
    from stellarbase.preflight import run_checks

    run_checks(build_checks(spec, env))  # the first run pays the imports
    times = []
    for _ in range(runs):
        checks = build_checks(spec, env)
        start = time.monotonic()
        run_checks(checks)
        times.append(time.monotonic() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    from tests import servers

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        pg, rd, s3 = servers.start_postgres(base), servers.start_redis(base), servers.start_s3(base)
        try:
            deps = servers.site_deps(pg, rd, s3)
            spec = {
                "tier": "pilot",
                "root": "/",
                "sets": [
                    "dependencies.mode=external",
                    f"postgres.url={deps['postgres']['url']}",
                    f"redis.url={deps['redis']['url']}",
                    f"s3.endpoint={s3.endpoint}",
                    f"s3.bucket={s3.bucket}",
                    f"s3.region={s3.region}",
                ],
            }
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(REPO / "installer"), str(REPO)]),
                "STELLARBASE_POSTGRES__PASSWORD": pg.password,
                "STELLARBASE_REDIS__PASSWORD": rd.password,
                "STELLARBASE_S3__ACCESS_KEY": s3.access_key,
                "STELLARBASE_S3__SECRET_KEY": s3.secret_key,
            }
            report(spec, env, args.runs)
        finally:
            servers.stop_all()


def report(spec: dict[str, Any], env: dict[str, str], runs: int) -> None:
    run_child(spec, env)  # warms the page cache for the interpreter and the packages
    walls, results = [], []
    for _ in range(runs):
        wall, result = run_child(spec, env)
        walls.append(wall)
        results.append(result)
    first = results[0]
    print(f"preflight families: {', '.join(first['families'])}; {runs} runs each")
    print(f"result of the last run: {results[-1]['result']}")
    for failing in results[-1]["failing"]:
        print(f"  (fails here: {failing})")
    print("fresh process (python bench/preflight.py --child), timed inside:")
    for key, label in (
        ("import_s", "import stellarbase + check families"),
        ("config_s", "load config, build checks"),
        ("run_s", "run_checks"),
        ("total_s", "total inside the process"),
    ):
        print(median_line(label, [r[key] for r in results]))
    checks = sorted({name for r in results for name in r["per_check"]})
    print("per check (in run_checks, imports of its driver included):")
    for name in checks:
        print(median_line(name, [r["per_check"].get(name, 0.0) for r in results]))
    print("whole preflight:")
    print(median_line("fresh process, wall (interpreter included)", walls, TARGET_S))
    print(median_line("run_checks in that fresh process", [r["run_s"] for r in results], TARGET_S))
    if cli_available(env):
        run_cli(spec, env)
        cli = [run_cli(spec, env) for _ in range(runs)]
        print(median_line("CLI: python -m stellarbase preflight", cli, TARGET_S))
    else:
        print("  CLI: `python -m stellarbase preflight` is not available; timed in-process only")
    print(median_line("warm, in this process (no imports)", warm_runs(spec, env, runs), TARGET_S))


if __name__ == "__main__":
    if CHILD_FLAG in sys.argv:
        print(json.dumps(child(json.loads(sys.stdin.read()))))
    else:
        main()
