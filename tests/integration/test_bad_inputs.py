"""Every bad input: one line of error, a hint, a documented exit code, and no new file."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stellarbase.errors import ExitCode
from tests.integration.conftest import Host

pytestmark = [pytest.mark.systemd, pytest.mark.integration]


def _snapshot(host: Host) -> str:
    """Every path (with mode and owner) where the installer could leave something."""
    return host.sandbox.run(
        ["find", "/etc", "/opt", "/usr/local", "/var/lib/stellarbase", "-printf", "%p %m %u:%g\\n"],
        check=False,
    ).stdout


def _edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Host], list[str]]:
    def make(host: Host) -> list[str]:
        site = copy.deepcopy(host.site)
        change(site)
        return ["install", "--config", host.write_site(site, "bad.yaml")]

    return make


def _raw(text: str) -> Callable[[Host], list[str]]:
    def make(host: Host) -> list[str]:
        host.sandbox.path("/root/raw.yaml").write_text(text)
        return ["install", "--config", "/root/raw.yaml"]

    return make


CASES: dict[str, tuple[Callable[[Host], list[str]], ExitCode, str]] = {
    "unknown key": (_edit(lambda s: s["api"].update(prot=1)), ExitCode.CONFIG, "api.prot"),
    "wrong type": (
        _edit(lambda s: s["worker"].update(instances="many")),
        ExitCode.CONFIG,
        "worker.instances",
    ),
    "bad tier": (lambda h: ["install", "--tier", "galactic"], ExitCode.CONFIG, "galactic"),
    "unreadable file": (
        lambda h: ["install", "--config", "/root/nope.yaml"],
        ExitCode.CONFIG,
        "nope.yaml",
    ),
    "invalid yaml": (_raw("api: [1,\n"), ExitCode.CONFIG, "YAML"),
    "bad port": (_edit(lambda s: s["api"].update(port=70000)), ExitCode.CONFIG, "api.port"),
    "bad --set": (lambda h: ["install", "--set", "api.port"], ExitCode.CONFIG, "--set"),
    "missing secret": (None, ExitCode.CONFIG, "STELLARBASE_REDIS__PASSWORD"),  # type: ignore[dict-item]
    "unreachable postgres": (None, ExitCode.DEPENDENCY, "postgres"),  # type: ignore[dict-item]
    "wrong redis password": (None, ExitCode.DEPENDENCY, "redis"),  # type: ignore[dict-item]
    "missing bucket": (
        _edit(lambda s: s["s3"].update(bucket="no-such-bucket")),
        ExitCode.DEPENDENCY,
        "s3",
    ),
    "port in use": (None, ExitCode.HOST, "in use"),  # type: ignore[dict-item]
    "unknown flag": (lambda h: ["install", "--colour"], ExitCode.USAGE, "--colour"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_changes_nothing(host: Host, case: str, dead_port: int) -> None:
    make, code, needle = CASES[case]
    env: dict[str, str] = {}
    holder = None
    if case == "missing secret":
        env = {"STELLARBASE_REDIS__PASSWORD": ""}
        make = _edit(lambda s: None)
    elif case == "unreachable postgres":
        make = _edit(
            lambda s: s["postgres"].update(url=f"postgresql://sb@127.0.0.1:{dead_port}/sb")
        )
    elif case == "wrong redis password":
        env = {"STELLARBASE_REDIS__PASSWORD": "not-the-password"}
        make = _edit(lambda s: None)
    elif case == "port in use":
        holder = socket.socket()
        holder.bind(("127.0.0.1", host.site["api"]["port"]))
        holder.listen()
        make = _edit(lambda s: None)
    argv = make(host)
    before = _snapshot(host)  # taken after the test wrote its own site file
    secrets = {k: v for k, v in {**host.secrets, **env}.items() if v}
    out = host.sandbox.run([str(host.binary), *argv], check=False, env=secrets)
    if holder:
        holder.close()
    assert out.returncode == int(code), out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") or code == ExitCode.USAGE, out.stderr
    assert needle in out.stderr, out.stderr
    if code != ExitCode.USAGE:
        assert len(lines) == 2 and lines[1].startswith("hint: "), out.stderr
    assert _snapshot(host) == before


def test_a_host_without_systemd_as_init_is_refused_with_a_way_forward(
    binary: Path, tmp_path: Path
) -> None:
    """A container, WSL or chroot: systemd is installed, but PID 1 is something else.

    The binary runs as PID 1 of a fresh PID namespace, with an empty /run, so whatever the
    machine running the tests boots with, it sees a host not booted with systemd.
    """
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private PID and mount namespace")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        inner = 'mount -t tmpfs none /run && exec "$0" "$@"'
        argv = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c", inner]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        return subprocess.run(
            [*argv, str(binary), *args], capture_output=True, text=True, env=env, timeout=60
        )

    out = run("preflight", "--tier", "pilot", "-o", "json", "--skip", "host.ports")
    assert out.returncode == ExitCode.CHECKS_FAILED, out.stdout + out.stderr
    found = {f["check"]: f for f in json.loads(out.stdout)["data"]["findings"]}
    assert found["host.systemd"]["level"] == "fail", found["host.systemd"]
    assert "not booted with systemd" in found["host.systemd"]["value"]
    assert "--root" in found["host.systemd"]["hint"]
    for command in ("plan", "install"):
        out = run(command, "--tier", "pilot")
        assert out.returncode == ExitCode.HOST, out.stdout + out.stderr
        lines = out.stderr.strip().splitlines()
        assert lines[0].startswith("error: this host is not booted with systemd"), out.stderr
        assert lines[1].startswith("hint: ") and "--root DIR" in lines[1], out.stderr
        assert "System has not been booted" not in out.stderr
    root = tmp_path / "root"  # the way forward named in the hint: files only
    out = run("install", "--tier", "pilot", "--root", str(root))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (root / "etc/systemd/system/stellarbase.target").is_file()
