"""Random sequences of installs on one host, over a corpus of valid and invalid configs.

One sandboxed host, installed once as a plain pilot, holds a canary table in its local
PostgreSQL. Then installs follow, each with a config of tests/transitions_corpus.py, in an
order drawn from a seed. After every step:

* the canary rows are intact (and the cluster is the same one: its system identifier);
* a refused config exits with its documented code, quickly, and changed no file, no unit
  and no main PID;
* an accepted one converged: the installed config is the one given, the units match it,
  and a re-run reports 0 changed and changes nothing.

TRANSITIONS_TEST_SEED picks the order (the same seed gives the same sequence),
TRANSITIONS_TEST_STEPS how many installs (at least 40 in CI), and
TRANSITIONS_TEST_CASES (indices into the corpus, comma-separated) replays a given
sequence instead. TRANSITIONS_TEST_KEEP_GOING=1 reports every failing step rather than
stopping at the first. A failure names the seed and the steps so far. (Not STELLARBASE_*:
every such variable is site config to the binary.)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from stellarbase.envfile import read_env_file
from stellarbase.errors import ExitCode
from tests import servers
from tests.filetree import Entry, file_states
from tests.integration.conftest import copy_binary, free_port_block, wait_for
from tests.systemd_sandbox import SystemdSandbox
from tests.transitions_corpus import (
    BLOCK,
    BOOTSTRAP,
    CASES,
    FILE_REPO,
    HELD,
    Case,
    Context,
    Deps,
    sequence,
)

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

SEED_ENV = "TRANSITIONS_TEST_SEED"
STEPS_ENV = "TRANSITIONS_TEST_STEPS"
CASES_ENV = "TRANSITIONS_TEST_CASES"
KEEP_GOING_ENV = "TRANSITIONS_TEST_KEEP_GOING"
DEFAULT_SEED = 20261207
DEFAULT_STEPS = 40
# A refusal happens before any change: a config error takes the binary's start-up (about
# half a second here), a preflight refusal one dependency check at most. The bound is
# generous for a loaded CI runner; the measured times are printed.
REFUSAL_BOUND_S = 10.0
# An accepted install slower than this has what it changed printed in the summary.
SLOW_S = 20.0
SITE = "/root/site.yaml"
CANARY_ROWS = 1000
# Under /var/lib/stellarbase, what the servers and the agent write while running: compared by
# the directory itself (mode, owner), not its content.
LIVE = ("postgres", "redis", "wal-spool", "backup-status.json")
SECRET_KEYS = {"password", "access_key", "secret_key", "encryption_key", "metrics_token"}


def chosen_sequence() -> tuple[int, list[Case]]:
    seed = int(os.environ.get(SEED_ENV) or DEFAULT_SEED)
    given = os.environ.get(CASES_ENV, "").strip()
    if given:
        return seed, [BOOTSTRAP, *(CASES[int(i)] for i in given.split(",") if i.strip())]
    return seed, sequence(seed, int(os.environ.get(STEPS_ENV) or DEFAULT_STEPS))


@dataclass
class Step:
    index: int
    case: Case
    expected: int
    code: int = -1
    seconds: float = 0.0
    rerun_seconds: float = 0.0
    failure: str = ""
    said: str = ""  # what a slow accepted install changed, for the summary

    def line(self) -> str:
        rerun = f" re-run {self.rerun_seconds:5.1f}s" if self.rerun_seconds else ""
        mark = "FAIL " if self.failure else ""
        return (
            f"{mark}{self.index:3d} [{CASES.index(self.case):2d}] {self.case.name:<58} "
            f"expected {self.expected:>2} got {self.code:>2} in {self.seconds:5.1f}s{rerun}"
        )


@dataclass
class Transitions:
    sandbox: SystemdSandbox
    binary: Path
    ctx: Context
    admin_password: str = ""
    system_id: str = ""
    canary: str = ""
    installed: Case = BOOTSTRAP
    steps: list[Step] = field(default_factory=list)

    # --- driving the host ------------------------------------------------------------------

    def install(self, case: Case, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
        if case.raw is not None:
            self.sandbox.path(SITE).write_text(case.raw)
        else:
            self.sandbox.path(SITE).write_text(yaml.safe_dump(case.site(self.ctx)))
        argv = [str(self.binary), "install", "--config", SITE, *case.args(), *extra]
        start = time.monotonic()
        out = self.sandbox.run(argv, check=False, timeout=300)
        return out, time.monotonic() - start

    def settle(self) -> None:
        """Let the first base backup that an install starts (and runs on) finish."""
        wait_for(
            "the base backup to finish",
            lambda: self.state("stellarbase-backup.service") not in ("activating", "active"),
            timeout=120,
        )

    def state(self, unit: str) -> str:
        return self.sandbox.systemctl("is-active", unit, check=False).stdout.strip()

    # --- what must not move ----------------------------------------------------------------

    def files(self) -> dict[str, Entry]:
        p = self.sandbox.path
        units = p("/etc/systemd/system")
        tops = [
            p("/etc/stellarbase"),
            p("/etc/sysusers.d/stellarbase.conf"),
            p("/opt/stellarbase"),
            *sorted(units.glob("stellarbase*")),
            units / "multi-user.target.wants" / "stellarbase.target",
        ]
        state = p("/var/lib/stellarbase")
        if state.is_dir():
            tops += [c for c in sorted(state.iterdir()) if c.name not in LIVE]
        out = file_states(*tops)
        for top in [state, *(state / n for n in LIVE), p(FILE_REPO)]:
            if top.exists():
                st = top.lstat()
                out[str(top)] = (st.st_mode, st.st_uid, st.st_gid, b"")
        return out

    def units(self) -> dict[str, dict[str, str]]:
        """Every loaded stellarbase unit: its state, main PID and when it last started."""
        listed = self.sandbox.systemctl(
            "list-units", "--all", "--plain", "--no-legend", "--full", "stellarbase*"
        ).stdout.split("\n")
        # Per-request instances the agent starts for a supervised restart come and go.
        names = [
            n
            for n in (line.split(" ", 1)[0] for line in listed if line.strip())
            if not n.startswith("stellarbase-supervise@")
        ]
        if not names:
            return {}
        props = "Id,LoadState,ActiveState,SubState,MainPID,NRestarts,ActiveEnterTimestampMonotonic"
        shown = self.sandbox.systemctl("show", f"--property={props}", *names).stdout
        out: dict[str, dict[str, str]] = {}
        for block in shown.strip().split("\n\n"):
            fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            out[fields.pop("Id")] = fields
        return out

    def journal_cursor(self) -> str:
        out = self.sandbox.run(
            ["journalctl", "-n", "0", "--show-cursor", "--no-pager"], check=False
        )
        return out.stdout.strip().rpartition("cursor: ")[2]

    def journal_since(self, cursor: str) -> str:
        """What the units and systemd said about them during a slow install: where its time
        went (a stop that ran into its timeout, a readiness wait)."""
        out = self.sandbox.run(
            ["journalctl", "--no-pager", "-o", "short-monotonic", f"--after-cursor={cursor}",
             "-u", "stellarbase*"],
            check=False,
        )  # fmt: skip
        return f"journal during the install:\n{out.stdout[-12000:]}"

    # --- the canary ------------------------------------------------------------------------

    def local_pg_port(self) -> int:
        return int(self.installed.site(self.ctx)["local"]["postgres"]["port"])

    def sql(self, query: str, db: str = "transition_canary", password: str = "") -> str:
        out = self.psql(query, db, password or self.admin_password)
        if out.returncode != 0 and "password authentication failed" in out.stderr:
            raise AssertionError(f"canary query refused: {self.why_refused()}")
        assert out.returncode == 0, f"canary query failed: {out.stderr.strip()}"
        return out.stdout.strip()

    def psql(self, query: str, db: str, password: str) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.local_pg_port()), "-U", "postgres",
             "-d", db, "-AtqX", "-v", "ON_ERROR_STOP=1", "-c", query],
            env={"PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"},
            check=False,
        )  # fmt: skip

    def why_refused(self) -> str:
        """The superuser password of the first cluster no longer opens the one running: say
        whether the cluster is another one, through the password the host holds now."""
        try:
            admin = read_env_file(self.sandbox.path("/etc/stellarbase/postgres-admin.env"))
        except OSError:
            return "the superuser password changed and postgres-admin.env is gone"
        now = admin.get("STELLARBASE_LOCAL_POSTGRES_ADMIN_PASSWORD", "")
        out = self.psql("SELECT system_identifier FROM pg_control_system()", "postgres", now)
        if out.returncode != 0:
            return f"neither the first nor the current superuser password opens it: {out.stderr}"
        found = out.stdout.strip()
        if found != self.system_id:
            has = self.psql("SELECT 1", "transition_canary", now).returncode == 0
            return (
                f"the local cluster was re-initialised (system identifier {found}, was "
                f"{self.system_id}); the canary database {'is' if has else 'is not'} in it"
            )
        return "the same cluster, but its superuser password was changed"

    CANARY_SUM = "SELECT count(*) || ':' || md5(string_agg(v, ',' ORDER BY n)) FROM canary"

    def plant_canary(self) -> None:
        admin = read_env_file(self.sandbox.path("/etc/stellarbase/postgres-admin.env"))
        self.admin_password = admin["STELLARBASE_LOCAL_POSTGRES_ADMIN_PASSWORD"]
        self.sql("CREATE DATABASE transition_canary", db="postgres")
        self.sql(
            "CREATE TABLE canary (n int PRIMARY KEY, v text NOT NULL);"
            f"INSERT INTO canary SELECT g, md5(g::text) FROM generate_series(1, {CANARY_ROWS}) g"
        )
        self.canary = self.sql(self.CANARY_SUM)
        self.system_id = self.sql("SELECT system_identifier FROM pg_control_system()")
        assert self.canary.startswith(f"{CANARY_ROWS}:")

    def check_canary(self) -> None:
        """The rows through the running server, or the cluster's identity on disk while the
        local server is retired."""
        if "postgres" in self.installed.local():
            assert self.sql(self.CANARY_SUM) == self.canary, "canary rows changed"
            found = self.sql("SELECT system_identifier FROM pg_control_system()")
        else:
            found = self.controldata_system_id()
        assert found == self.system_id, "the local PostgreSQL cluster is another one"

    def controldata_system_id(self) -> str:
        data = "/var/lib/stellarbase/postgres"
        assert self.sandbox.path(f"{data}/PG_VERSION").is_file(), f"{data} is gone"
        version = self.sandbox.path(f"{data}/PG_VERSION").read_text().strip()
        out = self.sandbox.run(
            [f"/usr/lib/postgresql/{version}/bin/pg_controldata", data], env={"LANG": "C"}
        ).stdout
        line = next(x for x in out.splitlines() if x.startswith("Database system identifier"))
        return line.split(":", 1)[1].strip()

    # --- one step --------------------------------------------------------------------------

    def step(self, index: int, case: Case) -> Step:
        expected = int(case.outcome)
        step = Step(index, case, expected)
        self.steps.append(step)
        files, units = self.files(), self.units()
        since = self.journal_cursor()
        out, step.seconds = self.install(case)
        step.code = out.returncode
        if out.returncode == 0:
            self.installed = case  # whatever was expected: the host moved
            if step.seconds > SLOW_S:
                step.said = out.stdout + self.journal_since(since)
        said = f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
        assert out.returncode == expected, f"exit {out.returncode}, expected {expected}\n{said}"
        if expected == ExitCode.OK:
            self.check_converged(case, step)
        else:
            self.check_refused(case, step, out, files, units)
        self.check_canary()
        return step

    def check_refused(
        self,
        case: Case,
        step: Step,
        out: subprocess.CompletedProcess[str],
        files: dict[str, Entry],
        units: dict[str, dict[str, str]],
    ) -> None:
        assert out.stderr.startswith("error: "), out.stderr
        assert case.needle.lower() in out.stderr.lower(), out.stderr
        assert _changes(files, self.files()) == [], "a refused install changed files"
        assert _changes(units, self.units()) == [], "a refused install changed units"
        assert step.seconds < REFUSAL_BOUND_S, f"refused after {step.seconds:.1f}s"

    def check_converged(self, case: Case, step: Step) -> None:
        self.settle()
        want = case.site(self.ctx)
        installed = yaml.safe_load(
            self.sandbox.path("/etc/stellarbase/stellarbase.yaml").read_text()
        )
        assert _mismatches(want, installed) == [], "the installed config is not the one given"
        units = self.units()
        workers = {u for u, s in units.items() if u.startswith("stellarbase-worker@")
                   and s["ActiveState"] == "active"}  # fmt: skip
        n = want["worker"]["instances"]
        assert workers == {f"stellarbase-worker@{i}.service" for i in range(1, n + 1)}, units
        for dep in ("postgres", "redis"):
            state = units.get(f"stellarbase-{dep}.service", {}).get("ActiveState", "inactive")
            assert (state == "active") == (dep in case.local()), f"stellarbase-{dep}: {state}"
        files = self.files()
        again, step.rerun_seconds = self.install(case, "-o", "json")
        assert again.returncode == 0, again.stdout + again.stderr
        changed = [
            s for s in json.loads(again.stdout)["data"]["steps"] if s["status"] != "unchanged"
        ]
        assert changed == [], f"the re-run changed {changed}"
        assert _changes(units, self.units()) == [], "the re-run moved units"
        assert _changes(files, self.files()) == [], "the re-run changed files"


def _changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    keys = sorted(set(before) | set(after))
    out = []
    for key in keys:
        if key not in after:
            out.append(f"gone: {key}")
        elif key not in before:
            out.append(f"new: {key}")
        elif before[key] != after[key]:
            a, b = before[key], after[key]
            if isinstance(a, tuple):  # a file: say what differs without dumping content
                what = [
                    n
                    for n, x, y in zip(("mode", "uid", "gid", "content"), a, b, strict=True)
                    if x != y
                ]
                out.append(f"changed {'/'.join(what)}: {key}")
            else:
                diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
                out.append(f"changed {key}: {diff}")
    return out


def _mismatches(want: dict[str, Any], have: Any, prefix: str = "") -> list[str]:
    """Keys of the given site config whose installed value differs (secrets aside)."""
    out = []
    for key, value in want.items():
        dotted = f"{prefix}{key}"
        got = have.get(key) if isinstance(have, dict) else None
        if key in SECRET_KEYS:
            continue
        if isinstance(value, dict):
            out += _mismatches(value, got, dotted + ".")
        elif got != value:
            out.append(f"{dotted}: gave {value!r}, installed {got!r}")
    return out


@pytest.fixture
def deps(
    postgres_server: servers.PostgresServer,
    redis_server: servers.RedisServer,
    s3_server: servers.S3Server,
) -> Deps:
    pg_url = servers.create_database(postgres_server, f"transitions_{os.getpid()}")
    return Deps(
        postgres_url=pg_url,
        postgres_password=postgres_server.password,
        redis_url=f"redis://{redis_server.host}:{redis_server.port}/0",
        redis_password=redis_server.password,
        s3_endpoint=s3_server.endpoint,
        s3_bucket=s3_server.bucket,
        s3_region=s3_server.region,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )


@contextlib.contextmanager
def held_port(port: int) -> Iterator[None]:
    """Another process's listener, for the "port in use" case."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


