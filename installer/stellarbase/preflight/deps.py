"""Preflight of the external dependencies: PostgreSQL, Redis and S3.

One `Check` per configured dependency (a local one, which the installer runs itself, is not
configured and gets none). Each walks its server from "answers at all" to the settings
StellarBase relies on and stops at the first finding that makes the rest moot. Every
network call is bounded by the check timeout, so a server that hangs costs one timeout
and leaves no thread waiting on it for long.
"""

from __future__ import annotations

import contextlib
import email.utils
import secrets
import socket
import ssl
import struct
import time
from collections.abc import Callable
from functools import partial
from urllib.parse import urlsplit

from stellarbase import netio, pgwire, resp, s3probe
from stellarbase.config import Config, PostgresConfig, RedisConfig, S3Config, secret_env_name
from stellarbase.errors import one_line
from stellarbase.preflight import Check, Context, Finding, Level, failed, noted, passed

PG_MIN_MAJOR = 14
REDIS_MIN_MAJOR = 7
SKEW_WARN_S = 30.0
SKEW_FAIL_S = 300.0
PROBE_PREFIX = "stellarbase-preflight/"
# GSSENCRequest rather than SSLRequest: a server that offers TLS logs "could not accept SSL
# connection: EOF detected" when the client hangs up after "S"; after "N" it logs nothing.
_GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)
_SYNC_NTP = "sync the host clock: `timedatectl set-ntp true`, then check `chronyc tracking`"


def checks(ctx: Context) -> list[Check]:
    config = ctx.config
    timeout = config.health.check_timeout_seconds
    found: list[Check] = []
    if config.postgres is not None:
        pg = config.postgres
        host, port = _host_and_port(pg.url, 5432)
        hint = f"is PostgreSQL at {host}:{port} up and not overloaded? "
        hint += f"`pg_isready -h {host} -p {port}`"
        found.append(
            Check("postgres", partial(postgres_findings, pg, config, timeout), timeout, hint)
        )
    if config.redis is not None:
        rd = config.redis
        host, port = _host_and_port(rd.url, 6379)
        hint = f"is Redis at {host}:{port} up and not overloaded? "
        hint += f"`redis-cli -h {host} -p {port} ping`"
        found.append(Check("redis", partial(redis_findings, rd, config, timeout), timeout, hint))
    if config.s3 is not None:
        s3 = config.s3
        hint = f"is S3 at {s3.endpoint or 'AWS'} up, and no proxy or firewall swallowing requests?"
        found.append(Check("s3", partial(s3_findings, s3, config, timeout), timeout, hint))
    return found


# --- PostgreSQL ---------------------------------------------------------------------------


