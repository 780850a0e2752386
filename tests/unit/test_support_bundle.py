"""`stellarbase support-bundle`: what the tar.gz holds, and that no secret is in it."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from stellarbase import __version__, cli, envfile, install_state, render, support
from stellarbase.configload import load_config
from stellarbase.errors import ExitCode
from stellarbase.localdeps import ADMIN_PASSWORD
from stellarbase.paths import HostPaths

# Every secret the site configures, each with characters that env files and JSON escape.
SITE_SECRETS = {
    ("postgres", "password"): 'pg-pass-"quoted"-$HOME-7b2f',
    ("redis", "password"): "redis-pass-back\\slash-91ce",
    ("s3", "access_key"): "AKIASUPPORTBUNDLE4D2E",
    ("s3", "secret_key"): "s3-secret-key-wJalrXUtnFEMI-5a0c",
    ("backup", "encryption_key"): base64.b64encode(b"support-bundle-backup-key-32byte").decode(),
    ("agent", "metrics_token"): "metrics-token-0f9e8d7c6b5a",
}
# Secrets only the host's credential files hold, and one only a drop-in holds.
ADMIN_SECRET = "local-admin-pass-3c4d"
REDIS_AUTH_SECRET = "local-redis-requirepass-8e7f"
DROP_IN_SECRET = "drop-in-api-key-66aa"
EVERY_SECRET = [*SITE_SECRETS.values(), ADMIN_SECRET, REDIS_AUTH_SECRET, DROP_IN_SECRET]
UNIT = "stellarbase-api.service"


@pytest.fixture(autouse=True)
def _no_site_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("STELLARBASE_")]:
        monkeypatch.delenv(name)


def _site() -> dict[str, Any]:
    """External servers on a port nobody answers on: checks and audit fail at once."""
    site: dict[str, Any] = {
        "dependencies": {"mode": "external"},
        "health": {"check_timeout_seconds": 1},
        "postgres": {"url": "postgresql://stellarbase@127.0.0.1:1/stellarbase"},
        "redis": {"url": "redis://127.0.0.1:1/0"},
        "s3": {"endpoint": "http://127.0.0.1:1", "bucket": "support-bucket"},
        "backup": {},
        "agent": {},
    }
    for (section, key), value in SITE_SECRETS.items():
        site[section][key] = value
    return site


def _install_files(root: Path, site_file: Path) -> None:
    """What an installed host holds: config, credentials, units, a drop-in, the state."""
    paths = HostPaths(root)
    config = load_config(site_file=site_file, env={}).config
    paths.etc.mkdir(parents=True)
    paths.config_file.write_text(render.render_site_config(config))
    paths.secrets_file.write_text(render.render_secrets(config))
    paths.admin_secrets_file.write_text(
        envfile.render_env_file({ADMIN_PASSWORD: ADMIN_SECRET}, "admin")
    )
    paths.redis_auth.write_text(render.render_redis_auth(REDIS_AUTH_SECRET))
    paths.unit_dir.mkdir(parents=True)
    (paths.unit_dir / "stellarbase.target").write_text("[Unit]\nDescription=StellarBase\n")
    (paths.unit_dir / UNIT).write_text("[Service]\nEnvironmentFile=/etc/stellarbase/secrets.env\n")
    (paths.unit_dir / "other.service").write_text("[Service]\nExecStart=/bin/true\n")
    drop_ins = paths.unit_dir / f"{UNIT}.d"
    drop_ins.mkdir()
    token = SITE_SECRETS["agent", "metrics_token"]
    (drop_ins / "override.conf").write_text(
        "[Service]\n"
        f'Environment="NOTE=the token is {token}" LEVEL=debug\n'
        f"Environment=EXTRA_API_KEY={DROP_IN_SECRET}\n"
        f"# the admin password was {ADMIN_SECRET}\n"
    )
    (drop_ins / "notes.txt").write_text("not a drop-in\n")
    paths.state_dir.mkdir(parents=True)
    install_state.save(
        paths.state_file,
        install_state.State(
            version="0.1.0",
            units={"stellarbase.target": "a", UNIT: "b"},
            # JSON escapes the quotes of this password: the scrub must know that spelling.
            config_source=f"/srv/site.yaml ({SITE_SECRETS['postgres', 'password']} "
            f"{REDIS_AUTH_SECRET})",
            database_url="postgresql://stellarbase@127.0.0.1:1/stellarbase",
        ),
    )


def _support_bundle(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["stellarbase", "support-bundle", *argv])
    try:
        cli.main()
    except SystemExit as exited:
        return int(exited.code or 0)
    return 0


def _members(bundle: Path) -> dict[str, bytes]:
    """Member name below the bundle's top directory → its bytes."""
    out: dict[str, bytes] = {}
    with tarfile.open(bundle) as tar:
        for info in tar.getmembers():
            top, _, name = info.name.partition("/")
            assert top == bundle.name.removesuffix(".tar.gz")
            assert info.isfile() and info.mode == 0o600 and info.uid == 0 and info.uname == "root"
            extracted = tar.extractfile(info)
            assert extracted is not None
            out[name] = extracted.read()
    return out


