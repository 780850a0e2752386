"""Just enough of the PostgreSQL frontend/backend protocol (v3) for the probes.

Preflight (`preflight.deps`), readiness (`checks`, for the services' /readyz and the agent)
and the agent's migration count ask PostgreSQL whether it is up, what it runs and which
migrations are applied. psycopg, with asyncio and its adapters, costs the long-running
agent about 9 MB for that, and cannot keep one deadline: libpq's connect_timeout is whole
seconds (at least 2) and a query has none. This client opens one connection (plain or
TLS), logs in (trust, SCRAM-SHA-256 with or without channel binding; cleartext and MD5
only over TLS with sslmode=verify-full), and runs simple queries whose values come back as
text, all before one deadline (`netio`) and within size limits. `migrate` and the
services keep using psycopg.

The URL parameters it honours are libpq's: sslmode, sslrootcert (a file, or `system`),
require_auth and channel_binding.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

from stellarbase import netio
from stellarbase.scram import Scram, ScramError, certificate_hash

Row = tuple[str | None, ...]

APPLICATION_NAME = "stellarbase-agent"
_PROTOCOL_V3 = 196608  # 3 << 16
_SSL_REQUEST = 80877103
MAX_MESSAGE = 1024 * 1024  # the probes' answers are a few short rows; more is not for us
MAX_ROWS = 10_000  # rows of one query's answer
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_CHANNEL_BINDING = ("disable", "prefer", "require")
_AUTH_METHODS = ("password", "md5", "scram-sha-256", "gss", "sspi", "none")

# Authentication request codes (the int32 after an 'R' message's length).
_AUTH_OK = 0
_AUTH_CLEARTEXT = 3
_AUTH_MD5 = 5
_AUTH_SASL = 10
_AUTH_SASL_CONTINUE = 11
_AUTH_SASL_FINAL = 12
_SCRAM = "SCRAM-SHA-256"
_SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
_PASSWORD_HINT = (
    "use scram-sha-256 in the server's pg_hba.conf (password_encryption = scram-sha-256, "
    "then set the password again), or sslmode=verify-full in postgres.url"
)


class ServerError(Exception):
    """An ErrorResponse: the server's message, SQLSTATE (28P01, 3D000 …) and severity."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.sqlstate = fields.get("C", "")
        self.severity = fields.get("V") or fields.get("S", "")
        self.message = fields.get("M", "unknown server error")[:500]
        self.detail = fields.get("D")
        self.hint = fields.get("H")
        super().__init__(self.message)


class ProtocolError(ConnectionError):
    """What came back is not the PostgreSQL protocol as this client knows it, or is larger
    than it reads. An OSError, like every failure to talk to the server."""


class AuthenticationError(ConnectionError):
    """The login cannot go on here: no password given, a method refused or unsupported, a
    forged server. `hint` says what to change."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Target:
    """What a postgresql:// URL says, plus the password kept out of it."""

    host: str
    port: int
    user: str
    database: str
    password: str | None = field(default=None, repr=False)
    sslmode: str = "prefer"
    sslrootcert: str | None = None  # a PEM file, or "system": the system's trust store
    require_auth: str | None = None  # libpq's: "scram-sha-256", "!password,!md5" …
    channel_binding: str = "prefer"

    @property
    def verified(self) -> bool:
        """TLS that proves the server: the certificate chain and the host name checked."""
        return self.sslmode == "verify-full"