def postgres_findings(dep: PostgresConfig, config: Config, timeout: float) -> list[Finding]:
    budget = _budget(timeout)
    deadline = time.monotonic() + budget
    host, port = _host_and_port(dep.url, 5432)
    user = urlsplit(dep.url).username or "(default user)"
    reach = f"PostgreSQL answers at {host}:{port}"
    try:
        _pg_handshake(host, port, deadline)
    except (OSError, ValueError) as exc:
        hint = f"start PostgreSQL or fix postgres.url; `pg_isready -h {host} -p {port}`"
        return [failed("postgres.reachable", f"{host}:{port}: {_why(exc, budget)}", reach, hint)]
    found = [passed("postgres.reachable", f"{host}:{port}", reach)]
    # The same client, and the same login rules, as the services' and the agent's /readyz.
    target = pgwire.parse_url(dep.url, dep.password.get_secret_value() if dep.password else None)
    try:
        conn = pgwire.connect(target, deadline)
    except (OSError, pgwire.ServerError) as exc:
        return [*found, _pg_connect_failure(exc, target, budget)]
    found.append(passed("postgres.auth", f"as {user}", "the configured password is accepted"))
    with conn:
        # The version comes from the startup ParameterStatus: no query before it is known.
        num = conn.server_version_num
        shown = f"{conn.server_version} (server_version_num {num})"
        upgrade = f"upgrade to PostgreSQL {PG_MIN_MAJOR}+ (pg_upgrade, or the provider's upgrade)"
        ok = num >= PG_MIN_MAJOR * 10000
        found.append(_verdict("postgres.version", ok, shown, f"≥ {PG_MIN_MAJOR}", upgrade))
        if not ok:
            return found
        try:
            _pg_settings(conn, target, config, user, num // 10000, found)
        except (OSError, pgwire.ServerError) as exc:
            found.append(
                failed(
                    "postgres.query",
                    _why(exc, budget),
                    "answers the preflight queries within the check timeout",
                    "see the server log around this time; the server may be overloaded",
                )
            )
    return found


def _pg_handshake(host: str, port: int, deadline: float) -> None:
    """Prove a PostgreSQL server (not just an open port) answers, before the deadline."""
    with netio.connect(host, port, deadline) as sock:
        sock.sendall(_GSSENC_REQUEST)
        answer = sock.recv(1)
    if not answer:
        raise ConnectionError("the server closed the connection without answering")
    # "E": a server older than 12 that does not know the request; still PostgreSQL.
    if answer not in (b"N", b"G", b"E"):
        raise ValueError(f"the server answered {answer!r}, not as PostgreSQL does")


def _pg_connect_failure(
    exc: OSError | pgwire.ServerError, target: pgwire.Target, budget: float
) -> Finding:
    user, db = target.user, target.database
    auth_need = "the configured password is accepted"
    if isinstance(exc, pgwire.AuthenticationError):
        return failed("postgres.auth", _why(exc, budget), auth_need, exc.hint)
    if isinstance(exc, pgwire.ServerError):
        text, code = _why(exc, budget), exc.sqlstate
        if code == "3D000":  # invalid_catalog_name
            hint = f'CREATE DATABASE "{db}" OWNER "{user}"; or fix the database in postgres.url'
            return failed("postgres.database", text, f"database {db} exists", hint)
        if code.startswith("28"):  # invalid_authorization_specification, invalid_password
            hint = (
                f"set the password of {user} in {secret_env_name('postgres', 'password')} "
                "(or postgres.password in the site file), and check the server's pg_hba.conf"
            )
            return failed("postgres.auth", text, auth_need, hint)
        hint = "check the server log; the server may be overloaded or out of connections"
        return failed("postgres.reachable", text, "completes the PostgreSQL startup", hint)
    if isinstance(exc, ssl.SSLError) or "sslmode" in str(exc):
        hint = "enable ssl = on on the server, or fix sslmode and sslrootcert in postgres.url"
        return failed("postgres.tls", _why(exc, budget), "sslmode of postgres.url works", hint)
    hint = "check the server log; the server may be overloaded or out of connections"
    return failed("postgres.reachable", _why(exc, budget), "completes the PostgreSQL startup", hint)


_PG_SETTINGS = """
    SELECT current_database(),
           current_setting('max_connections')::int,
           current_setting('wal_level'),
           (SELECT default_version FROM pg_available_extensions WHERE name = 'vector'),
           (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()),
           (SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid())
"""


def _pg_settings(
    conn: pgwire.Connection,
    target: pgwire.Target,
    config: Config,
    user: str,
    major: int,
    found: list[Finding],
) -> None:
    (row,) = conn.simple_query(_PG_SETTINGS)  # a SELECT without FROM returns one row
    db, max_connections, wal_level, vector, ssl_used, tls_version = row
    found.append(_pg_create(conn, db or "?", user, config.health.check_timeout_seconds))
    found.append(
        _verdict(
            "postgres.vector",
            bool(vector),
            f"available ({vector})" if vector else "not available: semantic search stays off",
            "pgvector available",
            f"install pgvector on the server (Debian: apt install postgresql-{major}-pgvector"
            "; managed services: allow the 'vector' extension)",
            miss=Level.WARN,
        )
    )
    found.append(
        _verdict(
            "postgres.wal_level",
            wal_level in ("replica", "logical"),
            wal_level or "?",
            "replica or logical (WAL archiving for backups)",
            "ALTER SYSTEM SET wal_level = replica; then restart PostgreSQL",
            miss=Level.WARN,
        )
    )
    if config.requirements.tls:
        found.append(_pg_tls(target, ssl_used == "t", tls_version))
    req, workers = config.requirements, config.worker.instances
    need = (1 + workers) * req.pool_size + req.connection_headroom
    have = int(max_connections or 0)
    found.append(
        _verdict(
            "postgres.connections",
            need <= have,
            f"needs {need} = (1 api + {workers} worker{'s' if workers != 1 else ''})"
            f" × {req.pool_size} + {req.connection_headroom} headroom;"  # noqa: RUF001 -- a product
            f" max_connections is {have}",
            "needed ≤ max_connections",
            f"raise max_connections to at least {need} (ALTER SYSTEM SET max_connections ="
            f" {need}; then restart) or lower requirements.pool_size or worker.instances",
        )
    )


def _pg_tls(target: pgwire.Target, used: bool, version: str | None) -> Finding:
    """requirements.tls: TLS that proves the server, i.e. sslmode=verify-full."""
    value = f"in use ({version}), sslmode={target.sslmode}" if used else "not in use"
    hint = (
        "add ?sslmode=verify-full&sslrootcert=/path/to/ca.pem (sslrootcert=system for a public"
        " CA) to postgres.url, and ssl = on on the server"
    )
    need = "TLS, certificate and host name verified (sslmode=verify-full)"
    return _verdict("postgres.tls", used and target.verified, value, need, hint)


def _pg_create(conn: pgwire.Connection, db: str, user: str, timeout: float) -> Finding:
    table = f'"stellarbase_preflight_{secrets.token_hex(4)}"'
    need = f"{user} may create tables in {db}"
    ms = max(1, int(timeout * 1000))
    conn.simple_query("BEGIN")
    try:
        conn.simple_query(f"SET LOCAL statement_timeout = {ms}; CREATE TABLE {table} (id int)")
    except pgwire.ServerError as exc:
        if exc.sqlstate == "25006":  # read_only_sql_transaction
            hint = "point postgres.url at the primary server, not a read-only replica"
            return failed("postgres.create", exc.message, need, hint)
        if exc.sqlstate == "42501":  # insufficient_privilege
            hint = f'GRANT CREATE ON SCHEMA public TO "{user}"; or ALTER DATABASE "{db}" OWNER TO '
            return failed("postgres.create", exc.message, need, hint + f'"{user}"')
        raise
    finally:
        conn.simple_query("ROLLBACK")
    return passed("postgres.create", f"CREATE TABLE in {db} as {user}", need)


# --- Redis --------------------------------------------------------------------------------


def redis_findings(dep: RedisConfig, config: Config, timeout: float) -> list[Finding]:
    budget = _budget(timeout)
    deadline = time.monotonic() + budget
    target = resp.parse_url(dep.url)
    where = f"{target.host}:{target.port}"
    hint = f"start Redis or fix redis.url; `redis-cli -h {target.host} -p {target.port} ping`"
    try:
        client = resp.connect(target, deadline)
    except OSError as exc:
        return [failed("redis.reachable", f"{where}: {_why(exc, budget)}", "answers", hint)]
    password = dep.password.get_secret_value() if dep.password else target.password
    found: list[Finding] = []
    with contextlib.closing(client):
        try:
            info = resp.hello(client, target, password)
        except resp.ReplyError as exc:
            if not _auth_refused(exc):
                return [failed("redis.reachable", f"{where}: {exc.message}", "answers", hint)]
            hint = (
                f"set the password in {secret_env_name('redis', 'password')} (or redis.password"
                " in the site file); it must match requirepass or the ACL user of redis.url"
            )
            found.append(passed("redis.reachable", where, "Redis answers"))
            found.append(failed("redis.auth", exc.message, "the password is accepted", hint))
            return found
        except OSError as exc:
            return [failed("redis.reachable", f"{where}: {_why(exc, budget)}", "answers", hint)]
        found.append(passed("redis.reachable", where, "Redis answers"))
        found.append(passed("redis.auth", "accepted", "the password is accepted"))
        try:
            _redis_steps(client, info, dep, config, found)
        except (resp.ReplyError, OSError) as exc:
            need = "answers the preflight commands within the check timeout"
            hint = "see the Redis log around this time; the server may be overloaded"
            found.append(failed("redis.query", _why(exc, budget), need, hint))
    return found


def _auth_refused(exc: resp.ReplyError) -> bool:
    if exc.code in ("WRONGPASS", "NOAUTH"):
        return True
    low = exc.message.lower()
    return exc.code == "ERR" and ("password" in low or "auth" in low)


def _redis_steps(
    client: resp.Connection,
    info: dict[str, str],
    dep: RedisConfig,
    config: Config,
    found: list[Finding],
) -> None:
    product, version = resp.server_version(info)
    # Valkey's numbers go on from Redis 7.2, where it forked: one minimum serves both.
    ok, upgrade = _major(version) >= REDIS_MIN_MAJOR, f"upgrade to Redis {REDIS_MIN_MAJOR}+"
    shown = f"{product} {version}"
    found.append(_verdict("redis.version", ok, shown, f"≥ {REDIS_MIN_MAJOR}", upgrade))
    if not ok:
        return
    policy, aof, save = _redis_settings(client)
    found.append(
        _verdict(
            "redis.maxmemory_policy",
            policy == "noeviction",
            policy,
            "noeviction (queues must not lose keys under memory pressure)",
            "CONFIG SET maxmemory-policy noeviction (and in redis.conf, or the provider's "
            "parameter group)",
        )
    )
    found.append(_redis_persistence(config, aof, save))
    if config.requirements.tls:
        found.append(_redis_tls(dep))


def _redis_tls(dep: RedisConfig) -> Finding:
    """requirements.tls: rediss:// with the server's certificate verified."""
    scheme, target = urlsplit(dep.url).scheme, resp.parse_url(dep.url)
    ok = target.tls and target.verify
    value = f"{scheme}://" + ("" if target.verify or not target.tls else ", ssl_cert_reqs=none")
    hint = "use a rediss:// URL in redis.url, pointing at the server's tls-port"
    if target.tls and not target.verify:
        hint = "drop ssl_cert_reqs=none from redis.url; give ssl_ca_certs=/path/to/ca.pem instead"
    return _verdict("redis.tls", ok, value, "rediss://, certificate verified", hint)


def _redis_settings(client: resp.Connection) -> tuple[str, bool, str | None]:
    """maxmemory-policy, AOF on, RDB save schedule (None: unknown, CONFIG is disabled)."""
    try:
        got = resp.as_pairs(
            client.command("CONFIG", "GET", "maxmemory-policy", "appendonly", "save")
        )
        return got.get("maxmemory-policy", "?"), got.get("appendonly") == "yes", got.get("save")
    except resp.ReplyError:
        pass  # managed Redis often renames or denies CONFIG; INFO still says most of it
    info = resp.parse_info(client.command("INFO", "memory", "persistence"))
    return info.get("maxmemory_policy", "?"), info.get("aof_enabled") == "1", None


def _redis_persistence(config: Config, aof: bool, save: str | None) -> Finding:
    name, need = "redis.persistence", "AOF or RDB snapshots"
    if aof or save:
        return passed(name, "appendonly yes" if aof else f'RDB save "{save}"', need)
    if not config.requirements.redis_persistence:
        return noted(name, "off (not required on this tier)")
    if save is None:
        hint = "make sure the provider keeps snapshots or AOF for this Redis"
        value = "appendonly no; RDB schedule unknown (CONFIG is disabled)"
        return Finding(name, Level.WARN, value, need, hint)
    hint = "CONFIG SET appendonly yes (and appendonly yes in redis.conf, or the provider's setting)"
    return failed(name, 'appendonly no, save ""', need, hint)


# --- S3 -----------------------------------------------------------------------------------

# What each S3 step after the first needs, and the permissions that give it.
_S3_STEPS = {
    "bucket": ("exists", "s3:CreateBucket and s3:PutBucketVersioning"),
    "probe": ("put, read back and delete an object", "s3:PutObject, s3:GetObject, s3:DeleteObject"),
    "versioning": ("Enabled", "s3:GetBucketVersioning"),
}
_S3_CREDENTIAL_CODES = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
)


