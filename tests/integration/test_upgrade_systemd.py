"""Releases in a real (throwaway) systemd, on a pilot with its own PostgreSQL and Redis and
backups to a file repository: install from bundle A, upgrade to B (a newer version with one
more migration, after a fresh base backup), a failed upgrade to C (its services never get
ready) rolls back to B by itself, `rollback` on demand, and the refusals: tampered bundles
and a downgrade past the schema's compatibility range.

A is the packaged binary of this tree; B and C are built from copies of it
(tests/release_builds.py). Set RELEASES_TEST_DIR=DIR to keep the builds in DIR
and reuse them on the next run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from stellarbase.envfile import read_env_file
from stellarbase.errors import ExitCode
from tests.fixtures_systemd import on_both_roots
from tests.integration.conftest import free_port_block, ready, wait_for
from tests.release_builds import (
    SigningKey,
    Variant,
    build_variant,
    change_sums,
    drop_signature,
    flip_binary_byte,
    make_bundle,
    rewrite_bundle,
    sign_with_other_key,
)
from tests.systemd_sandbox import SystemdSandbox

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

A, B, C = "0.1.0", "0.2.0", "0.3.0"
WORKERS = ["stellarbase-worker@1.service", "stellarbase-worker@2.service"]
SERVICES = [*WORKERS, "stellarbase-api.service", "stellarbase-agent.service"]
B_MIGRATION = (
    "0003_release_notes.sql",
    "-- Additive: releases before this one run against it unchanged.\n"
    "CREATE TABLE release_notes (version text PRIMARY KEY, notes text NOT NULL);\n",
)
# C's services answer /readyz with 503 whatever their dependencies say.
C_BROKEN = (
    "installer/stellarbase/service_runtime.py",
    "ready = all(r.ok for r in results)",
    "ready = False  # a release that never gets ready, for the rollback test",
)
GATE_S = 20
KEY_IN_SANDBOX = "/root/release-key.pem"
REPO_DIR = "/var/lib/stellarbase-backups"


@dataclass(frozen=True)
class Releases:
    key: SigningKey
    bundles: dict[str, Path]


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory, binary: Path) -> Releases:
    cache = os.environ.get("RELEASES_TEST_DIR")
    workdir = Path(cache) if cache else tmp_path_factory.mktemp("releases")
    workdir.mkdir(parents=True, exist_ok=True)
    key = SigningKey.throwaway(workdir, reuse=bool(cache))
    bundles = {A: make_bundle(binary, workdir / "bundles", A, A, key)}
    variants = [
        Variant(B, upgrade_from=A, migrations=dict([B_MIGRATION])),
        Variant(C, upgrade_from=A, migrations=dict([B_MIGRATION]), edits=(C_BROKEN,)),
    ]
    for variant in variants:
        found = sorted((workdir / "bundles").glob(f"stellarbase-{variant.version}-linux-*"))
        bundles[variant.version] = (
            found[0] if cache and found else build_variant(variant, workdir, key)
        )
    return Releases(key, bundles)


class Site:
    """The installed host as the test sees it: commands, files, units and the database."""

    def __init__(self, sandbox: SystemdSandbox, releases: Releases) -> None:
        self.sandbox = sandbox
        base = free_port_block(8)
        self.pg_port = base + 4
        self.site = {
            "tier": "pilot",
            "api": {"port": base},
            "agent": {"port": base + 1},
            "worker": {"port": base + 2, "instances": len(WORKERS)},
            "local": {"postgres": {"port": base + 4}, "redis": {"port": base + 5}},
            "health": {"timeout_seconds": GATE_S},
            "backup": {"repository": f"file://{REPO_DIR}", "archive_timeout_seconds": 10},
        }
        self.config = "/root/site.yaml"
        sandbox.path(self.config).write_text(yaml.safe_dump(self.site))
        sandbox.path(KEY_IN_SANDBOX).write_text(releases.key.public_pem)
        self.bundles: dict[str, str] = {}
        for version, bundle in releases.bundles.items():
            inside = f"/root/{bundle.name}"
            self.bundles[version] = inside
            sandbox.path(inside).write_bytes(bundle.read_bytes())

    def run(
        self, binary: str, *args: str, env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        env = {"STELLARBASE_RELEASE_PUBKEY": KEY_IN_SANDBOX, **(env or {})}
        out = self.sandbox.run([binary, *args], check=False, env=env, timeout=600)
        return out.returncode, out.stdout, out.stderr

    def sql(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        admin = read_env_file(self.sandbox.path("/etc/stellarbase/postgres-admin.env"))
        password = admin["STELLARBASE_LOCAL_POSTGRES_ADMIN_PASSWORD"]
        with psycopg.connect(
            host="127.0.0.1", port=self.pg_port, user="postgres", password=password,
            dbname="stellarbase", autocommit=True,
        ) as conn:  # fmt: skip
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def backups(self) -> int:
        code, out, err = self.run("/opt/stellarbase/current/stellarbase", "backup", "list",
                                  "-o", "json")  # fmt: skip
        assert code == 0, out + err
        return len(json.loads(out)["data"]["backups"])

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            self.sandbox.path("/var/lib/stellarbase/state.json").read_text()
        )
        return data

    def current(self) -> str:
        return os.readlink(self.sandbox.path("/opt/stellarbase/current"))

    def all_ready(self) -> bool:
        ports = self.state()["ports"]
        return all(
            self.sandbox.systemctl("is-active", u, check=False).stdout.strip() == "active"
            and ready(f"http://127.0.0.1:{ports[u]}")
            for u in SERVICES
        )

    def pids(self, units: list[str]) -> dict[str, int]:
        return {u: self.sandbox.main_pid(u) for u in units}

    def entered(self, unit: str) -> int:
        out = self.sandbox.systemctl(
            "show", "--property=ActiveEnterTimestampMonotonic", "--value", unit
        )
        return int(out.stdout.strip() or 0)

    def audit(self, action: str) -> list[tuple[str, dict[str, Any]]]:
        rows = self.sql("SELECT outcome, details FROM audit_log WHERE action = %s ORDER BY id",
                        action)  # fmt: skip
        return [(str(r[0]), dict(r[1])) for r in rows]

    def host_files(self) -> dict[str, bytes]:
        """Everything the installer owns on the host, to show that a refusal changed nothing."""
        out: dict[str, bytes] = {}
        for top in ("/opt/stellarbase", "/etc/stellarbase", "/var/lib/stellarbase/state.json",
                    "/etc/systemd/system"):  # fmt: skip
            base = self.sandbox.path(top)
            for path in [base, *base.rglob("*")] if base.is_dir() else [base]:
                key = str(path.relative_to(self.sandbox.path("/")))
                if path.is_symlink():
                    out[key] = os.readlink(path).encode()
                elif path.is_file() and "stellarbase" in key:
                    out[key] = path.read_bytes()
        return out


@on_both_roots
def test_install_upgrade_fail_rollback(systemd_sandbox: SystemdSandbox, releases: Releases) -> None:
    site = Site(systemd_sandbox, releases)
    config = site.config

    # 1. install from bundle A, with A's own binary from the unpacked bundle
    site.sandbox.run(["tar", "xf", site.bundles[A], "-C", "/root"])
    code, out, err = site.run(f"/root/stellarbase-{A}/stellarbase", "install", "--bundle",
                              site.bundles[A], "--config", config, "-o", "json")  # fmt: skip
    assert code == 0, out + err
    assert site.current() == f"releases/{A}" and site.all_ready()
    site.sql("CREATE TABLE customer_rows (id int PRIMARY KEY, body text)")
    site.sql("INSERT INTO customer_rows SELECT g, md5(g::text) FROM generate_series(1, 500) g")
    rows = site.sql("SELECT count(*), sum(hashtext(body)) FROM customer_rows")

    # 2. tampered bundles of B are refused before anything changes
    before = site.host_files()
    pids = site.pids(SERVICES)
    for name, data in _tampered(releases.bundles[B]).items():
        path = f"/root/tampered-{name}.tar.gz"
        site.sandbox.path(path).write_bytes(data)
        code, out, err = site.run("/opt/stellarbase/current/stellarbase", "upgrade",
                                  "--bundle", path)  # fmt: skip
        assert code == ExitCode.BUNDLE, (name, out, err)
        assert "bundle" in err and "hint:" in err, (name, err)
    assert site.host_files() == before
    assert site.pids(SERVICES) == pids

    # 3. upgrade A → B with the installed A binary: it hands over to B's own binary, which
    # takes a fresh base backup before it migrates
    wait_for("the first base backup", lambda: site.backups() == 1, timeout=120)
    code, out, err = site.run("/opt/stellarbase/current/stellarbase", "upgrade", "--bundle",
                              site.bundles[B], "-o", "json")  # fmt: skip
    assert code == 0, out + err
    assert site.backups() == 2
    upgraded = json.loads(out)["data"]
    assert (upgraded["operation"], upgraded["from"], upgraded["to"]) == ("upgrade", A, B)
    assert site.current() == f"releases/{B}" and site.state()["version"] == B
    assert site.state()["previous_version"] == A
    assert site.all_ready()
    assert all(site.pids([u])[u] != pids[u] for u in SERVICES), "every service restarted"
    order = [site.entered(u) for u in SERVICES]
    assert order == sorted(order), "workers one at a time, then the API, then the agent"
    assert site.sql("SELECT max(version) FROM stellarbase_migrations") == [(3,)]
    assert site.sql("SELECT count(*), sum(hashtext(body)) FROM customer_rows") == rows
    assert ("success", {"from": A, "to": B, "migrations": ["0003_release_notes.sql"]}) in [
        (o, {k: d[k] for k in ("from", "to", "migrations") if k in d})
        for o, d in site.audit("upgrade")
    ]
    # the bundle was verified with the test key of STELLARBASE_RELEASE_PUBKEY: on record
    assert all(
        d["release_pubkey_override"]["file"] == KEY_IN_SANDBOX
        for o, d in site.audit("upgrade")
        if o == "success"
    )
    code, out, err = site.run("/opt/stellarbase/current/stellarbase", "status", env={})
    assert f"release key: OVERRIDDEN by {KEY_IN_SANDBOX}" in out, out + err
    # a re-run of the same upgrade changes nothing
    code, out, err = site.run("/opt/stellarbase/current/stellarbase", "upgrade", "--bundle",
                              site.bundles[B])  # fmt: skip
    assert code == 0 and "current already; 0 changed" in out, out + err

    # 4. B → C: C never gets ready, so the upgrade puts B back by itself
    pids_b = site.pids(SERVICES)
    started = time.monotonic()
    code, out, err = site.run("/opt/stellarbase/current/stellarbase", "upgrade", "--bundle",
                              site.bundles[C])  # fmt: skip
    took = time.monotonic() - started
    assert code == ExitCode.UPGRADE, out + err
    assert f"rolled back to {B}" in err and "hint:" in err, err
    assert took < 2 * GATE_S + 90, f"rollback took {took:.0f}s"
    assert site.current() == f"releases/{B}" and site.state()["version"] == B
    assert site.state()["previous_version"] == A
    assert site.all_ready()
    untouched = [
        "stellarbase-worker@2.service",
        "stellarbase-api.service",
        "stellarbase-agent.service",
    ]
    assert site.pids(untouched) == {u: pids_b[u] for u in untouched}, (
        "only worker@1 ran C: the first unit of C that was not ready stopped the upgrade"
    )
    assert site.sql("SELECT count(*), sum(hashtext(body)) FROM customer_rows") == rows
    failed = [d for o, d in site.audit("upgrade") if o == "failure"]
    assert failed and failed[-1]["to"] == C and "not healthy" in failed[-1]["error"]
    assert site.audit("rollback")[-1] == ("success", {"to": B, "after": "upgrade"})
    assert site.audit("activate")[-1][0] == "success"

    # 5. rollback on demand: back to A, which runs against B's additive schema
    code, out, err = site.run("/opt/stellarbase/current/stellarbase", "rollback")
    assert code == 0, out + err
    assert site.current() == f"releases/{A}" and site.state()["version"] == A
    assert site.all_ready()
    assert site.sql("SELECT count(*), sum(hashtext(body)) FROM customer_rows") == rows
    assert site.audit("rollback")[-1] == ("success", {"from": B, "to": A})

    # 6. forward again with rollback
    code, out, err = site.run("/opt/stellarbase/current/stellarbase", "rollback")
    assert code == 0 and site.state()["version"] == B, out + err

    # 7. a downgrade to A is refused without --allow-downgrade, before anything changes
    before = site.host_files()
    code, out, err = site.run("/opt/stellarbase/current/stellarbase", "upgrade", "--bundle",
                              site.bundles[A])  # fmt: skip
    assert code == ExitCode.UPGRADE and "--allow-downgrade" in err, out + err
    assert site.host_files() == before
    # with it (allowed: the schema is additive), killed right after worker@1 restarted;
    # the same command again finishes the move
    code, out, err = site.run("/opt/stellarbase/current/stellarbase", "plan", "--config",
                              config, "-o", "json")  # fmt: skip
    names = [step["step"] for step in json.loads(out)["data"]["steps"]]
    stop_after = names.index("start stellarbase-worker@1.service") + 1
    pids_b = site.pids(SERVICES)
    crash = {"STELLARBASE_STOP_AFTER_STEP": str(stop_after)}
    code, out, err = site.run("/opt/stellarbase/current/stellarbase", "upgrade", "--bundle",
                              site.bundles[A], "--allow-downgrade", env=crash)  # fmt: skip
    assert code != 0, out + err
    assert site.current() == f"releases/{A}"
    moved = {u for u, pid in site.pids(SERVICES).items() if pid != pids_b[u]}
    assert moved == {"stellarbase-worker@1.service"}, moved
    code, out, err = site.run("/opt/stellarbase/current/stellarbase", "upgrade", "--bundle",
                              site.bundles[A], "--allow-downgrade")  # fmt: skip
    assert code == 0 and f"release {A} is current already; " in out, out + err
    assert site.state()["version"] == A and site.all_ready()
    assert all(site.pids([u])[u] != pids_b[u] for u in SERVICES), "every service runs A"
    assert site.sql("SELECT count(*), sum(hashtext(body)) FROM customer_rows") == rows

    # 8. back to B, then a breaking migration: A is refused
    code, out, err = site.run("/opt/stellarbase/current/stellarbase", "rollback")
    assert code == 0 and site.state()["version"] == B, out + err
    site.sql("UPDATE stellarbase_migrations SET compatible_from = 3 WHERE version = 3")
    before = site.host_files()
    code, out, err = site.run("/opt/stellarbase/current/stellarbase", "rollback")
    assert code == ExitCode.UPGRADE, out + err
    assert f"release {A} cannot run against this database" in err
    assert "migrations only go forward" in err
    assert site.host_files() == before and site.all_ready()


def _tampered(bundle: Path) -> dict[str, bytes]:
    """Five broken copies of a bundle: each must be refused."""
    out = {
        name: rewrite_bundle(bundle, change).read_bytes()
        for name, change in [
            ("flipped-byte", flip_binary_byte),
            ("changed-sums", change_sums),
            ("unsigned", drop_signature),
            ("other-key", sign_with_other_key),
        ]
    }
    whole = bundle.read_bytes()
    return out | {"truncated": whole[: len(whole) * 2 // 3]}
