"""The corpus of the transition test (tests/transitions_corpus.py), checked without a host:
a typo in an accepted config shows here in a second, not after minutes of systemd."""

from __future__ import annotations

from pathlib import Path

import yaml

from stellarbase.configload import load_config
from stellarbase.errors import ExitCode
from tests.transitions_corpus import BOOTSTRAP, CASES, Context, Deps, sequence

DEPS = Deps(
    postgres_url="postgresql://sb@127.0.0.1:5999/sb",
    postgres_password="pg-secret",
    redis_url="redis://127.0.0.1:6999/0",
    redis_password="redis-secret",
    s3_endpoint="http://127.0.0.1:7999",
    s3_bucket="stellarbase-test",
    s3_region="us-east-1",
    s3_access_key="key",
    s3_secret_key="secret",
)


def test_corpus_spans_valid_and_invalid_configs() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    outcomes = {c.outcome for c in CASES}
    assert {ExitCode.OK, ExitCode.CONFIG, ExitCode.HOST, ExitCode.DEPENDENCY} <= outcomes
    assert BOOTSTRAP.outcome == ExitCode.OK and not BOOTSTRAP.external
    assert all(c.needle for c in CASES if c.outcome != ExitCode.OK)


def test_accepted_configs_load(tmp_path: Path) -> None:
    ctx = Context(30000, DEPS)
    for case in CASES:
        if case.outcome != ExitCode.OK:
            continue
        site = tmp_path / "site.yaml"
        site.write_text(yaml.safe_dump(case.site(ctx)))
        loaded = load_config(site_file=site, env={})
        local = {d for d in ("postgres", "redis") if loaded.config.mode_of(d) == "local"}
        assert local == case.local(), case.name


def test_a_seed_gives_one_sequence() -> None:
    assert sequence(7, 60) == sequence(7, 60)
    assert sequence(7, 60) != sequence(8, 60)
    assert sequence(7, 60)[0] == BOOTSTRAP
    assert set(sequence(1, len(CASES) + 1)) == set(CASES)
