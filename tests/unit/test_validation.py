"""Every value is checked, against what will read it, before install changes anything."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stellarbase import systemd
from stellarbase.commands.install import install
from stellarbase.configload import load_config
from stellarbase.errors import ExitCode, StellarError
from stellarbase.paths import HostPaths
from tests.filetree import file_states

FILE_BACKUPS = ["backup.repository=file:///srv/backups"]


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    path = tmp_path / "stellarbase-bin"
    path.write_bytes(b"#!/bin/sh\necho fake release\n")
    return path


def _config_error(
    *sets: str, tier: str | None = None, env: dict[str, str] | None = None
) -> StellarError:
    with pytest.raises(StellarError) as info:
        load_config(sets=list(sets), tier=tier, env=env or {})
    assert info.value.code == ExitCode.CONFIG
    assert "\n" not in info.value.message and info.value.hint
    return info.value


def _install_refused(root: Path, binary: Path, *sets: str) -> StellarError:
    """Refused with a config error, and the installed root left exactly as it was."""
    before = file_states(root)
    start = time.monotonic()
    with pytest.raises(StellarError) as info:
        install(load_config(sets=list(sets), env={}), HostPaths(root), binary)
    assert time.monotonic() - start < 1.0
    assert info.value.code == ExitCode.CONFIG, info.value.message
    assert "\n" not in info.value.message and info.value.hint
    assert file_states(root) == before
    return info.value


@pytest.fixture
def installed(tmp_path: Path, binary: Path) -> Path:
    root = tmp_path / "root"
    install(load_config(env={}), HostPaths(root), binary)
    return root


# --- backup.schedule: what systemd's OnCalendar= takes ---------------------------------


@pytest.mark.host_commands
@pytest.mark.parametrize("schedule", ["every tuesday-ish", "daily at noon", "25:00", "Mon 9am"])
def test_a_schedule_systemd_cannot_parse_is_refused(
    installed: Path, binary: Path, schedule: str
) -> None:
    err = _install_refused(installed, binary, *FILE_BACKUPS, f"backup.schedule={schedule}")
    assert "backup.schedule" in err.message and "systemd-analyze calendar" in err.hint


@pytest.mark.host_commands
@pytest.mark.parametrize("schedule", ["daily", "Mon..Fri *-*-* 02:30:00", "*-*-* 04:00 UTC"])
def test_a_schedule_systemd_parses_is_taken(installed: Path, binary: Path, schedule: str) -> None:
    loaded = load_config(sets=[*FILE_BACKUPS, f"backup.schedule={schedule}"], env={})
    install(loaded, HostPaths(installed), binary)
    timer = HostPaths(installed).unit_dir / "stellarbase-backup.timer"
    assert f"OnCalendar={schedule}\n" in timer.read_text()


@pytest.mark.parametrize(
    ("schedule", "ok"),
    [
        ("daily", True),
        ("weekly", True),
        ("Mon..Fri *-*-* 02:30:00", True),
        ("Sat,Sun 03:00", True),
        ("*-*-01 00:00:00", True),
        ("*-*-* *:00/15:00", True),
        ("2026-12-24 18:00 UTC", True),
        ("every tuesday-ish", False),
        ("daily at noon", False),
        ("25:00", False),
        ("Mon 9am", False),
        ("*-13-01 00:00", False),
        ("", False),
    ],
)
def test_without_systemd_analyze_only_a_safe_subset_is_taken(
    monkeypatch: pytest.MonkeyPatch, schedule: str, ok: bool
) -> None:
    monkeypatch.setattr(systemd.shutil, "which", lambda *a, **k: None)
    problem = systemd.calendar_problem(schedule)
    assert (problem is None) == ok, problem


# --- control characters, sizes, quotas, ports, paths --------------------------------------


@pytest.mark.parametrize(
    "item",
    [
        "inference.command=/usr/bin/serve\nExecStartPre=/bin/rm -rf /",
        "inference.command=/usr/bin/serve\x00 --x",
        "backup.schedule=daily\nOnCalendar=hourly",
        "s3.region=eu\rwest",
        "agent.tls_cert=/etc/ssl/a\x1b.pem",
    ],
)
def test_control_characters_are_refused(item: str) -> None:
    sets = [item, "s3.bucket=bucket-1"] if item.startswith("s3.") else [item]
    err = _config_error(*sets)
    assert "control character" in err.message
    assert item.split("=")[0] in err.message


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("inference.command=serve --port 9000", "absolute path"),
        ("inference.command=/usr/bin/serve --name 'unclosed", "quote"),
        ("inference.command=/usr/bin/serve --load 90%", "%"),
    ],
)
def test_an_inference_command_systemd_would_not_run_is_refused(item: str, needle: str) -> None:
    err = _config_error(item)
    assert "inference.command" in err.message and needle in err.message + err.hint


@pytest.mark.parametrize(
    "item",
    [
        "api.limits.memory_max=512",  # bytes: the service could not even start
        "api.limits.memory_max=12Q",
        "worker.limits.memory_max=0",
        "api.limits.cpu_quota=0%",
        "agent.limits.cpu_quota=fast",
    ],
)
def test_sizes_and_quotas_systemd_would_ignore_or_choke_on_are_refused(item: str) -> None:
    assert item.split("=")[0] in _config_error(item).message


@pytest.mark.parametrize(
    "item", ["api.limits.memory_max=1G", "api.limits.memory_max=75%", "api.limits.cpu_quota=150%"]
)
def test_good_sizes_are_taken(item: str) -> None:
    load_config(sets=[item], env={})


@pytest.mark.parametrize(
    "sets",
    [
        ["inference.port=8300"],  # the API's
        ["worker.instances=8", "inference.port=8315"],  # inside the workers' range
        ["agent.remote_port=8432"],  # the local PostgreSQL's
    ],
)
def test_colliding_ports_are_refused(sets: list[str]) -> None:
    token = {"STELLARBASE_AGENT__METRICS_TOKEN": "t"}  # secrets are not taken by --set
    assert "port" in _config_error(*sets, env=token).message


@pytest.mark.parametrize(
    ("repo", "needle"),
    [
        ("file://srv/backups", "file:///"),
        ("file:///", "directory"),
        ("file:///srv/../etc", ".."),
        ("file:///srv/my backups", "character"),
        ("file:///srv/90%", "character"),
    ],
)
def test_a_file_repository_needs_a_sane_absolute_directory(repo: str, needle: str) -> None:
    err = _config_error(f"backup.repository={repo}")
    assert needle in err.message + err.hint


@pytest.mark.host_commands  # systemd-sysusers --root=<tmp> creates the user
@pytest.mark.parametrize(
    ("repo", "needle"),
    [
        ("file:///var/lib/stellarbase/backups", "/var/lib/stellarbase"),  # purge removes it
        ("file:///etc/stellarbase/b", "/etc/stellarbase"),
        ("file:///tmp/backups", "/tmp"),  # the services have a private /tmp
        ("file:///proc/b", "/proc"),
    ],
)
def test_a_file_repository_stays_out_of_installer_and_system_dirs(
    installed: Path, binary: Path, repo: str, needle: str
) -> None:
    err = _install_refused(installed, binary, f"backup.repository={repo}")
    assert "backup.repository" in err.message and needle in err.message


def test_external_urls_need_a_host_and_a_sane_database() -> None:
    base = ["dependencies.mode=external"]
    assert "postgres.url" in _config_error(*base, "postgres.url=postgresql:///sb").message
    assert "redis.url" in _config_error(*base, "redis.url=redis://cache:6379/x").message


def test_a_tls_key_without_a_remote_listener_is_still_checked() -> None:
    assert "agent.tls_cert" in _config_error("agent.tls_cert=relative.pem").message


def test_control_characters_in_a_site_file_are_refused(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text('inference:\n  command: "/usr/bin/serve\\nExecStartPre=/bin/sh"\n')
    with pytest.raises(StellarError) as info:
        load_config(site_file=site, env={})
    assert info.value.code == ExitCode.CONFIG
    assert "inference.command" in info.value.message and "U+000A" in info.value.message
    assert "\n" not in info.value.message.split("(got")[0]
