"""Air-gapped install: a host whose network namespace holds only loopback installs the
pilot from the release bundle, with its own PostgreSQL and Redis. No step can have reached
for a network: there is no route to one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_systemd import TEARDOWN_POWEROFF_S, SandboxRoot, boot_sandbox
from tests.integration.conftest import free_port_block
from tests.release_builds import SigningKey, make_bundle
from tests.systemd_sandbox import SystemdSandbox

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

UNITS = [
    "stellarbase-postgres.service",
    "stellarbase-redis.service",
    "stellarbase-agent.service",
    "stellarbase-worker@1.service",
    "stellarbase-api.service",
]


@pytest.fixture
def isolated(request: pytest.FixtureRequest, sandbox_root: SandboxRoot) -> Iterator[SystemdSandbox]:
    sandbox = boot_sandbox(request, sandbox_root, loopback_only=True)
    try:
        yield sandbox
    finally:
        sandbox.poweroff(timeout=TEARDOWN_POWEROFF_S)


def test_bundle_installs_with_loopback_only(
    isolated: SystemdSandbox, binary: Path, tmp_path: Path
) -> None:
    sandbox = isolated
    links = sandbox.run(["ip", "-o", "link", "show"]).stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]
    assert sandbox.run(["ip", "-4", "route", "show"]).stdout.strip() == ""
    assert sandbox.run(["ip", "-6", "route", "show"]).stdout.strip() in (
        "",
        "::1 dev lo proto kernel metric 256 pref medium",
    )
    for address in ("192.0.2.1", "2001:db8::1"):  # documentation addresses: routed nowhere
        route = sandbox.run(["ip", "route", "get", address], check=False)
        assert route.returncode != 0 and "unreachable" in route.stderr.lower(), route.stderr

    key = SigningKey.throwaway(tmp_path)
    bundle = make_bundle(binary, tmp_path / "out", "0.1.0", "0.1.0", key)
    sandbox.path("/root/release-key.pem").write_text(key.public_pem)
    sandbox.path(f"/root/{bundle.name}").write_bytes(bundle.read_bytes())
    sandbox.run(["tar", "xf", f"/root/{bundle.name}", "-C", "/root"])
    base = free_port_block(8)
    ports = [
        f"--set=api.port={base}",
        f"--set=agent.port={base + 1}",
        f"--set=worker.port={base + 2}",
        f"--set=local.postgres.port={base + 4}",
        f"--set=local.redis.port={base + 5}",
    ]
    env = {"STELLARBASE_RELEASE_PUBKEY": "/root/release-key.pem"}
    out = sandbox.run(
        ["/root/stellarbase-0.1.0/stellarbase", "install", "--bundle", f"/root/{bundle.name}",
         "--tier", "pilot", *ports, "-o", "json"],
        check=False, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    endpoints = json.loads(out.stdout)["data"]["endpoints"]
    for unit in UNITS:
        assert sandbox.systemctl("is-active", unit, check=False).stdout.strip() == "active", unit
    for unit, url in endpoints.items():
        probe = sandbox.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             f"{url}/readyz"], check=False)  # fmt: skip
        assert probe.stdout == "200", unit
    assert (
        sandbox.path("/opt/stellarbase/releases/0.1.0/stellarbase").read_bytes()
        == binary.read_bytes()
    )