def s3_findings(dep: S3Config, config: Config, timeout: float) -> list[Finding]:
    budget = _budget(timeout)
    deadline = time.monotonic() + budget
    client = s3probe.client_for(dep, deadline)
    if client is None:
        keys = f"{secret_env_name('s3', 'access_key')} and {secret_env_name('s3', 'secret_key')}"
        need = "an access key, or an instance role on AWS"
        return [failed("s3.credentials", "no credentials found", need, f"export {keys}")]
    with contextlib.closing(client):
        return _s3_steps(client, dep, config, budget)


def _s3_steps(
    client: s3probe.Client, dep: S3Config, config: Config, budget: float
) -> list[Finding]:
    where = dep.endpoint or f"AWS S3 ({dep.region})"
    sent = time.time()
    try:
        response = client.list_objects(PROBE_PREFIX)
    except s3probe.S3Error as exc:
        response = exc.response
    except OSError as exc:
        return [_s3_unreachable(dep, where, exc, budget)]
    code = response.code
    skew = _clock_skew(response.headers.get("date"), sent, time.time())
    if code not in ("", "NoSuchBucket", "RequestTimeTooSkewed", *_S3_CREDENTIAL_CODES):
        return [_s3_refused(dep, where, response)]
    found = [passed("s3.reachable", where, "S3 answers")]
    if code == "RequestTimeTooSkewed":
        return [*found, failed("s3.clock", f"rejected: {code}", "≤ 300 s", _SYNC_NTP)]
    if code in _S3_CREDENTIAL_CODES:
        keys = f"{secret_env_name('s3', 'access_key')} and {secret_env_name('s3', 'secret_key')}"
        hint = f"set {keys} (or s3.access_key / s3.secret_key) to a key pair the service knows"
        return [*found, failed("s3.credentials", f"rejected: {code}", "valid access key", hint)]
    found.append(passed("s3.credentials", "accepted", "valid access key"))
    found.append(_s3_clock(skew))
    endpoint = f" --endpoint-url {dep.endpoint}" if dep.endpoint else ""
    if code == "NoSuchBucket" and not dep.create_bucket:
        hint = f"create it (aws s3api create-bucket --bucket {dep.bucket}{endpoint}) or set "
        hint += "s3.create_bucket=true to let preflight create it"
        return [*found, failed("s3.bucket", f"{dep.bucket} does not exist", "exists", hint)]
    steps: list[tuple[str, Callable[[], Finding]]] = [("probe", partial(_s3_probe, client))]
    if code == "NoSuchBucket":
        steps.insert(0, ("bucket", partial(_s3_create_bucket, client, dep, config)))
    else:
        found.append(passed("s3.bucket", dep.bucket, "exists"))
    if config.requirements.s3_versioning:
        steps.append(("versioning", partial(_s3_versioning, client, dep, endpoint)))
    for step, run in steps:
        try:
            found.append(run())
        except (s3probe.S3Error, OSError) as exc:
            found.append(_s3_step_failed(dep, step, exc, budget))
        if step == "bucket" and found[-1].level == Level.FAIL:
            return found
    if config.requirements.tls:
        https = dep.endpoint is None or dep.endpoint.startswith("https://")
        hint = "use an https:// URL in s3.endpoint"
        found.append(_verdict("s3.tls", https, "https" if https else "http", "https", hint))
    return found


