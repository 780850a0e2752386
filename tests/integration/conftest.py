"""Shared pieces of the tests that run the built binary in a throwaway systemd."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from stellarbase.verify import probe
from tests.systemd_sandbox import SystemdSandbox

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / "dist" / "stellarbase"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this directory is an integration test, and slow."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def binary() -> Path:
    """The packaged binary: the systemd tests run it, not the source tree."""
    if not BINARY.exists() or os.environ.get("STELLARBASE_REBUILD"):
        subprocess.run(["bash", str(REPO / "packaging" / "build.sh")], check=True, cwd=REPO)
    return BINARY


def free_port_block(count: int) -> int:
    """A base port with `count` consecutive free loopback ports after it."""
    for base in range(20000 + (os.getpid() % 200) * 50, 60000, 50):
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


@dataclass
class Host:
    """A throwaway systemd host with the binary, a site file and the dependency secrets."""

    sandbox: SystemdSandbox
    binary: Path
    site: dict[str, Any]
    secrets: dict[str, str]

    def write_site(self, data: dict[str, Any], name: str = "site.yaml") -> str:
        path = f"/root/{name}"
        self.sandbox.path(path).write_text(yaml.safe_dump(data))
        return path

    def sb(
        self, *args: str, env: dict[str, str] | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run(
            [str(self.binary), *args],
            check=check,
            env={**self.secrets, **(env or {})},
            timeout=180,
        )

    def install(self, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        out = self.sb(
            "install", "--config", self.write_site(self.site), "-o", "json", *args, env=env
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout)["data"]

    def pids(self, units: list[str]) -> dict[str, int]:
        return {u: self.sandbox.main_pid(u) for u in units}

    def active(self, unit: str) -> str:
        return self.sandbox.systemctl("is-active", unit, check=False).stdout.strip()


def site_config(site_deps: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Split the fixture's dependency settings into a site file and secret env vars."""
    base = free_port_block(8)
    pg, rd, s3 = site_deps["postgres"], site_deps["redis"], site_deps["s3"]
    site = {
        "tier": "pilot",
        "api": {"port": base},
        "agent": {"port": base + 1},
        "worker": {"port": base + 2, "instances": 1},
        "health": {"timeout_seconds": 60},
        "dependencies": {"mode": "external"},
        "postgres": {"url": pg["url"]},
        "redis": {"url": rd["url"]},
        "s3": {k: s3[k] for k in ("endpoint", "bucket", "region")},
    }
    secrets = {
        "STELLARBASE_POSTGRES__PASSWORD": pg["password"],
        "STELLARBASE_REDIS__PASSWORD": rd["password"],
        "STELLARBASE_S3__ACCESS_KEY": s3["access_key"],
        "STELLARBASE_S3__SECRET_KEY": s3["secret_key"],
    }
    return site, secrets


def copy_binary(sandbox: SystemdSandbox, binary: Path) -> Path:
    """Put the binary into the sandbox's own root: a checkout under the host's /tmp (a CI
    clone, say) is hidden there behind the sandbox's private /tmp."""
    inside = Path("/usr/local/bin/stellarbase-under-test")
    shutil.copy2(binary, sandbox.path(str(inside)))
    return inside


@pytest.fixture
def host(
    systemd_sandbox: SystemdSandbox, binary: Path, site_deps: dict[str, Any]
) -> Iterator[Host]:
    site, secrets = site_config(site_deps)
    yield Host(systemd_sandbox, copy_binary(systemd_sandbox, binary), site, secrets)


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def ready(url: str) -> bool:
    return probe(f"{url}/readyz")[0] == 200
