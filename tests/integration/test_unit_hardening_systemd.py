"""What the units let a compromised process do, on a real systemd of each root: every unit
scores at most 2.0, the agent's token-free listener is on loopback whatever `bind` says,
the local servers keep loopback and an IPC namespace of their own, and the backup unit,
root without privileges, still backs up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import servers
from tests.fixtures_systemd import on_both_roots
from tests.integration.conftest import copy_binary, free_port_block, wait_for
from tests.systemd_sandbox import SystemdSandbox

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

REPO_DIR = "/var/lib/stellarbase-backups"
POSTGRES = "stellarbase-postgres.service"
REDIS = "stellarbase-redis.service"


def _listening(sandbox: SystemdSandbox, port: int) -> set[str]:
    out = sandbox.run(["ss", "-Hltn", f"sport = :{port}"]).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def _score(sandbox: SystemdSandbox, unit: Path) -> float:
    out = sandbox.run(["systemd-analyze", "security", "--offline=yes", str(unit)], check=False)
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert level, out.stdout[-2000:] + out.stderr[-2000:]
    return float(level.group(1))


@on_both_roots
def test_units_confine_what_a_compromised_process_reaches(
    systemd_sandbox: SystemdSandbox, binary: Path
) -> None:
    sandbox = systemd_sandbox
    exe = copy_binary(sandbox, binary)
    base = free_port_block(8)
    agent_port = base + 1
    sets = [
        "--set=bind=0.0.0.0",
        f"--set=api.port={base}",
        f"--set=agent.port={agent_port}",
        f"--set=worker.port={base + 2}",
        f"--set=local.postgres.port={base + 4}",
        f"--set=local.redis.port={base + 5}",
        f"--set=backup.repository=file://{REPO_DIR}",
    ]
    out = sandbox.run([str(exe), "install", "--tier", "pilot", *sets], check=False, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr

    units = sorted(sandbox.path("/etc/systemd/system").glob("stellarbase*.service"))
    scores = {u.name: _score(sandbox, Path("/etc/systemd/system") / u.name) for u in units}
    print("systemd-analyze security:", scores)
    assert "stellarbase-backup.service" in scores and POSTGRES in scores
    assert all(score <= 2.0 for score in scores.values()), scores

    # bind 0.0.0.0 exposes the API, not the agent's token-free /metrics and /readyz.
    assert _listening(sandbox, base) == {"0.0.0.0"}
    assert _listening(sandbox, agent_port) == {"127.0.0.1"}

    # Where systemd enforces SocketBind*= (built with BPF: Debian 13), a process of the
    # API's unit binds no port but the API's own: curl's --local-port is a bind(2).
    if "+BPF_FRAMEWORK" in sandbox.run(["systemctl", "--version"]).stdout:
        procs = "/sys/fs/cgroup/system.slice/stellarbase-api.service/cgroup.procs"
        curl = f"curl -s -o /dev/null --local-port {base + 7} http://127.0.0.1:{base}/healthz"
        outside = sandbox.run(["sh", "-c", curl], check=False)
        inside = sandbox.run(["sh", "-c", f"echo $$ > {procs} && exec {curl}"], check=False)
        assert outside.returncode == 0, outside.stderr
        assert inside.returncode == 45, (inside.returncode, inside.stderr)  # could not bind
        print("SocketBindDeny= enforced: curl in the API's unit could not bind")

    # PostgreSQL and Redis: an IPC namespace of their own, loopback only.
    host_ipc = sandbox.run(["readlink", "/proc/1/ns/ipc"]).stdout.strip()
    for unit in (POSTGRES, REDIS):
        pid = sandbox.main_pid(unit)
        assert sandbox.run(["readlink", f"/proc/{pid}/ns/ipc"]).stdout.strip() != host_ipc, unit
        shown = sandbox.systemctl("show", "--property=IPAddressDeny", "--value", unit)
        assert shown.stdout.strip() not in ("", "[none]"), unit

    # Root without privileges still writes a base backup (MemoryDenyWriteExecute= and the
    # syscall filter included: zstd, the ciphers and pg_basebackup run under them).
    sandbox.systemctl("start", "stellarbase-backup.service")
    result = sandbox.systemctl("show", "--property=Result", "--value", "stellarbase-backup")
    assert result.stdout.strip() == "success", _journal(sandbox, "stellarbase-backup")
    listing = sandbox.run([str(exe), "backup", "list", "-o", "json"], check=False, timeout=120)
    assert listing.returncode == 0 and '"backups"' in listing.stdout, listing.stderr
    wait_for("the agent's /readyz", lambda: _ready(sandbox, agent_port), timeout=60)


def _ready(sandbox: SystemdSandbox, port: int) -> bool:
    url = f"http://127.0.0.1:{port}/readyz"
    out = sandbox.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url], check=False)
    return out.stdout.strip() == "200"


def _journal(sandbox: SystemdSandbox, unit: str) -> str:
    return sandbox.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit], check=False).stdout[
        -3000:
    ]


@on_both_roots
def test_the_backup_unit_backs_up_to_s3_with_no_capability_at_all(
    systemd_sandbox: SystemdSandbox, binary: Path, s3_server: servers.S3Server
) -> None:
    sandbox = systemd_sandbox
    exe = copy_binary(sandbox, binary)
    base = free_port_block(8)
    sets = [
        f"--set=api.port={base}",
        f"--set=agent.port={base + 1}",
        f"--set=worker.port={base + 2}",
        f"--set=local.postgres.port={base + 4}",
        f"--set=local.redis.port={base + 5}",
        "--set=backup.repository=s3",
        f"--set=backup.prefix=hardening-{base}",
        f"--set=s3.endpoint={s3_server.endpoint}",
        f"--set=s3.bucket={s3_server.bucket}",
        f"--set=s3.region={s3_server.region}",
    ]
    env = {
        "STELLARBASE_S3__ACCESS_KEY": s3_server.access_key,
        "STELLARBASE_S3__SECRET_KEY": s3_server.secret_key,
    }
    out = sandbox.run(
        [str(exe), "install", "--tier", "pilot", *sets], check=False, timeout=240, env=env
    )
    assert out.returncode == 0, out.stdout + out.stderr
    unit = "stellarbase-backup.service"
    caps = sandbox.systemctl("show", "--property=CapabilityBoundingSet", "--value", unit)
    assert caps.stdout.strip() == "", caps.stdout
    sandbox.systemctl("start", unit)
    result = sandbox.systemctl("show", "--property=Result", "--value", unit)
    assert result.stdout.strip() == "success", _journal(sandbox, unit)
    status = sandbox.path("/var/lib/stellarbase/backup-status.json")
    assert status.stat().st_gid != 0  # handed to the stellarbase group without CAP_CHOWN
