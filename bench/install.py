"""Time-to-healthy of `stellarbase install`: a first install and a converged re-run.

Runs the built binary in a throwaway systemd against real PostgreSQL, Redis and S3 on
loopback, and prints each median beside its target and beside the floor: plain
`systemctl start` of the very same unit files until every /readyz answers.

    sudo .venv/bin/python bench/install.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import servers  # noqa: E402
from tests.integration.conftest import BINARY, Host, copy_binary, site_config  # noqa: E402
from tests.systemd_sandbox import SystemdSandbox  # noqa: E402

from stellarbase.verify import probe  # noqa: E402

TARGET_FIRST = 10.0
TARGET_RERUN = 1.5


def timed(host: Host) -> float:
    start = time.monotonic()
    host.install()
    return time.monotonic() - start


def plain_systemd_start(host: Host, endpoints: dict[str, str]) -> float:
    """Same units, no installer: stop all, then start the target and poll every /readyz."""
    host.sandbox.systemctl("stop", "stellarbase.target", *endpoints)
    start = time.monotonic()
    host.sandbox.systemctl("start", "stellarbase.target")
    while any(probe(f"{url}/readyz", timeout=1)[0] != 200 for url in endpoints.values()):
        time.sleep(0.05)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not BINARY.exists():
        sys.exit("build the binary first: bash packaging/build.sh")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        pg, rd, s3 = servers.start_postgres(base), servers.start_redis(base), servers.start_s3(base)
        try:
            deps = servers.site_deps(pg, rd, s3)
            site, secrets = site_config(deps)
            first, rerun, floor = [], [], []
            with SystemdSandbox.boot() as sandbox:
                host = Host(sandbox, copy_binary(sandbox, BINARY), site, secrets)
                for _ in range(args.runs):
                    first.append(timed(host))
                    rerun.append(timed(host))
                    endpoints = host.install()["endpoints"]
                    floor.append(plain_systemd_start(host, endpoints))
                    host.sb("uninstall", "--purge", "--yes", check=True)
        finally:
            for server in (pg, rd, s3):
                server.stop()
    report("first install to healthy", first, TARGET_FIRST, floor)
    report("converged re-run", rerun, TARGET_RERUN, None)


def report(name: str, samples: list[float], target: float, floor: list[float] | None) -> None:
    median = statistics.median(samples)
    line = (
        f"{name:<26} median {median:6.2f}s  (min {min(samples):.2f}, max {max(samples):.2f}, "
        f"n={len(samples)})  target {target:.1f}s  ratio to target {median / target:.2f}"
    )
    if floor:
        line += f"  ratio to plain systemctl start {median / statistics.median(floor):.2f}"
        line += f" (plain {statistics.median(floor):.2f}s)"
    print(line)


if __name__ == "__main__":
    main()
