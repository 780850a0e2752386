"""SIGKILL the installer after each step of its plan in turn; a re-run must converge."""

from __future__ import annotations

import json
import signal

import pytest

from tests.integration.conftest import Host

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

WATCHED = ["/etc/stellarbase", "/opt/stellarbase", "/var/lib/stellarbase", "/etc/sysusers.d"]


def _end_state(host: Host) -> tuple[str, str, str]:
    files = host.sandbox.run(
        [
            "find",
            *WATCHED,
            "/etc/systemd/system",
            "-path",
            "*stellarbase*",
            "-not",
            "-name",
            "state.json",
            "-printf",
            "%p %m %u:%g %l\\n",
        ],
        check=False,
    ).stdout
    digests = host.sandbox.run(
        [
            "sh",
            "-c",
            "find /etc/stellarbase /etc/systemd/system -name '*stellarbase*' -type f "
            "-exec sha256sum {} + | sort",
        ],
        check=False,
    ).stdout
    units = host.sandbox.run(
        ["systemctl", "list-units", "--plain", "--no-legend", "--state=active", "stellarbase*"],
        check=False,
    ).stdout
    return (
        "\n".join(sorted(files.splitlines())),
        digests,
        "\n".join(sorted(line.split()[0] for line in units.splitlines())),
    )


def test_every_interrupted_install_converges(host: Host) -> None:
    host.site["worker"]["instances"] = 2
    reference_out = host.install()
    reference = _end_state(host)
    assert "stellarbase-worker@2.service" in reference[2]
    steps = len(reference_out["steps"])
    host.sb("uninstall", "--purge", "--yes", check=True)

    site = host.write_site(host.site)
    for n in range(1, steps + 1):
        killed = host.sb("install", "--config", site, env={"STELLARBASE_STOP_AFTER_STEP": str(n)})
        assert killed.returncode == -signal.SIGKILL or killed.returncode == 128 + 9, (
            n,
            killed.stdout,
            killed.stderr,
        )
        resumed = host.install()
        assert _end_state(host) == reference, f"after a kill at step {n}"
        assert json.dumps(resumed)  # a parseable result
        host.sb("uninstall", "--purge", "--yes", check=True)
