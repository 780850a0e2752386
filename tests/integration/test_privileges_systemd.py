"""A service that is taken over reads only its own secrets (issue 13, acceptance 2).

A pilot with local PostgreSQL and Redis, S3 backups with an encryption key, the agent's
token listener and one inference unit (a fake GPU, the site's own command) is installed in
a real systemd. Then, for the user of each service unit, a shell runs as that user (what
an attacker who took the service over gets) and tries to read every secret it was not
given, the other units' credentials files and environment, the PostgreSQL data files, and to
signal the postmaster.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from stellarbase.envfile import read_env_file
from tests import servers
from tests.fixtures_systemd import on_both_roots
from tests.integration.conftest import copy_binary, free_port_block, wait_for
from tests.systemd_sandbox import SystemdSandbox

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # base64 of 32 bytes
TOKEN = "scrape-token-5b1f0e6a9c"
# The test S3 server takes any key pair: these are unique, so a search for them means it.
S3_ACCESS_KEY = "AKIAPRIVILEGES7Q2X"
S3_SECRET_KEY = "privileges-secret-3f9d1c7e2b"
GPU = "GPU-aaaaaaaa-0000-0000-0000-000000000001"
PGDATA = "/var/lib/stellarbase/postgres"
FAKE_NVML = {
    "driver_version": "550.54.15",
    "cuda_version": "12.4",
    "gpus": [{"uuid": GPU, "name": "NVIDIA H100", "memory_total_mib": 81559}],
}
UNITS = {
    "api": "stellarbase-api.service",
    "worker": "stellarbase-worker@1.service",
    "agent": "stellarbase-agent.service",
    "inference": f"stellarbase-inference@{GPU}.service",
}
# What denies a read, a listing or a signal; "No such file" would prove nothing.
DENIED = ("Permission denied", "Operation not permitted")


def _install(sandbox: SystemdSandbox, binary: Path, s3: servers.S3Server) -> dict[str, object]:
    base = free_port_block(8)
    site = {
        "tier": "pilot",
        "api": {"port": base},
        "agent": {"port": base + 1, "remote_port": base + 6, "remote_bind": "127.0.0.1"},
        "worker": {"port": base + 2, "instances": 1},
        "local": {"postgres": {"port": base + 4}, "redis": {"port": base + 5}},
        "health": {"timeout_seconds": 90},
        "inference": {"command": "/bin/sleep infinity", "port": base + 7},
        "s3": {"endpoint": s3.endpoint, "bucket": s3.bucket, "region": s3.region},
        "backup": {"repository": "s3", "prefix": f"privileges-{base}"},
    }
    sandbox.path("/root/site.yaml").write_text(json.dumps(site))
    sandbox.path("/root/nvml.json").write_text(json.dumps(FAKE_NVML))
    env = {
        "STELLARBASE_S3__ACCESS_KEY": S3_ACCESS_KEY,
        "STELLARBASE_S3__SECRET_KEY": S3_SECRET_KEY,
        "STELLARBASE_BACKUP__ENCRYPTION_KEY": KEY,
        "STELLARBASE_AGENT__METRICS_TOKEN": TOKEN,
        "STELLARBASE_FAKE_NVML": "/root/nvml.json",
    }
    argv = [str(binary), "install", "--config", "/root/site.yaml", "-o", "json"]
    out = sandbox.run(argv, check=False, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    again = sandbox.run(argv, check=False, env=env, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    steps = json.loads(again.stdout)["data"]["steps"]
    assert [s for s in steps if s["status"] != "unchanged"] == []
    return {"pg_port": base + 4}


def _as_user(sandbox: SystemdSandbox, user: str, probes: dict[str, str]) -> dict[str, str]:
    """Run each probe (a shell command) as `user`; name → "allowed" or its error text."""
    script = "".join(
        f"if out=$( ({cmd}) 2>&1 >/dev/null); then echo {shlex.quote(name)}=allowed; "
        f'else echo {shlex.quote(name)}="$(echo "$out" | head -c 300 | tr "\\n" " ")"; fi\n'
        for name, cmd in probes.items()
    )
    out = sandbox.run(["runuser", "-u", user, "--", "sh", "-c", script], check=False)
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.splitlines())


@on_both_roots
def test_a_service_user_reads_no_secret_but_its_own(
    systemd_sandbox: SystemdSandbox, binary: Path, s3_server: servers.S3Server
) -> None:
    sandbox = systemd_sandbox
    ports = _install(sandbox, copy_binary(sandbox, binary), s3_server)
    secrets = read_env_file(sandbox.path("/etc/stellarbase/secrets.env"))
    admin = read_env_file(sandbox.path("/etc/stellarbase/postgres-admin.env"))
    admin_password = admin["STELLARBASE_LOCAL_POSTGRES_ADMIN_PASSWORD"]

    # The agent archives WAL as its own user: the group access it has to the cluster works.
    def psql(query: str) -> str:
        argv = ["psql", "-h", "127.0.0.1", "-p", str(ports["pg_port"]), "-U", "postgres",
                "-d", "postgres", "-AtqX", "-c", query]  # fmt: skip
        return sandbox.run(argv, env={"PGPASSWORD": admin_password}).stdout.strip()

    psql("SELECT pg_switch_wal()")
    wait_for(
        "the agent to archive a WAL file",
        lambda: int(psql("SELECT archived_count FROM pg_stat_archiver") or 0) >= 1,
        timeout=90,
    )

    users = {
        name: sandbox.systemctl("show", "-P", "User", unit).stdout.strip()
        for name, unit in UNITS.items()
    }
    pids = {name: sandbox.main_pid(unit) for name, unit in UNITS.items()}
    postmaster = sandbox.main_pid("stellarbase-postgres.service")
    assert all(pids.values()) and postmaster
    s3_keys = [secrets["STELLARBASE_S3__SECRET_KEY"], secrets["STELLARBASE_S3__ACCESS_KEY"]]
    for name, user in users.items():
        probes = {
            "secrets.env": "cat /etc/stellarbase/secrets.env",
            "credentials": "ls /etc/stellarbase/credentials",
            "postgres superuser password": "cat /etc/stellarbase/postgres-admin.env",
            "postmaster signal": f"kill -0 {postmaster}",
            "redis data": "ls /var/lib/stellarbase/redis",
        }
        if name != "agent":  # the agent reads the WAL it archives, through the group
            probes["postgres data listing"] = f"ls {PGDATA}/base"
            probes["postgres data file"] = f"cat {PGDATA}/global/pg_control"
        else:
            probes["postgres data write"] = f"touch {PGDATA}/global/planted"
        for other in UNITS:
            if other == name:
                continue
            if _credentials_of(other):
                probes[f"{other} credentials"] = f"cat /etc/stellarbase/credentials/{other}.env"
            probes[f"{other} environment"] = f"cat /proc/{pids[other]}/environ"
        outcome = _as_user(sandbox, user, probes)
        leaks = {probe: out for probe, out in outcome.items() if not any(d in out for d in DENIED)}
        assert leaks == {}, (name, user, leaks)

        # No file it can read anywhere holds a secret it was not given.
        foreign = [admin_password]
        if name != "agent":
            foreign += [*s3_keys, KEY, TOKEN]
        grep = ["grep", "-rlsF", *(a for s in foreign for a in ("-e", s))]
        places = "/etc /run /var/lib/stellarbase /opt/stellarbase /proc/[0-9]*/environ"
        cmd = f"{shlex.join(grep)} {places}; true"
        found = sandbox.run(["runuser", "-u", user, "--", "sh", "-c", cmd], check=False)
        assert found.stdout.strip() == "", (name, found.stdout)

    # Each unit holds exactly its own secrets; its user reads its own settings (the shell
    # has the service's groups: the denials above are no accident of the probe).
    for name, unit in UNITS.items():
        own = _credentials_of(name)
        environ = sandbox.path(f"/proc/{pids[name]}/environ").read_bytes().split(b"\0")
        held = sorted(v.split(b"=")[0].decode() for v in environ if b"=" in v)
        assert sorted(k for k in held if k in secrets) == own, (unit, held)
        settings = f"cat /etc/stellarbase/services/{name}.json"
        assert _as_user(sandbox, users[name], {"own": settings}) == {"own": "allowed"}, name

    # Every unit runs as its own user; the local servers too.
    servers_users = {
        sandbox.systemctl("show", "-P", "User", unit).stdout.strip()
        for unit in ("stellarbase-postgres.service", "stellarbase-redis.service")
    }
    assert len({*users.values(), *servers_users}) == 6, (users, servers_users)


def _credentials_of(service: str) -> list[str]:
    """The credentials the README promises each service, and no other."""
    database = ["STELLARBASE_POSTGRES__PASSWORD", "STELLARBASE_REDIS__PASSWORD"]
    return {
        "api": database,
        "worker": database,
        "inference": [],
        "agent": sorted(
            [
                "STELLARBASE_AGENT__METRICS_TOKEN",
                "STELLARBASE_BACKUP__ENCRYPTION_KEY",
                *database,
                "STELLARBASE_S3__ACCESS_KEY",
                "STELLARBASE_S3__SECRET_KEY",
            ]
        ),
    }[service]