def parse_url(url: str, password: str | None = None) -> Target:
    """A postgresql:// (or postgres://) URL; `password` wins over one written in the URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a postgresql:// URL: {parts.scheme or 'no scheme'}")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    rootcert = query.get("sslrootcert")
    # As libpq 16: the system's trust store means verify-full, and nothing weaker.
    sslmode = query.get("sslmode", "verify-full" if rootcert == "system" else "prefer")
    if sslmode not in _SSLMODES:
        raise ValueError(f"sslmode={sslmode}: not one of {', '.join(_SSLMODES)}")
    if rootcert == "system" and sslmode != "verify-full":
        raise ValueError(
            f"sslmode={sslmode} may not be used with sslrootcert=system (use verify-full)"
        )
    binding = query.get("channel_binding", "prefer")
    if binding not in _CHANNEL_BINDING:
        raise ValueError(f"channel_binding={binding}: not one of {', '.join(_CHANNEL_BINDING)}")
    require_auth = query.get("require_auth")
    if require_auth is not None:
        _auth_rule(require_auth)  # refused here, at parse time, when malformed
    user = unquote(parts.username) if parts.username else "postgres"
    if password is None and parts.password:
        password = unquote(parts.password)
    return Target(
        host=parts.hostname or "localhost",
        port=parts.port or 5432,
        user=user,
        database=unquote(parts.path.lstrip("/")) or user,
        password=password,
        sslmode=sslmode,
        sslrootcert=rootcert,
        require_auth=require_auth,
        channel_binding=binding,
    )


def _auth_rule(text: str) -> tuple[bool, frozenset[str]]:
    """require_auth as (negated, methods): "a,b" allows only those, "!a,!b" all but those."""
    items = [item.strip() for item in text.split(",")]
    negated = {item.startswith("!") for item in items}
    methods = frozenset(item.lstrip("!") for item in items)
    if len(negated) != 1:
        raise ValueError(f"require_auth={text}: negated and plain methods cannot be mixed")
    unknown = sorted(methods - set(_AUTH_METHODS))
    if unknown:
        raise ValueError(f"require_auth={text}: {', '.join(unknown)} is not a method")
    return negated.pop(), methods


def _allowed(target: Target, method: str) -> bool:
    if target.require_auth is None:
        return True
    negated, methods = _auth_rule(target.require_auth)
    return (method in methods) != negated


class Connection:
    """One logged-in session: its ParameterStatus values and simple queries, all before one
    deadline."""

    def __init__(self, sock: netio.DeadlineSocket | netio.DeadlineSSLSocket) -> None:
        self.deadline = sock.deadline  # time.monotonic() by which every operation has returned
        self.parameters: dict[str, str] = {}  # ParameterStatus: server_version, TimeZone …
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._sock = sock
        self._stream = sock.makefile("rb")

    @property
    def server_version(self) -> str:
        return self.parameters.get("server_version", "?")

    @property
    def server_version_num(self) -> int:
        """As libpq's PQserverVersion: 160002 for "16.2", 90624 for "9.6.24"; 0 unknown."""
        found = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", self.server_version)
        if found is None:
            return 0
        major, minor, patch = (int(part or 0) for part in found.groups())
        return major * 10000 + minor if major >= 10 else major * 10000 + minor * 100 + patch

    def simple_query(self, sql: str) -> list[Row]:
        """Every row the statement(s) return, values as text (None for NULL)."""
        with _protocol_errors():
            return self._simple_query(sql)

    def _simple_query(self, sql: str) -> list[Row]:
        self._send(b"Q", _cstr(sql))
        rows: list[Row] = []
        error: ServerError | None = None
        while True:
            kind, body = self._read()
            if kind == b"D":
                if len(rows) >= MAX_ROWS:
                    raise ProtocolError(f"an answer of more than {MAX_ROWS} rows")
                rows.append(_data_row(body))
            elif kind == b"E":
                error = ServerError(_fields(body))
            elif kind == b"Z":
                if error is not None:
                    raise error
                return rows
            elif kind == b"S":
                self._parameter(body)
            elif kind not in (b"T", b"C", b"I", b"N", b"A"):
                # CopyIn/CopyOut and the like: the agent sends no statement that asks for them.
                raise ProtocolError(f"unexpected message {kind!r} in a simple query's answer")

    def close(self) -> None:
        try:
            self._sock.sendall(_message(b"X", b""))
        except OSError:  # TimeoutError included
            pass  # the server is gone or slow; closing the socket ends the session either way
        finally:
            self._stream.close()
            self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _login(self, target: Target) -> None:
        params = {"user": target.user, "database": target.database}
        params["application_name"] = APPLICATION_NAME
        payload = b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
        self._sock.sendall(struct.pack("!ii", len(payload) + 8, _PROTOCOL_V3) + payload)
        self._authenticate(target)
        while True:
            kind, body = self._read()
            if kind == b"Z":
                return
            if kind == b"E":
                raise ServerError(_fields(body))
            if kind == b"S":
                if len(self.parameters) >= 256:
                    raise ProtocolError("more ParameterStatus messages than any server sends")
                self._parameter(body)
            elif kind not in (b"K", b"N"):  # BackendKeyData and notices need no answer
                raise ProtocolError(f"unexpected message {kind!r} after authentication")

    def _authenticate(self, target: Target) -> None:
        scram: Scram | None = None
        answered = False  # a password (cleartext or MD5) went out
        while True:
            kind, body = self._read()
            if kind == b"E":
                raise ServerError(_fields(body))
            if kind != b"R" or len(body) < 4:
                raise ProtocolError(f"expected an authentication request, got {kind!r}")
            (code,) = struct.unpack_from("!i", body)
            data = body[4:]
            if code == _AUTH_OK:
                self._check_done(target, scram, answered)
                return
            if code in (_AUTH_CLEARTEXT, _AUTH_MD5) and not answered and scram is None:
                self._send(b"p", _cstr(self._password_answer(target, code, data)))
                answered = True
            elif code == _AUTH_SASL and scram is None:
                scram = self._scram_start(target, data)
            elif code == _AUTH_SASL_CONTINUE and scram is not None:
                self._send(b"p", scram.client_final(data))
            elif code == _AUTH_SASL_FINAL and scram is not None:
                scram.verify(data)
            else:
                raise AuthenticationError(f"unsupported authentication request {code}")

    def _password_answer(self, target: Target, code: int, salt: bytes) -> str:
        """The password, or its MD5 answer: only to a server whose certificate proves it."""
        method, shown = ("password", "in cleartext") if code == _AUTH_CLEARTEXT else ("md5", "MD5")
        if not _allowed(target, method):
            raise AuthenticationError(
                f"the server asks for the password {shown}, which require_auth="
                f"{target.require_auth} does not allow",
                "change require_auth in postgres.url, or the server's pg_hba.conf",
            )
        if target.channel_binding == "require":
            raise AuthenticationError(
                f"channel_binding=require, but the server asks for the password {shown}",
                "use scram-sha-256 in the server's pg_hba.conf",
            )
        if not (self.tls and target.verified):
            raise AuthenticationError(
                f"the server asks for the password {shown} over a connection whose TLS is not "
                f"verified (sslmode={target.sslmode}): refused, it would reach an impostor",
                _PASSWORD_HINT,
            )
        password = _password(target)
        return password if code == _AUTH_CLEARTEXT else md5_password(target.user, password, salt)

    def _scram_start(self, target: Target, data: bytes) -> Scram:
        offered = [m.decode("utf-8", "replace") for m in data.split(b"\0") if m]
        if not _allowed(target, "scram-sha-256"):
            raise AuthenticationError(
                f"the server asks for SCRAM-SHA-256, which require_auth={target.require_auth} "
                "does not allow",
                "change require_auth in postgres.url",
            )
        bind = self.tls and target.channel_binding != "disable"
        if bind and _SCRAM_PLUS in offered:
            assert isinstance(self._sock, ssl.SSLSocket)
            der = self._sock.getpeercert(binary_form=True)
            if der is None:
                raise AuthenticationError("the server sent no certificate to bind the login to")
            scram = Scram(
                _password(target),
                binding="p=tls-server-end-point",
                cbind_data=certificate_hash(der),
            )
            mechanism = _SCRAM_PLUS
        elif target.channel_binding == "require":
            where = "the server does not offer SCRAM-SHA-256-PLUS" if self.tls else "no TLS"
            raise AuthenticationError(
                f"channel_binding=require, but {where}",
                "use sslmode=verify-full and a server with TLS (PostgreSQL 11+)",
            )
        elif _SCRAM in offered:
            # "y": we could bind to the channel but the server did not offer to, which a
            # server that did offer (and was stripped of it) notices.
            scram = Scram(_password(target), binding="y" if bind else "n")
            mechanism = _SCRAM
        else:
            raise AuthenticationError(
                f"the server offers {', '.join(offered)[:100]}; only {_SCRAM} is supported"
            )
        first = scram.client_first()
        self._send(b"p", _cstr(mechanism) + struct.pack("!i", len(first)) + first)
        return scram

    def _check_done(self, target: Target, scram: Scram | None, answered: bool) -> None:
        """At AuthenticationOk: the server proved itself, or was allowed not to."""
        if scram is not None and not scram.verified:
            raise AuthenticationError("the server skipped the SCRAM server signature")
        if scram is None and target.channel_binding == "require":
            raise AuthenticationError(
                "channel_binding=require, but the server let us in without SCRAM",
                "use scram-sha-256 in the server's pg_hba.conf",
            )
        if scram is None and not answered and not _allowed(target, "none"):
            raise AuthenticationError(
                f"the server let us in without authentication, which require_auth="
                f"{target.require_auth} does not allow",
                "check the server's pg_hba.conf: it trusts this connection",
            )

    def _parameter(self, body: bytes) -> None:
        name, value, *_ = body.split(b"\0")
        self.parameters[name.decode()[:64]] = value.decode("utf-8", "replace")[:256]

    def _send(self, kind: bytes, body: bytes) -> None:
        self._sock.sendall(_message(kind, body))

    def _read(self) -> tuple[bytes, bytes]:
        # Every read goes through the deadline socket: the deadline holds however the
        # message trickles in, and no length is trusted past MAX_MESSAGE.
        head = self._stream.read(5)
        if len(head) < 5:
            raise ConnectionError("the server closed the connection")
        kind, length = head[:1], struct.unpack("!i", head[1:])[0]
        if not 4 <= length <= MAX_MESSAGE:
            raise ProtocolError(f"not a PostgreSQL message, or too large: {head!r}")
        body = self._stream.read(length - 4)
        if len(body) < length - 4:
            raise ConnectionError("the server closed the connection mid-message")
        return kind, body


