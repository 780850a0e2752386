"""The small protocol clients (pgwire, resp, s3probe) against hostile servers.

A reply that drips in one byte at a time, a length that promises gigabytes, nesting or
rows without end: each client answers within its deadline plus 0.2 s, allocates a few
megabytes at most, and fails with an OSError, which is what its callers (preflight, the
readiness checks, the agent's collectors) catch.
"""

from __future__ import annotations

import base64
import socket
import ssl
import struct
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from stellarbase import pgwire, resp, s3probe
from tests.hostile import PG_READY, Hostile, drip, flood, pg_msg, pg_startup, self_signed

DEADLINE = 1.0
SLACK = 0.2  # what the acceptance allows past the deadline
PEAK = 8 * 1024 * 1024  # bytes a client may hold at once while reading one hostile reply
GIB = 1024**3


@dataclass
class Outcome:
    error: BaseException | None
    seconds: float
    peak: int


def measure(call: Callable[[float], object]) -> Outcome:
    """Run call(deadline) with a DEADLINE from now; its error, duration and peak memory."""
    tracemalloc.start()
    start = time.monotonic()
    error: BaseException | None = None
    try:
        call(start + DEADLINE)
    except Exception as exc:
        error = exc
    seconds = time.monotonic() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return Outcome(error, seconds, peak)


def assert_bounded(outcome: Outcome, error: type[BaseException] = OSError) -> None:
    assert isinstance(outcome.error, error), repr(outcome.error)
    assert outcome.seconds <= DEADLINE + SLACK, f"took {outcome.seconds:.2f}s"
    assert outcome.peak < PEAK, f"peak allocation {outcome.peak / 2**20:.0f} MiB"


# --- Redis ------------------------------------------------------------------------------------


def redis_replies(reply: Callable[[socket.socket], None]) -> Hostile:
    def script(conn: socket.socket) -> None:
        conn.recv(65536)  # the command
        reply(conn)

    return Hostile(script)


def redis_call(server: Hostile) -> Callable[[float], object]:
    def call(deadline: float) -> object:
        conn = resp.connect(resp.parse_url(f"redis://127.0.0.1:{server.port}/0"), deadline)
        try:
            return conn.command("INFO", "server")
        finally:
            conn.close()

    return call


REDIS_HOSTILE = {
    # A status line that never ends, a byte every 50 ms: each recv is quick, the reply is not.
    "drip": lambda conn: drip(conn, b"+" + b"a" * 100),
    # A bulk string of 1 GB announced: nothing may be allocated for it.
    "huge bulk": lambda conn: conn.sendall(b"$%d\r\n" % GIB),
    # An array of a billion elements, then as many as the client will take.
    "huge array": lambda conn: (conn.sendall(b"*%d\r\n" % GIB), flood(conn, b":1\r\n", 2**26)),
    # 5000 nested arrays: no RecursionError, which no caller catches.
    "deep nesting": lambda conn: conn.sendall(b"*1\r\n" * 5000 + b":1\r\n"),
}


@pytest.mark.parametrize("case", REDIS_HOSTILE)
def test_redis_replies_are_bounded(case: str) -> None:
    with redis_replies(REDIS_HOSTILE[case]) as server:
        outcome = measure(redis_call(server))
    assert_bounded(outcome)
    if case != "drip":
        assert isinstance(outcome.error, resp.ProtocolError)


# --- PostgreSQL -------------------------------------------------------------------------------


def pg_server(after_startup: Callable[[socket.socket], None]) -> Hostile:
    def script(conn: socket.socket) -> None:
        pg_startup(conn)
        after_startup(conn)

    return Hostile(script)


def pg_call(server: Hostile, query: str | None = None, **target: str) -> Callable[[float], object]:
    def call(deadline: float) -> object:
        t = pgwire.Target("127.0.0.1", server.port, "app", "app", "secret-pw", **target)
        with pgwire.connect(t, deadline) as conn:
            return conn.simple_query(query) if query else conn.server_version

    return call


def _rows_forever(conn: socket.socket) -> None:
    conn.sendall(PG_READY)
    conn.recv(65536)  # the query
    flood(conn, pg_msg(b"D", struct.pack("!hi", 1, 100) + b"x" * 100), 2**26)


