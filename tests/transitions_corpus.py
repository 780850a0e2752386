"""Site configurations, valid and invalid, for the transition test of one installed host.

Each case is a whole site file (what `install --config` gets): the shared part, `base()`,
with the case's own keys merged over it. Ports come from one block of free loopback ports,
so a case names offsets into it rather than numbers. A case either converges the host
(`accepted`) or is refused with a documented exit code before it changes anything.

The first install of the sequence leaves local PostgreSQL and Redis data on the host, and no
install removes it. So a config that makes either external is refused unless it passes
RETIRE_FLAG, which stops the local server and keeps its data; a later local config adopts
that data again.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stellarbase.errors import ExitCode

ACCEPTED = ExitCode.OK

# Offsets into the port block. The services' own ports, then moved ones, then what the
# test keeps busy or dead on purpose.
API, AGENT, WORKER = 0, 1, 2  # workers take WORKER..WORKER+2
LOCAL_PG, LOCAL_REDIS = 6, 7
MOVED_API, MOVED_AGENT, MOVED_WORKER = 10, 11, 12  # workers up to +14
MOVED_PG, MOVED_REDIS = 16, 17
HELD = 20  # a listener the test holds for the whole run: "port in use"
REMOTE = 22  # the agent's token listener
DEAD = 21  # nothing ever listens here: an unreachable endpoint
BLOCK = 24

FILE_REPO = "/var/lib/stellarbase-backups"
KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # backup.encryption_key: 32 bytes
# Flag of `install` that lets a dependency go from local to external while the local
# server's data stays on the host (the server is stopped, its data kept).
RETIRE_FLAG = "--retire-local"


@dataclass(frozen=True)
class Deps:
    """Where the test's real servers are, for the cases that use them by URL."""

    postgres_url: str
    postgres_password: str
    redis_url: str
    redis_password: str
    s3_endpoint: str
    s3_bucket: str
    s3_region: str
    s3_access_key: str
    s3_secret_key: str


@dataclass(frozen=True)
class Context:
    port: int  # first port of the block
    deps: Deps

    def at(self, offset: int) -> int:
        return self.port + offset

    def external_postgres(self) -> dict[str, Any]:
        return {"url": self.deps.postgres_url, "password": self.deps.postgres_password}

    def external_redis(self) -> dict[str, Any]:
        return {"url": self.deps.redis_url, "password": self.deps.redis_password}

    def s3(self, **over: Any) -> dict[str, Any]:
        d = self.deps
        return {
            "endpoint": d.s3_endpoint,
            "bucket": d.s3_bucket,
            "region": d.s3_region,
            "access_key": d.s3_access_key,
            "secret_key": d.s3_secret_key,
            **over,
        }


def base(ctx: Context) -> dict[str, Any]:
    """What every case shares: the pilot on the block's ports, with short health deadlines
    (they bound a failing step, not a passing one) and host sizes any CI runner meets."""
    return {
        "tier": "pilot",
        "api": {"port": ctx.at(API)},
        "agent": {"port": ctx.at(AGENT), "interval_seconds": 2},
        "worker": {"port": ctx.at(WORKER), "instances": 1},
        "local": {"postgres": {"port": ctx.at(LOCAL_PG)}, "redis": {"port": ctx.at(LOCAL_REDIS)}},
        "health": {"timeout_seconds": 45, "check_timeout_seconds": 2},
        "requirements": {"min_cpus": 1, "min_memory_gib": 1, "min_disk_gib": 1},
    }


