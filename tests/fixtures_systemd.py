"""Pytest fixtures that boot a real, throwaway systemd (see tests/systemd_sandbox.py).

The sandbox's lower layer is the host root (Debian 12) by default. A test parametrized with
`on_both_roots` runs once on each root of ROOTS; `sandbox_root` tells it which one it got
and what that root's packages provide.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.systemd_sandbox import SystemdSandbox, can_boot

REPO = Path(__file__).resolve().parents[1]
TEST_ROOT_SCRIPT = REPO / "scripts" / "test-root.sh"
ROOT_ENV = "SB_TEST_DEBIAN13_ROOT"  # set by scripts/test.sh to what test-root.sh printed


@dataclass(frozen=True)
class SandboxRoot:
    """A distribution the sandbox boots, and what the tests may expect of it."""

    name: str
    """The test id: debian12 (the host root) or debian13 (scripts/test-root.sh)."""
    postgres: str
    """Major version of the PostgreSQL that local mode picks there (PG_VERSION)."""
    pgvector: bool
    """Whether that PostgreSQL has pgvector, so install creates `vector`."""
    systemd: int
    built: bool
    """True for a root built by scripts/test-root.sh, False for the host root."""


ROOTS = {
    "debian12": SandboxRoot("debian12", postgres="15", pgvector=False, systemd=252, built=False),
    "debian13": SandboxRoot("debian13", postgres="17", pgvector=True, systemd=257, built=True),
}

# A sandbox is thrown away after its test: a shutdown that takes longer (PostgreSQL retrying
# archive_command for 10 s a try once the agent has stopped, say) is cut short by SIGKILL.
TEARDOWN_POWEROFF_S = 10.0

on_both_roots = pytest.mark.parametrize("sandbox_root", list(ROOTS), indirect=True)
"""Run a systemd test once on the Debian 12 host root and once on the Debian 13 root."""


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _cannot_run(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"CI must run systemd sandbox tests, but: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def debian13_root() -> Path:
    """The Debian 13 root: the one scripts/test.sh built, or built by scripts/test-root.sh
    now when it is not cached yet (about a minute)."""
    ok, reason = can_boot()
    if not ok:
        _cannot_run(reason)
    given = os.environ.get(ROOT_ENV)
    if given:
        return Path(given)
    out = subprocess.run(
        ["bash", str(TEST_ROOT_SCRIPT)], capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        _cannot_run(f"scripts/test-root.sh failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def sandbox_root(request: pytest.FixtureRequest) -> SandboxRoot:
    """The root the test's sandbox boots: debian12 unless parametrized (`on_both_roots`)."""
    return ROOTS[getattr(request, "param", "debian12")]


def boot_sandbox(
    request: pytest.FixtureRequest, root: SandboxRoot, *, loopback_only: bool = False
) -> SystemdSandbox:
    """Boot a sandbox over `root`, or skip where this machine cannot (fail in CI instead)."""
    ok, reason = can_boot()
    if not ok:
        _cannot_run(reason)
    lower = request.getfixturevalue("debian13_root") if root.built else None
    return SystemdSandbox.boot(lower=lower, loopback_only=loopback_only)


@pytest.fixture
def systemd_sandbox(
    request: pytest.FixtureRequest, sandbox_root: SandboxRoot
) -> Iterator[SystemdSandbox]:
    """A freshly booted systemd sandbox, powered off after the test.

    Skips where the machine cannot boot one, except in CI, where these tests must really run.
    """
    sandbox = boot_sandbox(request, sandbox_root)
    try:
        yield sandbox
    finally:
        sandbox.poweroff(timeout=TEARDOWN_POWEROFF_S)