def _s3_unreachable(dep: S3Config, where: str, exc: Exception, budget: float) -> Finding:
    curl = f"`curl -sI {dep.endpoint or 'https://s3.amazonaws.com'}` should answer"
    hint = f"start the S3 service or fix s3.endpoint; {curl}"
    return failed("s3.reachable", f"{where}: {_why(exc, budget)}", "S3 answers", hint)


def _s3_refused(dep: S3Config, where: str, response: s3probe.Response) -> Finding:
    status, code = response.status, response.code
    if code in ("AccessDenied", "AllAccessDisabled", "403"):
        hint = f"grant s3:ListBucket on arn:aws:s3:::{dep.bucket} and {_S3_STEPS['probe'][1]} "
        hint += f"on arn:aws:s3:::{dep.bucket}/*"
        value = f"access denied to {dep.bucket} (HTTP {status} {code})"
        return failed("s3.bucket", value, "list, read, write and delete in the bucket", hint)
    hint = "check s3.endpoint, s3.region and s3.addressing (path or virtual) for this service"
    return failed("s3.reachable", f"{where}: HTTP {status} {code}", "S3 answers", hint)


def _s3_step_failed(dep: S3Config, step: str, exc: Exception, budget: float) -> Finding:
    need, grant = _S3_STEPS[step]
    if not isinstance(exc, s3probe.S3Error):  # no answer, or no connection: not a permission
        hint = "check the S3 service's health and any proxy in between"
        return failed(f"s3.{step}", _why(exc, budget), need, hint)
    hint = f"grant {grant} on arn:aws:s3:::{dep.bucket} to this access key"
    return failed(f"s3.{step}", f"{step} failed: {exc.code}", need, hint)


