"""The small PostgreSQL client of preflight, readiness and the agent: URLs, SCRAM,
deadlines and TLS, without a real server (tests/integration/test_pgwire.py has those).

Hostile fakes on loopback play the impostor that asks for a password in the clear.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stellarbase import pgwire, scram
from tests.fakes import FakePostgres, HungServer
from tests.hostile import PG_READY, Hostile, pg_msg, pg_startup, self_signed


def connect(t: pgwire.Target, seconds: float = 5) -> pgwire.Connection:
    return pgwire.connect(t, time.monotonic() + seconds)


# --- pure ----------------------------------------------------------------------------------


def test_url_parts_and_defaults() -> None:
    t = pgwire.parse_url(
        "postgresql://app%40corp@db.example:6432/my%20db?sslmode=verify-full&sslrootcert=/ca.pem",
        "pw",
    )
    assert (t.host, t.port, t.user, t.database, t.password) == (
        "db.example",
        6432,
        "app@corp",
        "my db",
        "pw",
    )
    assert (t.sslmode, t.sslrootcert) == ("verify-full", "/ca.pem")
    # libpq's defaults: port 5432, the database named after the user, TLS when offered.
    bare = pgwire.parse_url("postgres://app@db")
    assert (bare.port, bare.database, bare.sslmode, bare.password) == (5432, "app", "prefer", None)
    assert "pw" not in repr(t)
    with pytest.raises(ValueError, match="sslmode=sometimes"):
        pgwire.parse_url("postgresql://app@db/x?sslmode=sometimes")


def test_tls_settings_follow_sslmode() -> None:
    def context(mode: str, ca: str | None = None) -> tuple[bool, bool]:
        c = pgwire.tls_context(pgwire.Target("h", 5432, "u", "d", sslmode=mode, sslrootcert=ca))
        return c.verify_mode != pgwire.ssl.CERT_NONE, c.check_hostname

    assert context("prefer") == (False, False)
    assert context("require") == (False, False)
    assert context("verify-ca") == (True, False)
    assert context("verify-full") == (True, True)


def test_libpq_parameters_are_honoured_or_refused() -> None:
    system = pgwire.parse_url("postgresql://app@db/x?sslrootcert=system")
    assert (system.sslmode, system.verified) == ("verify-full", True)  # as libpq 16
    with pytest.raises(ValueError, match="sslrootcert=system"):
        pgwire.parse_url("postgresql://app@db/x?sslrootcert=system&sslmode=require")
    auth = pgwire.parse_url(
        "postgresql://app@db/x?require_auth=scram-sha-256&channel_binding=require"
    )
    assert (auth.require_auth, auth.channel_binding) == ("scram-sha-256", "require")
    with pytest.raises(ValueError, match="cannot be mixed"):
        pgwire.parse_url("postgresql://app@db/x?require_auth=!md5,password")
    with pytest.raises(ValueError, match="channel_binding=maybe"):
        pgwire.parse_url("postgresql://app@db/x?channel_binding=maybe")


@pytest.mark.parametrize(
    ("given", "prepared"),
    [
        ("I\u00adX", "IX"),  # RFC 4013's examples: SOFT HYPHEN maps to nothing
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # ROMAN NUMERAL NINE
        ("a\u00a0b", "a b"),  # a non-ASCII space becomes a space
        ("pass word\x07", "pass word\x07"),  # ASCII stays as it is, as in PostgreSQL
        ("a\u0007\u00e9", "a\u0007\u00e9"),  # prohibited: used raw, as in PostgreSQL
        ("\u0627\u0031", "\u0627\u0031"),  # RandAL first but not last: used raw
    ],
)
def test_saslprep(given: str, prepared: str) -> None:
    assert scram.saslprep(given) == prepared


def test_scram_matches_the_rfc_7677_example() -> None:
    exchange = scram.Scram("pencil", user="user", nonce="rOprNGfwEbeRWgbNEkqO")
    assert exchange.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = exchange.client_final(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert final == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    with pytest.raises(scram.ScramError, match="signature is wrong"):
        exchange.verify(b"v=" + b"A" * 44)
    exchange.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    assert exchange.verified


def test_scram_refuses_a_nonce_the_server_made_up() -> None:
    exchange = scram.Scram("pencil", nonce="abc")
    with pytest.raises(scram.ScramError, match="nonce"):
        exchange.client_final(b"r=xyz123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    with pytest.raises(scram.ScramError, match="iterations"):
        exchange.client_final(b"r=abc123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=100000000")
    with pytest.raises(scram.ScramError, match="base64"):
        exchange.client_final(b"r=abc123,s=not base64!,i=4096")


# --- deadlines and fakes --------------------------------------------------------------------


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])
def test_a_silent_server_costs_one_deadline(sslmode: str) -> None:
    with HungServer() as hung:
        t = pgwire.Target("127.0.0.1", hung.port, "app", "app", "pw", sslmode=sslmode)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            connect(t, 0.5)
        assert time.monotonic() - start < 1.0


def test_a_query_without_an_answer_costs_the_rest_of_the_deadline() -> None:
    with FakePostgres(version="16.2", answer_queries=False) as stuck:
        t = pgwire.Target("127.0.0.1", stuck.port, "app", "app", "pw")
        start = time.monotonic()
        with connect(t, 0.5) as conn, pytest.raises(TimeoutError):
            conn.simple_query("SELECT 1")
        assert time.monotonic() - start < 1.0


def test_a_refused_password_and_a_dead_port(dead_port: int) -> None:
    with FakePostgres(version="16.2") as fake:  # trusts everyone
        conn = connect(pgwire.Target("127.0.0.1", fake.port, "app", "app", "pw"))
        with conn:
            assert conn.server_version == "16.2"
    with pytest.raises(ConnectionRefusedError):
        connect(pgwire.Target("127.0.0.1", dead_port, "app", "app", "pw"))


# --- an impostor asking for the password ------------------------------------------------------


def _asks_for_password(code: int, tls: ssl.SSLContext | None = None) -> Hostile:
    """A server that asks for the password in cleartext (3) or MD5 (5), over TLS with `tls`,
    and keeps whatever comes back in `received`."""

    def script(conn: socket.socket) -> None:
        if tls is not None:
            assert struct.unpack("!ii", conn.recv(8))[1] == 80877103  # SSLRequest
            conn.sendall(b"S")
            conn = tls.wrap_socket(conn, server_side=True)
        pg_startup(conn)
        salt = b"salt" if code == 5 else b""
        conn.sendall(pg_msg(b"R", struct.pack("!i", code) + salt))
        while server.recv_some(conn):
            pass

    server = Hostile(script)
    return server


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


def _server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


@pytest.mark.parametrize("code", [3, 5], ids=["cleartext", "md5"])
@pytest.mark.parametrize("sslmode", ["disable", "prefer", "require", "verify-ca"])
def test_no_password_goes_out_without_verified_tls(
    code: int, sslmode: str, certificate: tuple[Path, Path]
) -> None:
    tls = None if sslmode in ("disable", "prefer") else _server_tls(certificate)
    with _asks_for_password(code, tls) as server:
        t = pgwire.Target(
            "127.0.0.1", server.port, "app", "app", "hunter2", sslmode, str(certificate[0])
        )
        with pytest.raises(pgwire.AuthenticationError, match="TLS is not verified") as refused:
            connect(t, 2)
        time.sleep(0.1)  # anything sent would have arrived by now
    assert b"hunter2" not in server.received
    assert b"p" not in server.received[:1]  # no PasswordMessage at all, MD5 included
    assert "sslmode=verify-full" in refused.value.hint


@pytest.mark.parametrize("code", [3, 5], ids=["cleartext", "md5"])
def test_the_password_goes_to_a_verified_server(code: int, certificate: tuple[Path, Path]) -> None:
    with _asks_for_password(code, _server_tls(certificate)) as server:
        t = pgwire.Target(
            "127.0.0.1", server.port, "app", "app", "hunter2", "verify-full", str(certificate[0])
        )
        with pytest.raises(TimeoutError):  # the impostor never lets us in
            connect(t, 0.5)
    assert server.received[:1] == b"p"


def _trusting() -> Hostile:
    def script(conn: socket.socket) -> None:
        pg_startup(conn)
        conn.sendall(PG_READY)
        conn.recv(100)

    return Hostile(script)


@pytest.mark.parametrize(
    ("params", "refusal"),
    [
        ({"require_auth": "scram-sha-256"}, "without authentication"),
        ({"require_auth": "!none"}, "without authentication"),
        ({"channel_binding": "require", "sslmode": "prefer"}, "without SCRAM"),
        ({"channel_binding": "require", "sslmode": "disable"}, "means no TLS"),
    ],
)
def test_a_server_that_skips_required_authentication_is_refused(
    params: dict[str, str], refusal: str
) -> None:
    with _trusting() as server:
        t = pgwire.Target("127.0.0.1", server.port, "app", "app", "pw", **params)
        with pytest.raises(pgwire.AuthenticationError, match=refusal):
            connect(t, 2)


def test_require_auth_refuses_a_method_it_does_not_list() -> None:
    with _asks_for_password(3) as server:
        t = pgwire.Target(
            "127.0.0.1", server.port, "app", "app", "pw", "prefer", require_auth="!password"
        )
        with pytest.raises(pgwire.AuthenticationError, match="require_auth=!password"):
            connect(t, 2)


# --- what the agent imports -----------------------------------------------------------------


def test_the_agent_runs_without_psycopg() -> None:
    code = (
        "import sys, stellarbase.agent.collectors, stellarbase.agent.runtime, stellarbase.checks;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'psycopg'))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"


def test_an_unverifiable_certificate_is_named(certificate: tuple[Path, Path]) -> None:
    def script(conn: socket.socket) -> None:
        conn.recv(8)
        conn.sendall(b"S")
        with contextlib.suppress(OSError):
            _server_tls(certificate).wrap_socket(conn, server_side=True)

    with Hostile(script) as server:
        t = pgwire.Target("127.0.0.1", server.port, "app", "app", "pw", "verify-full")
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            connect(t, 2)


@pytest.mark.parametrize("kind", ["rsa-sha256", "ec-sha384", "ec-sha512", "ed25519"])
def test_the_channel_binding_hash_follows_the_certificate(kind: str) -> None:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.x509.oid import NameOID

    algorithm = {
        "rsa-sha256": hashes.SHA256(),
        "ec-sha384": hashes.SHA384(),
        "ec-sha512": hashes.SHA512(),
        "ed25519": None,
    }[kind]
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if kind.startswith("rsa"):
        key = rsa.generate_private_key(65537, 2048)
    elif kind.startswith("ec"):
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "db")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, algorithm)
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    if algorithm is None:
        with pytest.raises(scram.ScramError, match="no channel binding"):
            scram.certificate_hash(der)
        return
    digest = hashes.Hash(algorithm)
    digest.update(der)
    assert scram.certificate_hash(der) == digest.finalize()
    with pytest.raises(scram.ScramError, match="cannot read"):
        scram.certificate_hash(der[:40])