def connect(target: Target, deadline: float) -> Connection:
    """A logged-in connection: TLS as sslmode says, authenticated, ReadyForQuery seen, all
    before `deadline` (time.monotonic()). Raises ServerError for the server's refusal and
    OSError (ProtocolError, AuthenticationError, TimeoutError …) for everything else."""
    sock = netio.connect(target.host, target.port, deadline)
    try:
        with _protocol_errors():
            conn = Connection(_start_tls(sock, target))
    except BaseException:
        sock.close()
        raise
    try:
        with _protocol_errors():
            conn._login(target)
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def _protocol_errors() -> Iterator[None]:
    """A malformed message raises ProtocolError (an OSError), never ValueError and kin."""
    try:
        yield
    except ScramError as exc:
        raise AuthenticationError(str(exc)) from None
    except OSError:
        raise  # ssl.CertificateError is a ValueError too, and says more as it is
    except (ValueError, struct.error, IndexError) as exc:  # UnicodeDecodeError included
        raise ProtocolError(f"a malformed message from the server: {exc}"[:300]) from None


def _start_tls(
    sock: netio.DeadlineSocket, target: Target
) -> netio.DeadlineSocket | netio.DeadlineSSLSocket:
    # "allow" means plain text first and TLS only if that fails; one deadline has no room for
    # a second attempt, and a server that insists on TLS says so in its error.
    if target.sslmode in ("disable", "allow"):
        if target.channel_binding == "require":
            raise AuthenticationError(
                f"channel_binding=require, but sslmode={target.sslmode} means no TLS",
                "use sslmode=verify-full",
            )
        return sock
    sock.sendall(struct.pack("!ii", 8, _SSL_REQUEST))
    answer = sock.recv(1)  # exactly one byte: anything after it must come through TLS
    if answer == b"N":
        if target.sslmode == "prefer":
            return sock
        raise ConnectionError(f"sslmode={target.sslmode}, but the server does not offer TLS")
    if answer != b"S":
        raise ProtocolError(f"not a PostgreSQL server: it answered {answer!r} to SSLRequest")
    return netio.start_tls(sock, tls_context(target), target.host)