def merge(into: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(into)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


Build = Callable[[Context], dict[str, Any]]


@dataclass(frozen=True)
class Case:
    name: str
    build: Build  # the case's keys, merged over base()
    outcome: ExitCode
    external: frozenset[str] = frozenset()  # dependencies the config makes external
    retire: bool = False  # passes RETIRE_FLAG
    needle: str = ""  # a refusal's message names this (the key at fault, say)
    raw: str | None = None  # a site file given verbatim instead of build()

    def site(self, ctx: Context) -> dict[str, Any]:
        return merge(base(ctx), self.build(ctx))

    def args(self) -> list[str]:
        return [RETIRE_FLAG] if self.retire else []

    def local(self) -> frozenset[str]:
        """The dependencies that run locally once this case is installed."""
        return frozenset({"postgres", "redis"}) - self.external


def _c(over: dict[str, Any]) -> Build:
    return lambda ctx: over


BAD_SCHEDULE = "every tuesday-ish"

CASES: tuple[Case, ...] = (
    # --- accepted: the pilot and its variations -------------------------------------------
    Case("pilot local defaults", _c({}), ACCEPTED),
    Case("pilot, 2 workers", _c({"worker": {"instances": 2}}), ACCEPTED),
    Case("pilot, 3 workers", _c({"worker": {"instances": 3}}), ACCEPTED),
    Case(
        "pilot, services on other ports",
        lambda ctx: {
            "api": {"port": ctx.at(MOVED_API)},
            "agent": {"port": ctx.at(MOVED_AGENT)},
            "worker": {"port": ctx.at(MOVED_WORKER)},
        },
        ACCEPTED,
    ),
    Case(
        "pilot, other ports and 3 workers",
        lambda ctx: {
            "api": {"port": ctx.at(MOVED_API)},
            "agent": {"port": ctx.at(MOVED_AGENT)},
            "worker": {"port": ctx.at(MOVED_WORKER), "instances": 3},
        },
        ACCEPTED,
    ),
    Case(
        "pilot, local servers on other ports",
        lambda ctx: {
            "local": {
                "postgres": {"port": ctx.at(MOVED_PG)},
                "redis": {"port": ctx.at(MOVED_REDIS)},
            }
        },
        ACCEPTED,
    ),
    Case(
        "pilot, other limits and log level",
        _c(
            {
                "log_level": "debug",
                "api": {"limits": {"memory_max": "768M", "cpu_quota": "150%", "tasks_max": 512}},
                "worker": {"limits": {"memory_max": "1G"}},
            }
        ),
        ACCEPTED,
    ),
    Case(
        "pilot, backups to a file:// repository",
        _c({"backup": {"repository": f"file://{FILE_REPO}", "archive_timeout_seconds": 60}}),
        ACCEPTED,
    ),
    Case(
        "pilot, file:// backups hourly with 2 workers",
        _c(
            {
                "worker": {"instances": 2},
                "backup": {
                    "repository": f"file://{FILE_REPO}",
                    "schedule": "*-*-* *:30:00",
                    "archive_timeout_seconds": 120,
                    "retention_full": 3,
                },
            }
        ),
        ACCEPTED,
    ),
    Case(
        "pilot, backups to S3",
        lambda ctx: {
            "s3": ctx.s3(),
            "backup": {"repository": "s3", "prefix": "transitions", "schedule": "weekly"},
        },
        ACCEPTED,
    ),
    Case("pilot, S3 configured, backups off", lambda ctx: {"s3": ctx.s3()}, ACCEPTED),
    # Secrets only the agent gets (its own credentials file): from and to this case only
    # the agent's inputs change among the services.
    Case(
        "pilot, encrypted S3 backups and the agent's token listener",
        lambda ctx: {
            "s3": ctx.s3(),
            "backup": {"repository": "s3", "prefix": "transitions-keyed", "encryption_key": KEY},
            "agent": {
                "remote_port": ctx.at(REMOTE),
                "remote_bind": "127.0.0.1",
                "metrics_token": "transitions-token-1c5e",
            },
        },
        ACCEPTED,
    ),
    # --- dependencies by URL: refused over local data unless the local server is retired ----
    Case(
        "pilot, external Redis, local Redis retired",
        lambda ctx: {"dependencies": {"redis": "external"}, "redis": ctx.external_redis()},
        ACCEPTED,
        external=frozenset({"redis"}),
        retire=True,
    ),
    Case(
        "pilot, external PostgreSQL and Redis, local ones retired",
        lambda ctx: {
            "dependencies": {"mode": "external"},
            "postgres": ctx.external_postgres(),
            "redis": ctx.external_redis(),
            "s3": ctx.s3(),
        },
        ACCEPTED,
        external=frozenset({"postgres", "redis"}),
        retire=True,
    ),
    Case(
        "department, external dependencies, local ones retired",
        lambda ctx: {
            "tier": "department",
            "dependencies": {"mode": "external"},
            "postgres": ctx.external_postgres(),
            "redis": ctx.external_redis(),
            "s3": ctx.s3(),
            "health": {"timeout_seconds": 45},
            "requirements": {"redis_persistence": False},
        },
        ACCEPTED,
        external=frozenset({"postgres", "redis"}),
        retire=True,
    ),
    # --- refused: local data would be left behind unasked ----------------------------------
    Case(
        "pilot, external Redis over local Redis data",
        lambda ctx: {"dependencies": {"redis": "external"}, "redis": ctx.external_redis()},
        ExitCode.CONFIG,
        needle=RETIRE_FLAG,
    ),
    Case(
        "pilot, external PostgreSQL and Redis over local data",
        lambda ctx: {
            "dependencies": {"mode": "external"},
            "postgres": ctx.external_postgres(),
            "redis": ctx.external_redis(),
        },
        ExitCode.CONFIG,
        needle=RETIRE_FLAG,
    ),
    Case(
        "department, external dependencies over local data",
        lambda ctx: {
            "tier": "department",
            "dependencies": {"mode": "external"},
            "postgres": ctx.external_postgres(),
            "redis": ctx.external_redis(),
            "s3": ctx.s3(),
            "requirements": {"redis_persistence": False},
        },
        ExitCode.CONFIG,
        needle=RETIRE_FLAG,
    ),
    # --- refused by preflight: the host or a dependency cannot take it ---------------------
    Case(
        "api port held by another process",
        lambda ctx: {"api": {"port": ctx.at(HELD)}},
        ExitCode.HOST,
        needle="in use",
    ),
    Case(
        "S3 endpoint that nothing answers",
        lambda ctx: {
            "s3": ctx.s3(endpoint=f"http://127.0.0.1:{ctx.at(DEAD)}"),
            "backup": {"repository": "s3"},
        },
        ExitCode.DEPENDENCY,
        needle="s3",
    ),
    Case(
        "S3 bucket that does not exist",
        lambda ctx: {"s3": ctx.s3(bucket="no-such-bucket"), "backup": {"repository": "s3"}},
        ExitCode.DEPENDENCY,
        needle="s3",
    ),
    # --- refused: invalid values of every type ---------------------------------------------
    Case("port 0", _c({"api": {"port": 0}}), ExitCode.CONFIG, needle="api.port"),
    Case("port 70000", _c({"agent": {"port": 70000}}), ExitCode.CONFIG, needle="agent.port"),
    Case("port as a word", _c({"api": {"port": "http"}}), ExitCode.CONFIG, needle="api.port"),
    Case(
        "privileged port for an unprivileged service",
        _c({"api": {"port": 80}}),
        ExitCode.CONFIG,
        needle="privileged",
    ),
    Case(
        "api port equals agent port",
        lambda ctx: {"agent": {"port": ctx.at(API)}},
        ExitCode.CONFIG,
        needle="same port",
    ),
    Case(
        "worker range over the local PostgreSQL port",
        lambda ctx: {"worker": {"port": ctx.at(LOCAL_PG) - 1, "instances": 2}},
        ExitCode.CONFIG,
        needle="local.postgres.port",
    ),
    Case(
        "local Redis on the local PostgreSQL port",
        lambda ctx: {"local": {"redis": {"port": ctx.at(LOCAL_PG)}}},
        ExitCode.CONFIG,
        needle="same port",
    ),
    Case(
        "negative worker count",
        _c({"worker": {"instances": -1}}),
        ExitCode.CONFIG,
        needle="worker.instances",
    ),
    Case(
        "zero workers", _c({"worker": {"instances": 0}}), ExitCode.CONFIG, needle="worker.instances"
    ),
    Case(
        "memory_max not a size",
        _c({"api": {"limits": {"memory_max": "lots"}}}),
        ExitCode.CONFIG,
        needle="memory_max",
    ),
    Case(
        "memory_max too small for a service to start",
        _c({"worker": {"limits": {"memory_max": "1M"}}}),
        ExitCode.CONFIG,
        needle="memory_max",
    ),
    Case(
        "cpu_quota of 0%",
        _c({"api": {"limits": {"cpu_quota": "0%"}}}),
        ExitCode.CONFIG,
        needle="cpu_quota",
    ),
    Case(
        "cpu_quota without a percent sign",
        _c({"worker": {"limits": {"cpu_quota": "150"}}}),
        ExitCode.CONFIG,
        needle="cpu_quota",
    ),
    Case(
        "tasks_max too small",
        _c({"agent": {"limits": {"tasks_max": 3}}}),
        ExitCode.CONFIG,
        needle="tasks_max",
    ),
    Case(
        "backup schedule systemd cannot read",
        _c({"backup": {"repository": f"file://{FILE_REPO}", "schedule": BAD_SCHEDULE}}),
        ExitCode.CONFIG,
        needle="schedule",
    ),
    Case(
        "inference command with a line break",
        _c(
            {
                "inference": {
                    "command": "/opt/stellarbase/current/stellarbase run inference\n"
                    "ExecStartPre=/bin/touch /run/injected"
                }
            }
        ),
        ExitCode.CONFIG,
        needle="inference.command",
    ),
    Case(
        "inference command with a control character",
        _c({"inference": {"command": "/opt/stellarbase/current/stellarbase run\x1binference"}}),
        ExitCode.CONFIG,
        needle="inference.command",
    ),
    Case(
        "file:// repository with a relative path",
        _c({"backup": {"repository": "file://backups/here"}}),
        ExitCode.CONFIG,
        needle="backup.repository",
    ),
    Case(
        "file:// repository in the services' private /tmp",
        _c({"backup": {"repository": "file:///tmp/stellarbase-backups"}}),
        ExitCode.CONFIG,
        needle="backup.repository",
    ),
    Case(
        "file:// repository inside /var/lib/stellarbase",
        _c({"backup": {"repository": "file:///var/lib/stellarbase/backups"}}),
        ExitCode.CONFIG,
        needle="backup.repository",
    ),
    Case(
        "file:// repository on the department tier",
        lambda ctx: {
            "tier": "department",
            "dependencies": {"mode": "local"},
            "backup": {"repository": f"file://{FILE_REPO}"},
        },
        ExitCode.CONFIG,
        needle="file://",
    ),
    Case(
        "backups to s3 without an s3 section",
        _c({"backup": {"repository": "s3"}}),
        ExitCode.CONFIG,
        needle="s3",
    ),
    Case(
        "backups of an external PostgreSQL",
        lambda ctx: {
            "dependencies": {"postgres": "external"},
            "postgres": ctx.external_postgres(),
            "backup": {"repository": f"file://{FILE_REPO}"},
        },
        ExitCode.CONFIG,
        needle="backup",
    ),
    Case(
        "compression level out of range",
        _c({"backup": {"compression_level": 99}}),
        ExitCode.CONFIG,
        needle="compression_level",
    ),
    Case(
        "encryption key that is not base64 of 32 bytes",
        _c({"backup": {"repository": f"file://{FILE_REPO}", "encryption_key": "hunter2"}}),
        ExitCode.CONFIG,
        needle="encryption_key",
    ),
    Case("unknown key", _c({"api": {"prot": 8080}}), ExitCode.CONFIG, needle="api.prot"),
    Case("unknown section", _c({"cache": {"size": 1}}), ExitCode.CONFIG, needle="cache"),
    Case("bad tier name", _c({"tier": "galactic"}), ExitCode.CONFIG, needle="galactic"),
    Case(
        "log level that does not exist",
        _c({"log_level": "verbose"}),
        ExitCode.CONFIG,
        needle="log_level",
    ),
    Case(
        "bind address that is no address", _c({"bind": "999.1.1.1"}), ExitCode.CONFIG, needle="bind"
    ),
    Case(
        "negative health timeout",
        _c({"health": {"timeout_seconds": -5}}),
        ExitCode.CONFIG,
        needle="health.timeout_seconds",
    ),
    Case(
        "external dependencies without a URL",
        _c({"dependencies": {"mode": "external"}}),
        ExitCode.CONFIG,
        needle="postgres",
    ),
    Case(
        "external Redis without a URL",
        _c({"dependencies": {"redis": "external"}}),
        ExitCode.CONFIG,
        needle="redis",
    ),
    Case(
        "PostgreSQL URL of another scheme",
        lambda ctx: {
            "dependencies": {"postgres": "external"},
            "postgres": {"url": "mysql://sb@127.0.0.1:3306/sb", "password": "x"},
        },
        ExitCode.CONFIG,
        needle="postgresql://",
    ),
    Case(
        "password in the PostgreSQL URL",
        lambda ctx: {
            "dependencies": {"postgres": "external"},
            "postgres": {"url": "postgresql://sb:secret@127.0.0.1:5432/sb"},
        },
        ExitCode.CONFIG,
        needle="password",
    ),
    Case(
        "Redis URL while Redis is local",
        lambda ctx: {"redis": ctx.external_redis()},
        ExitCode.CONFIG,
        needle="redis",
    ),
    Case(
        "S3 endpoint of another scheme",
        lambda ctx: {"s3": ctx.s3(endpoint="ftp://127.0.0.1:21")},
        ExitCode.CONFIG,
        needle="s3",
    ),
    Case(
        "remote agent port without a token",
        lambda ctx: {"agent": {"remote_port": ctx.at(DEAD)}},
        ExitCode.CONFIG,
        needle="metrics_token",
    ),
    Case("not YAML", _c({}), ExitCode.CONFIG, needle="YAML", raw="api: [1,\n"),
)

BOOTSTRAP = CASES[0]


def sequence(seed: int, steps: int) -> list[Case]:
    """The bootstrap pilot, then whole shuffles of the corpus: every case is met once
    before any comes again, so a run one longer than the corpus covers all of it."""
    rng = random.Random(seed)
    out = [BOOTSTRAP]
    while len(out) < steps:
        batch = list(CASES)
        rng.shuffle(batch)
        out.extend(batch)
    return out[:steps]


__all__ = ["BOOTSTRAP", "CASES", "Case", "Context", "Deps", "base", "merge", "sequence"]
