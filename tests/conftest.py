from __future__ import annotations

import subprocess
import types
from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.fixtures_servers", "tests.fixtures_systemd"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs real servers or a real systemd is slow, wherever it lives:
    `pytest -m "not slow"` leaves it out."""
    for item in items:
        if item.get_closest_marker("integration") or item.get_closest_marker("systemd"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_host_commands(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Unit tests never run host commands unless they opt in with @pytest.mark.host_commands."""
    if request.node.get_closest_marker("host_commands") or request.node.get_closest_marker(
        "systemd"
    ):
        yield
        return

    def refuse(argv: list[str], **_: object) -> None:
        raise AssertionError(f"unit test tried to run a host command: {argv}")

    fake = types.SimpleNamespace(
        run=refuse,
        DEVNULL=subprocess.DEVNULL,
        TimeoutExpired=subprocess.TimeoutExpired,
        CompletedProcess=subprocess.CompletedProcess,
    )
    monkeypatch.setattr("stellarbase.proc.subprocess", fake)
    yield