def _s3_create_bucket(client: s3probe.Client, dep: S3Config, config: Config) -> Finding:
    client.create_bucket()
    if not config.requirements.s3_versioning:
        return passed("s3.bucket", f"created {dep.bucket}", "exists")
    # Made here, so made as required; the versioning step then confirms it.
    client.enable_versioning()
    return passed("s3.bucket", f"created {dep.bucket} with versioning", "exists")


def _s3_probe(client: s3probe.Client) -> Finding:
    key = f"{PROBE_PREFIX}{socket.gethostname()}-{secrets.token_hex(8)}"
    body = secrets.token_bytes(64)
    need = _S3_STEPS["probe"][0]
    version = client.put_object(key, body)
    got = client.get_object(key)
    # With versioning on, only deleting the version itself leaves nothing behind.
    client.delete_object(key, version)
    if got != body:
        value = f"read back {len(got)} bytes that differ from the {len(body)} written"
        hint = "something between here and the store alters objects: check proxies"
        return failed("s3.probe", value, need, hint)
    return passed("s3.probe", f"{len(body)} bytes under {PROBE_PREFIX}, byte-exact", need)


def _s3_versioning(client: s3probe.Client, dep: S3Config, endpoint: str) -> Finding:
    status = client.versioning() or "not enabled"
    hint = f"aws s3api put-bucket-versioning --bucket {dep.bucket} "
    hint += f"--versioning-configuration Status=Enabled{endpoint}"
    return _verdict("s3.versioning", status == "Enabled", status, "Enabled", hint)


