"""The agent's token-free listener stays on loopback: the install gate reaches it there.
A running agent under a network peer's load is in tests/integration/test_agent_exposure.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from stellarbase.commands.install import make_plan
from stellarbase.configload import load_config
from stellarbase.paths import HostPaths


@pytest.mark.host_commands  # the plan looks for the local server binaries
def test_the_install_gate_reaches_the_agent_on_loopback(tmp_path: Path) -> None:
    binary = tmp_path / "stellarbase-bin"
    binary.write_bytes(b"#!/bin/sh\n")
    for bind, api in (("0.0.0.0", "127.0.0.1"), ("192.0.2.7", "192.0.2.7")):
        loaded = load_config(sets=[f"bind={bind}"], env={})
        plan = make_plan(loaded, HostPaths(tmp_path / bind), binary)
        endpoints = dict(plan.endpoints)
        assert endpoints["stellarbase-agent.service"].startswith("http://127.0.0.1:"), bind
        assert endpoints["stellarbase-api.service"].startswith(f"http://{api}:"), bind