def _scram_iterations(conn: socket.socket) -> None:
    conn.sendall(pg_msg(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256\0\0"))
    first = conn.recv(65536)
    nonce = first.split(b"r=", 1)[1].decode()
    salt = base64.b64encode(b"salt" * 4).decode()
    server_first = f"r={nonce}server,s={salt},i=3000000".encode()
    conn.sendall(pg_msg(b"R", struct.pack("!i", 11) + server_first))
    conn.recv(65536)


PG_HOSTILE: dict[str, Callable[[socket.socket], None]] = {
    # Logged in, then a long notice dripping in a byte at a time.
    "drip": lambda conn: (
        conn.sendall(pg_msg(b"R", struct.pack("!i", 0))),
        drip(conn, pg_msg(b"N", b"M" + b"slow" * 100 + b"\0\0")),
    ),
    # A message of 16 MiB announced: the old limit, allocated up front.
    "huge message": lambda conn: conn.sendall(b"R" + struct.pack("!i", 16 * 1024 * 1024 - 1)),
    # SCRAM with 3 million PBKDF2 rounds: seconds of CPU no deadline can interrupt.
    "scram iterations": _scram_iterations,
    # A ParameterStatus without its NUL: a ValueError must not escape as such.
    "malformed": lambda conn: conn.sendall(pg_msg(b"R", struct.pack("!i", 0)) + pg_msg(b"S", b"x")),
}


@pytest.mark.parametrize("case", PG_HOSTILE)
def test_postgres_replies_are_bounded(case: str) -> None:
    with pg_server(PG_HOSTILE[case]) as server:
        outcome = measure(pg_call(server, sslmode="disable"))
    assert_bounded(outcome)


def test_postgres_rows_without_end_are_cut_off() -> None:
    with pg_server(_rows_forever) as server:
        outcome = measure(pg_call(server, "SELECT version FROM migrations", sslmode="disable"))
    assert_bounded(outcome, pgwire.ProtocolError)


# --- S3 ---------------------------------------------------------------------------------------


def s3_server(answer: Callable[[socket.socket], None]) -> Hostile:
    def script(conn: socket.socket) -> None:
        conn.recv(65536)  # the request
        answer(conn)

    return Hostile(script)


def s3_call(server: Hostile) -> Callable[[float], object]:
    def call(deadline: float) -> object:
        where = s3probe.address(f"http://127.0.0.1:{server.port}", "us-east-1", "b", "path")
        creds = s3probe.Credentials("AKIAEXAMPLE", "secret")
        client = s3probe.Client(where, "us-east-1", creds, deadline)
        try:
            return client.list_objects("stellarbase-preflight/")
        finally:
            client.close()

    return call


S3_HOSTILE: dict[str, Callable[[socket.socket], None]] = {
    "drip": lambda conn: drip(conn, b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100),
    "huge body": lambda conn: (
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % GIB),
        flood(conn, b"x", 2**26),
    ),
    "huge chunked body": lambda conn: (
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        flood(conn, b"10000\r\n" + b"x" * 0x10000 + b"\r\n", 2**26),
    ),
}


@pytest.mark.parametrize("case", S3_HOSTILE)
def test_s3_answers_are_bounded(case: str) -> None:
    with s3_server(S3_HOSTILE[case]) as server:
        outcome = measure(s3_call(server))
    assert_bounded(outcome)


# --- the same through TLS ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed(tmp_path_factory.mktemp("tls")))
    return context


def test_a_drip_through_tls_is_bounded_too(server_tls: ssl.SSLContext) -> None:
    def redis_script(conn: socket.socket) -> None:
        tls = server_tls.wrap_socket(conn, server_side=True)
        tls.recv(65536)
        drip(tls, b"+" + b"a" * 100)

    def pg_script(conn: socket.socket) -> None:
        conn.recv(8)  # SSLRequest
        conn.sendall(b"S")
        tls = server_tls.wrap_socket(conn, server_side=True)
        pg_startup(tls)
        tls.sendall(pg_msg(b"R", struct.pack("!i", 0)))
        drip(tls, pg_msg(b"N", b"M" + b"slow" * 100 + b"\0\0"))

    with Hostile(redis_script) as redis_server, Hostile(pg_script) as pg:

        def redis_call(deadline: float) -> object:
            url = f"rediss://127.0.0.1:{redis_server.port}/0?ssl_cert_reqs=none"
            conn = resp.connect(resp.parse_url(url), deadline)
            try:
                return conn.command("PING")
            finally:
                conn.close()

        assert_bounded(measure(redis_call), TimeoutError)
        assert_bounded(measure(pg_call(pg, sslmode="require")), TimeoutError)
