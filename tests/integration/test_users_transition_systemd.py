"""From the release that ran every unit as `stellarbase` to one user per service, and back.

The previous release is built from the last commit before the split (PREVIOUS) and
installed with local PostgreSQL and Redis and file backups; `upgrade` to this tree re-owns
the data, keeps every row and secret, and archives again; `rollback` hands the data back
to the previous release, which runs healthy on it; and forward again.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from stellarbase.envfile import read_env_file
from tests.integration.conftest import free_port_block, wait_for
from tests.release_builds import REPO, SigningKey, Variant, build_variant, make_bundle
from tests.systemd_sandbox import SystemdSandbox

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

# The last commit whose units all ran as the one user `stellarbase`.
PREVIOUS = "53c1561cde3e02758d51cae31117d8965ae1423b"
OLD, NEW = "0.1.0", "0.2.0"
KEY_IN_SANDBOX = "/root/release-key.pem"
REPO_DIR = "/var/lib/stellarbase-backups"
PGDATA = "/var/lib/stellarbase/postgres"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, dict[str, Path]]:
    workdir = Path(os.environ.get("RELEASES_TEST_DIR") or tmp_path_factory.mktemp("users"))
    workdir.mkdir(parents=True, exist_ok=True)
    key = SigningKey.throwaway(workdir, reuse=bool(os.environ.get("RELEASES_TEST_DIR")))
    tree = workdir / "tree-previous"
    if not (tree / "dist" / "stellarbase").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS],
                                 capture_output=True, check=True)  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        (tree / ".venv").symlink_to(REPO / ".venv")
        env = {k: v for k, v in os.environ.items() if not k.startswith("STELLARBASE_")}
        subprocess.run(["bash", "packaging/build.sh"], cwd=tree, check=True,
                       capture_output=True, env=env)  # fmt: skip
    old = make_bundle(tree / "dist" / "stellarbase", workdir / "bundles", OLD, OLD, key, tree)
    cached = sorted((workdir / "bundles").glob(f"stellarbase-{NEW}-linux-*"))
    reuse = os.environ.get("RELEASES_TEST_DIR") and cached
    new = cached[0] if reuse else build_variant(Variant(NEW, upgrade_from=OLD), workdir, key)
    return key, {OLD: old, NEW: new}


def test_upgrade_reowns_the_data_and_rollback_hands_it_back(
    systemd_sandbox: SystemdSandbox, bundles: tuple[SigningKey, dict[str, Path]]
) -> None:
    sandbox = systemd_sandbox
    key, found = bundles
    sandbox.path(KEY_IN_SANDBOX).write_text(key.public_pem)
    base = free_port_block(8)
    pg_port = base + 4
    site = {
        "tier": "pilot",
        "api": {"port": base},
        "agent": {"port": base + 1},
        "worker": {"port": base + 2, "instances": 1},
        "local": {"postgres": {"port": pg_port}, "redis": {"port": base + 5}},
        "health": {"timeout_seconds": 60},
        "backup": {"repository": f"file://{REPO_DIR}", "archive_timeout_seconds": 10},
    }
    sandbox.path("/root/site.yaml").write_text(yaml.safe_dump(site))
    inside = {}
    for version, bundle in found.items():
        inside[version] = f"/root/{bundle.name}"
        sandbox.path(inside[version]).write_bytes(bundle.read_bytes())

    def sb(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {"STELLARBASE_RELEASE_PUBKEY": KEY_IN_SANDBOX}
        return sandbox.run([binary, *args], check=False, env=env, timeout=600)

    def sql(query: str) -> str:
        admin = read_env_file(sandbox.path("/etc/stellarbase/postgres-admin.env"))
        argv = ["psql", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "-d",
                "stellarbase", "-AtqX", "-v", "ON_ERROR_STOP=1", "-c", query]  # fmt: skip
        env = {"PGPASSWORD": admin["STELLARBASE_LOCAL_POSTGRES_ADMIN_PASSWORD"]}
        return sandbox.run(argv, env=env).stdout.strip()

    def archives() -> None:
        before = int(sql("SELECT archived_count FROM pg_stat_archiver"))
        sql("SELECT pg_switch_wal()")
        wait_for(
            "a WAL file archived",
            lambda: int(sql("SELECT archived_count FROM pg_stat_archiver")) > before,
            timeout=90,
        )

    def runs_as(unit: str) -> str:
        pid = sandbox.main_pid(unit)
        return sandbox.run(["ps", "-o", "user:32=", "-p", str(pid)]).stdout.strip()

    # The previous release, from its bundle: everything runs as stellarbase.
    sandbox.run(["tar", "-xzf", inside[OLD], "-C", "/root"])
    first = sb(f"/root/stellarbase-{OLD}/stellarbase", "install", "--config", "/root/site.yaml",
               "-o", "json")  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert runs_as("stellarbase-postgres.service") == "stellarbase"
    sql("CREATE TABLE kept AS SELECT g AS n FROM generate_series(1, 1000) g")
    secrets = read_env_file(sandbox.path("/etc/stellarbase/secrets.env"))

    # Upgrade: the data is re-owned, every row and secret kept, archiving goes on.
    since = sandbox.run(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()
    up = sb("/opt/stellarbase/current/stellarbase", "upgrade", "--bundle", inside[NEW])
    journal = ["journalctl", "--no-pager", "-o", "short-precise", "--since", since,
               "-u", "stellarbase-postgres", "-u", "init.scope"]  # fmt: skip
    assert up.returncode == 0, up.stderr[-3000:] + "\n".join(
        sandbox.run(journal, check=False).stdout.splitlines()[:80]
    )
    assert runs_as("stellarbase-postgres.service") == "stellarbase-pg"
    assert runs_as("stellarbase-redis.service") == "stellarbase-redis"
    assert runs_as("stellarbase-agent.service") == "stellarbase-agent"
    owners = sandbox.run(["find", PGDATA, "-printf", "%u\\n"]).stdout.split()
    assert set(owners) == {"stellarbase-pg"}
    assert sql("SELECT count(*) FROM kept") == "1000"
    assert read_env_file(sandbox.path("/etc/stellarbase/secrets.env")) == secrets
    archives()
    again = sb("/opt/stellarbase/current/stellarbase", "install", "--config", "/root/site.yaml",
               "-o", "json")  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    changed = [s for s in json.loads(again.stdout)["data"]["steps"] if s["status"] != "unchanged"]
    assert changed == []

    # Rollback: the previous release gets its data back and runs healthy on it.
    back = sb("/opt/stellarbase/current/stellarbase", "rollback")
    assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
    assert runs_as("stellarbase-postgres.service") == "stellarbase"
    assert sql("SELECT count(*) FROM kept") == "1000"
    archives()

    # And forward again.
    forward = sb("/opt/stellarbase/current/stellarbase", "rollback")
    assert forward.returncode == 0, forward.stdout[-3000:] + forward.stderr[-3000:]
    assert runs_as("stellarbase-postgres.service") == "stellarbase-pg"
    assert sql("SELECT count(*) FROM kept") == "1000"
    assert read_env_file(sandbox.path("/etc/stellarbase/secrets.env")) == secrets
    archives()