def _spellings(secret: str) -> list[bytes]:
    return [secret.encode(), json.dumps(secret)[1:-1].encode()]


@pytest.fixture
def installed_root(tmp_path: Path) -> tuple[Path, Path]:
    site_file = tmp_path / "site.yaml"
    site_file.write_text(yaml.safe_dump(_site()))
    root = tmp_path / "root"
    _install_files(root, site_file)
    return root, site_file


@pytest.mark.parametrize("from_site_file", [False, True], ids=["installed", "--config"])
def test_bundle_holds_every_part_and_no_secret(
    installed_root: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    from_site_file: bool,
) -> None:
    root, site_file = installed_root
    bundle = tmp_path / "support.tar.gz"
    config = ["--config", str(site_file)] if from_site_file else []
    args = ["--root", str(root), "-O", str(bundle), "-o", "json", *config]
    assert _support_bundle(monkeypatch, *args) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed)["data"]["path"] == str(bundle)
    assert bundle.stat().st_mode & 0o777 == 0o600

    members = _members(bundle)
    assert set(members) == {
        "summary.json",
        "config.json",
        "preflight.json",
        "doctor.json",
        "status.json",
        "state.json",
        "versions.json",
        "units/stellarbase.target",
        f"units/{UNIT}",
        f"units/{UNIT}.d/override.conf",
    }
    for secret in EVERY_SECRET:
        for spelling in _spellings(secret):
            assert spelling not in printed.encode(), secret
            for name, data in members.items():
                assert spelling not in data, f"{secret!r} in {name}"

    config_json = json.loads(members["config.json"])["config"]
    for section, key in SITE_SECRETS:
        assert config_json[section][key] == support.REDACTED
    assert config_json["s3"]["bucket"] == "support-bucket"
    drop_in = members[f"units/{UNIT}.d/override.conf"].decode()
    assert f'"NOTE=the token is {support.REDACTED}" LEVEL=debug' in drop_in
    assert f"EXTRA_API_KEY={support.REDACTED}" in drop_in
    assert f"the admin password was {support.REDACTED}" in drop_in
    source = json.loads(members["state.json"])["config_source"]
    assert source == f"/srv/site.yaml ({support.REDACTED} {support.REDACTED})"

    summary = json.loads(members["summary.json"])
    assert set(summary["errors"]) == {"audit", "journal"}
    assert "cannot connect to PostgreSQL at 127.0.0.1:1" in summary["errors"]["audit"]
    assert "is not the live system" in summary["errors"]["journal"]
    preflight = json.loads(members["preflight.json"])
    assert {"postgres", "redis", "s3"} <= {f["check"].split(".")[0] for f in preflight["findings"]}
    assert json.loads(members["doctor.json"])["skipped"] == ["units"]
    assert json.loads(members["status.json"])["version"] == "0.1.0"
    assert json.loads(members["versions.json"])["stellarbase"] == __version__


def test_bundle_is_written_when_nothing_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _support_bundle(monkeypatch, "--root", str(tmp_path / "empty")) == 0
    [bundle] = tmp_path.glob("stellarbase-support-*-????????T??????Z.tar.gz")
    assert bundle.stat().st_mode & 0o777 == 0o600
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(bundle)
    assert "errors recorded for audit, config, doctor, journal, state" in lines[1]

    members = _members(bundle)
    assert set(members) == {"summary.json", "preflight.json", "status.json", "versions.json"}
    errors = json.loads(members["summary.json"])["errors"]
    assert "no installed configuration" in errors["config"]
    assert "state.json" in errors["state"]
    assert json.loads(members["status.json"])["installed"] is False
    assert "tier defaults" in json.loads(members["preflight.json"])["config"]


