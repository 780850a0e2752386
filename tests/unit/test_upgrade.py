"""Which moves between releases upgrade and rollback allow, and the refusals' words."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stellarbase import __version__, cli, release_key, trust
from stellarbase.commands.status import status
from stellarbase.errors import ExitCode, StellarError
from stellarbase.paths import HostPaths
from stellarbase.releases import SchemaSupport, check_move
from stellarbase.trust import version_key

REPO = Path(__file__).resolve().parents[2]


def _load_make_bundle() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_bundle", REPO / "packaging/make_bundle.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_bundle = _load_make_bundle()


def test_versions_sort_by_number_then_prerelease() -> None:
    ordered = ["0.9.9", "0.10.0rc1", "0.10.0", "0.10.1", "1.0.0"]
    assert sorted(reversed(ordered), key=version_key) == ordered
    with pytest.raises(StellarError) as err:
        version_key("latest")
    assert err.value.code == ExitCode.USAGE


def test_upgrade_within_the_supported_range() -> None:
    target = SchemaSupport("0.3.0", floor=0, newest=4)
    assert check_move("0.2.0", target, "0.2.0", db_newest=3, db_floor=0) == "upgrade"
    assert check_move("0.3.0", target, "0.2.0", db_newest=4, db_floor=0) == "same"


def test_upgrade_from_too_old_a_release_is_refused() -> None:
    target = SchemaSupport("0.5.0", floor=0, newest=6)
    with pytest.raises(StellarError) as err:
        check_move("0.2.0", target, "0.4.0", db_newest=3, db_floor=0)
    assert err.value.code == ExitCode.UPGRADE
    assert "upgrades from 0.4.0 or newer; this host runs 0.2.0" in err.value.message
    assert "between 0.4.0 and 0.5.0 first" in err.value.hint


def test_downgrade_allowed_while_the_schema_is_compatible() -> None:
    older = SchemaSupport("0.1.0", floor=0, newest=2)
    assert check_move("0.2.0", older, "0.0.0", db_newest=3, db_floor=0) == "downgrade"
    assert check_move("0.2.0", older, "0.0.0", db_newest=3, db_floor=2) == "downgrade"


def test_downgrade_past_the_compatibility_range_is_refused() -> None:
    older = SchemaSupport("0.1.0", floor=0, newest=2)
    with pytest.raises(StellarError) as err:
        check_move("0.2.0", older, "0.0.0", db_newest=3, db_floor=3)
    assert err.value.code == ExitCode.UPGRADE
    assert err.value.message == (
        "release 0.1.0 cannot run against this database: its schema is at version 3 and "
        "needs releases with schema 3 or newer; 0.1.0 ships up to 2"
    )
    assert "migrations only go forward" in err.value.hint


# --- upgrade from a bundle: what runs, with which command line -----------------------------


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text("tier: pilot\n")
    return path


def _upgrade(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["stellarbase", "upgrade", *argv])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return int(exited.value.code or 0)


def _bundle(tmp_path: Path, key: Ed25519PrivateKey, version: str, exit_code: int = 0) -> Path:
    """A signed bundle of `version` whose binary records its command line and exits."""
    script = tmp_path / f"binary-{version}"
    script.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/ran-{version}\nexit {exit_code}\n'
    )
    return make_bundle.build_bundle(
        binary=script, out_dir=tmp_path / "dist", version=version, arch="x86_64",
        upgrade_from=__version__, signing_key=key, source_date_epoch=0,
    )  # fmt: skip


@pytest.fixture
def key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ed25519PrivateKey]:
    private = Ed25519PrivateKey.generate()
    pub = tmp_path / "release-pub.pem"
    pub.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    monkeypatch.setenv(release_key.OVERRIDE_ENV, str(pub))
    root = tmp_path / "root"
    (root / "var/lib/stellarbase").mkdir(parents=True)
    (root / "var/lib/stellarbase/state.json").write_text(json.dumps({"version": __version__}))
    yield private
    structlog.reset_defaults()  # the CLI pointed the logs at a captured stream


def test_upgrade_hands_over_with_the_same_command_line(
    tmp_path: Path, key: Ed25519PrivateKey, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = _bundle(tmp_path, key, "9.9.9", exit_code=5)
    argv = ["--root", str(tmp_path / "root"), "--config", str(site), "--bundle", str(bundle),
            "--set", "worker.instances=2"]  # fmt: skip
    assert _upgrade(monkeypatch, *argv) == 5
    assert (tmp_path / "ran-9.9.9").read_text().splitlines() == ["upgrade", *argv]


def test_a_secret_on_the_command_line_never_reaches_the_new_binary(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    site: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = _bundle(tmp_path, key, "9.9.9")
    code = _upgrade(monkeypatch, "--root", str(tmp_path / "root"), "--config", str(site),
                    "--bundle", str(bundle), "--set", "postgres.password=hunter2x")  # fmt: skip
    assert code == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "secrets are not taken on the command line" in err and "hunter2x" not in err
    assert not (tmp_path / "ran-9.9.9").exists()


def test_upgrade_to_an_older_release_needs_the_flag(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    site: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = _bundle(tmp_path, key, "0.0.9")
    argv = ["--root", str(tmp_path / "root"), "--config", str(site), "--bundle", str(bundle)]
    assert _upgrade(monkeypatch, *argv) == ExitCode.UPGRADE
    assert "not downgrading" in capsys.readouterr().err
    assert not (tmp_path / "ran-0.0.9").exists()
    assert _upgrade(monkeypatch, *argv, "--allow-downgrade") == 0
    assert (tmp_path / "ran-0.0.9").exists()


def test_a_revoked_release_is_refused_even_with_the_flag(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    site: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "root"
    trust.remember(HostPaths(root), revoked=["0.0.9"], key_override=None, action="upgrade",
                   version=__version__)  # fmt: skip
    bundle = _bundle(tmp_path, key, "0.0.9")
    argv = ["--root", str(root), "--config", str(site), "--bundle", str(bundle)]
    assert _upgrade(monkeypatch, *argv, "--allow-downgrade") == ExitCode.BUNDLE
    assert "release 0.0.9 is revoked" in capsys.readouterr().err
    assert not (tmp_path / "ran-0.0.9").exists()
    assert "revoked releases: 0.0.9" in status(HostPaths(root)).messages


def test_a_bundle_revokes_older_releases_and_the_list_only_grows(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    trust.remember(paths, revoked=["0.0.8"], key_override=None, action="install", version="0.1.0")
    trust.remember(paths, revoked=[], key_override=None, action="upgrade", version="0.0.9")
    assert trust.revoked_releases(paths) == ["0.0.8"]
    with pytest.raises(StellarError) as err:
        trust.check_release_allowed(paths, "0.0.7", allow_downgrade=True,
                                    revoked_by_bundle=["0.0.7"])  # fmt: skip
    assert err.value.code == ExitCode.BUNDLE