def tls_context(target: Target) -> ssl.SSLContext:
    """prefer/require check nothing (unless require has a root certificate, as in libpq);
    verify-ca checks the chain; verify-full the chain and the host name. The chain is
    checked against sslrootcert, or the system's trust store without one or with `system`."""
    verify = target.sslmode in ("verify-ca", "verify-full") or (
        target.sslmode == "require" and target.sslrootcert is not None
    )
    cafile = target.sslrootcert if verify and target.sslrootcert != "system" else None
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = target.sslmode == "verify-full"
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    return context


def md5_password(user: str, password: str, salt: bytes) -> str:
    """The MD5 method's answer: "md5" + md5(md5(password + user) + salt), in hex."""
    inner = hashlib.md5((password + user).encode(), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode() + salt, usedforsecurity=False).hexdigest()
    return "md5" + outer


def _password(target: Target) -> str:
    if target.password is None:
        raise AuthenticationError(
            f"the server asks for a password for {target.user}; none given",
            "set postgres.password (STELLARBASE_POSTGRES__PASSWORD)",
        )
    return target.password


def _data_row(body: bytes) -> Row:
    (count,) = struct.unpack_from("!h", body)
    offset, values = 2, list[str | None]()
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, offset)
        offset += 4
        if length < 0:
            values.append(None)
            continue
        if offset + length > len(body):
            raise ProtocolError("a DataRow value longer than its message")
        values.append(body[offset : offset + length].decode("utf-8", "replace"))
        offset += length
    return tuple(values)


def _fields(body: bytes) -> dict[str, str]:
    """An ErrorResponse's or NoticeResponse's fields by their one-letter codes."""
    return {
        part[:1].decode("ascii", "replace"): part[1:].decode("utf-8", "replace")
        for part in body.split(b"\0")
        if part
    }


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"