def test_live_host_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(support, "running_as_root", lambda: False)
    assert _support_bundle(monkeypatch, "-O", str(tmp_path)) == ExitCode.HOST
    assert not list(tmp_path.iterdir())


def test_journal_tail_of_each_unit_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = SITE_SECRETS["postgres", "password"]
    calls: list[list[str]] = []

    def journalctl(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, f"2025-01-01 api: login {secret} failed\n", "")

    monkeypatch.setattr(support, "run", journalctl)
    monkeypatch.setattr(shutil, "which", lambda *_, **__: "/usr/bin/journalctl")
    found = support.Collected()
    found.add_secret(secret)
    support.collect_journal(found, HostPaths(Path("/")), [UNIT], 7)
    assert calls == [["journalctl", "-u", UNIT, "-n", "7", "--no-pager", "-o", "short-iso"]]
    text = support.scrub(found.members[f"journal/{UNIT}.log"], found.secrets)
    assert text == f"2025-01-01 api: login {support.REDACTED} failed\n"


def test_missing_journalctl_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_, **__: None)
    found = support.Collected()
    support.collect_journal(found, HostPaths(Path("/")), [UNIT], 200)
    assert found.errors == {"journal": "not collected: journalctl is not installed"}
    assert not found.members


def test_credential_files_are_scrubbed_even_when_they_do_not_parse() -> None:
    values = envfile.loose_values(
        'GOOD="a\\"b"\nbroken line without equals\nrequirepass "redis pw"\n# comment\n'
    )
    assert {'a"b', "redis pw", "line without equals"} <= set(values)


# A password that every encoding changes: quotes, @, /, space, +, &, =, a non-ASCII letter.
HOSTILE = 'it\'s "a" p@ss/w\u00f6rd+1&x=y'


def _planted_forms(secret: str) -> dict[str, str]:
    """The secret as logs and configs spell it, by the form the manifest names."""
    b64 = base64.b64encode(f"stellarbase:{secret}".encode()).decode()
    url = urllib.parse.quote(secret, safe="")
    return {
        "json-escaped": json.dumps(secret)[1:-1],
        "quoted (SQL)": "'" + secret.replace("'", "''") + "'",
        "quoted (shell)": shlex.quote(secret),
        "url-encoded": url,
        "url-encoded (lower hex)": re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), url),
        "url-encoded (form)": urllib.parse.quote_plus(secret),
        "base64 (Basic auth)": "Basic " + b64,
        "base64 (URL alphabet)": base64.urlsafe_b64encode(f"x{secret}".encode()).decode(),
    }


def _without_quotes(form: str) -> str:
    """The part of a planted form that must go: quotes around a secret may stay."""
    return form.strip("'")


def test_every_encoding_of_a_secret_is_scrubbed_and_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = _site()
    site["postgres"]["password"] = HOSTILE
    site_file = tmp_path / "site.yaml"
    site_file.write_text(yaml.safe_dump(site))
    root = tmp_path / "root"
    _install_files(root, site_file)
    planted = _planted_forms(HOSTILE)
    override = HostPaths(root).unit_dir / f"{UNIT}.d" / "override.conf"
    with override.open("a") as conf:
        for form, text in planted.items():
            conf.write(f'# {form}: psql -c "ALTER ROLE x PASSWORD {text}" -> {text}\n')
    bundle = tmp_path / "support.tar.gz"
    assert _support_bundle(monkeypatch, "--root", str(root), "-O", str(bundle)) == 0

    members = _members(bundle)
    for form, text in planted.items():
        needle = _without_quotes(text).encode()
        for name, data in members.items():
            assert needle not in data, f"{form} of the secret in {name}"
    assert HOSTILE.encode() not in b"".join(members.values())
    manifest = json.loads(members["summary.json"])
    listed = {
        r["form"]: r["count"]
        for r in manifest["redactions"]
        if r["file"] == f"units/{UNIT}.d/override.conf"
    }
    for form in ("json-escaped", "quoted", "url-encoded", "base64"):
        assert listed.get(form, 0) >= 2, (form, listed)
    assert all(set(r) == {"file", "form", "count"} for r in manifest["redactions"])