def test_random_transitions_keep_the_data_and_converge(
    systemd_sandbox: SystemdSandbox, binary: Path, deps: Deps
) -> None:
    seed, plan = chosen_sequence()
    keep_going = os.environ.get(KEEP_GOING_ENV, "") not in ("", "0")
    ctx = Context(free_port_block(BLOCK), deps)
    host = Transitions(systemd_sandbox, copy_binary(systemd_sandbox, binary), ctx)
    replay = (
        f"replay: {SEED_ENV}={seed} {STEPS_ENV}={len(plan)} or "
        f"{CASES_ENV}={','.join(str(CASES.index(c)) for c in plan[1:])}"
    )
    failures: list[str] = []
    start = time.monotonic()
    with held_port(ctx.at(HELD)):
        out, _ = host.install(BOOTSTRAP)
        assert out.returncode == 0, out.stdout + out.stderr
        host.settle()
        host.plant_canary()
        host.steps.append(Step(0, BOOTSTRAP, 0, 0))
        for index, case in enumerate(plan[1:], start=1):
            try:
                host.step(index, case)
            except AssertionError as exc:
                host.steps[-1].failure = str(exc)
                done = "\n".join(s.line() for s in host.steps)
                message = f"step {index} ({case.name}): {exc}\n{replay}\nsteps so far:\n{done}"
                if not keep_going:
                    raise AssertionError(message) from exc
                failures.append(f"step {index} ({case.name}): {str(exc)[:2000]}")
    total = time.monotonic() - start
    print(f"\n{len(plan)} steps in {total:.0f}s (seed {seed})")
    print("\n".join(s.line() for s in host.steps))
    refused = [s.seconds for s in host.steps if s.expected != 0 and s.code == s.expected]
    if refused:
        print(f"refusals: {len(refused)}, slowest {max(refused):.2f}s")
    for slow in (s for s in host.steps if s.said):
        print(f"step {slow.index} took {slow.seconds:.0f}s:\n{slow.said}")
    assert failures == [], "\n\n".join([*failures, replay])