def _clock_skew(date: str | None, sent: float, received: float) -> float | None:
    """Server clock minus ours, in seconds, from the Date header (None without one)."""
    if date is None:
        return None
    try:
        server = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None
    # The header has whole seconds: its middle against the middle of the round trip.
    return server + 0.5 - (sent + received) / 2


def _s3_clock(skew: float | None) -> Finding:
    if skew is None:
        return noted("s3.clock", "not measured: the server sent no Date header")
    value = f"{abs(skew):.0f} s, server {'ahead' if skew > 0 else 'behind'}"
    if abs(skew) < 1:  # below the Date header's resolution
        value = "under 1 s"
    if abs(skew) > SKEW_FAIL_S:
        return failed("s3.clock", value, f"≤ {SKEW_FAIL_S:.0f} s", _SYNC_NTP)
    level = Level.WARN if abs(skew) > SKEW_WARN_S else Level.PASS
    hint = _SYNC_NTP if level == Level.WARN else ""
    return Finding("s3.clock", level, value, f"≤ {SKEW_WARN_S:.0f} s", hint)


# --- shared -------------------------------------------------------------------------------


def _verdict(
    check: str, ok: bool, value: str, requirement: str, hint: str, miss: Level = Level.FAIL
) -> Finding:
    """A pass when ok, else a finding of level `miss` with the hint."""
    if ok:
        return passed(check, value, requirement)
    return Finding(check, miss, value, requirement, hint)


def _budget(timeout: float) -> float:
    """The time a check gives its own calls: a little under the framework's deadline, so a
    dead server is reported by the check itself, with its own hint."""
    return timeout - min(0.2, timeout / 10)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _why(exc: BaseException, budget: float) -> str:
    if isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower():
        return f"no answer within {budget:.3g}s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return one_line(exc)


def _host_and_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "localhost", parts.port or default_port


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0
