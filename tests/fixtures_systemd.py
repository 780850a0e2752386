"""Pytest fixtures that boot a real, throwaway systemd (see tests/systemd_sandbox.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.systemd_sandbox import SystemdSandbox, can_boot


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture
def systemd_sandbox() -> Iterator[SystemdSandbox]:
    """A freshly booted systemd sandbox, powered off after the test.

    Skips where the machine cannot boot one, except in CI, where these tests must really run.
    """
    ok, reason = can_boot()
    if not ok:
        if _in_ci():
            pytest.fail(f"CI must run systemd sandbox tests, but: {reason}", pytrace=False)
        pytest.skip(reason)
    sandbox = SystemdSandbox.boot()
    try:
        yield sandbox
    finally:
        sandbox.poweroff()
