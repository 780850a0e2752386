"""The agent's listener for remote scrapers needs a bearer token in the config; its TLS and
the token at work are in tests/integration/test_agent_remote.py."""

from __future__ import annotations

import pytest

from stellarbase.configload import load_config
from stellarbase.errors import StellarError

TOKEN = "s3cret-scrape-token"


def test_remote_port_needs_a_token() -> None:
    with pytest.raises(StellarError, match=r"agent\.metrics_token"):
        load_config(tier="pilot", env={}, sets=["agent.remote_port=9443"])
    config = load_config(
        tier="pilot",
        env={"STELLARBASE_AGENT__METRICS_TOKEN": TOKEN},
        sets=["agent.remote_port=9443"],
    ).config
    assert ("agent.remote_port", 9443) in config.fixed_ports()
