"""Just enough of the PostgreSQL frontend/backend protocol (v3) for the agent.

The agent asks PostgreSQL two things each round: is it up, and which migrations are
applied. psycopg, with asyncio and its adapters, costs the long-running agent about 9 MB
for that. This client opens one connection (plain or TLS), logs in (trust, cleartext, MD5
or SCRAM-SHA-256), runs simple queries whose values come back as text, and bounds every
socket operation by the time left to the caller's deadline. `migrate` and the services
keep using psycopg.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

Row = tuple[str | None, ...]

APPLICATION_NAME = "stellarbase-agent"
_PROTOCOL_V3 = 196608  # 3 << 16
_SSL_REQUEST = 80877103
_MAX_MESSAGE = 16 * 1024 * 1024  # the agent's answers are a few rows; more is not PostgreSQL
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

# Authentication request codes (the int32 after an 'R' message's length).
_AUTH_OK = 0
_AUTH_CLEARTEXT = 3
_AUTH_MD5 = 5
_AUTH_SASL = 10
_AUTH_SASL_CONTINUE = 11
_AUTH_SASL_FINAL = 12
_SCRAM = "SCRAM-SHA-256"


class ServerError(Exception):
    """An ErrorResponse: the server's message, SQLSTATE (28P01, 3D000 …) and severity."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.sqlstate = fields.get("C", "")
        self.severity = fields.get("V") or fields.get("S", "")
        self.message = fields.get("M", "unknown server error")
        self.detail = fields.get("D")
        self.hint = fields.get("H")
        super().__init__(self.message)


class ProtocolError(ConnectionError):
    """What came back is not the PostgreSQL protocol as this client knows it."""


class AuthenticationError(ConnectionError):
    """The login cannot go on here: no password given, an unsupported method, a forged server."""


@dataclass(frozen=True)
class Target:
    """What a postgresql:// URL says, plus the password kept out of it."""

    host: str
    port: int
    user: str
    database: str
    password: str | None = field(default=None, repr=False)
    sslmode: str = "prefer"
    sslrootcert: str | None = None


def parse_url(url: str, password: str | None = None) -> Target:
    """A postgresql:// (or postgres://) URL; `password` wins over one written in the URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a postgresql:// URL: {parts.scheme or 'no scheme'}")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    sslmode = query.get("sslmode", "prefer")
    if sslmode not in _SSLMODES:
        raise ValueError(f"sslmode={sslmode}: not one of {', '.join(_SSLMODES)}")
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
        sslrootcert=query.get("sslrootcert"),
    )


class Connection:
    """One logged-in session: its ParameterStatus values and simple queries, all before one
    deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.deadline = deadline  # time.monotonic() by which every operation has returned
        self.parameters: dict[str, str] = {}  # ParameterStatus: server_version, TimeZone …
        self._sock = sock
        self._stream = sock.makefile("rb")

    @property
    def server_version(self) -> str:
        return self.parameters.get("server_version", "?")

    def simple_query(self, sql: str) -> list[Row]:
        """Every row the statement(s) return, values as text (None for NULL)."""
        self._send(b"Q", _cstr(sql))
        rows: list[Row] = []
        error: ServerError | None = None
        while True:
            kind, body = self._read()
            if kind == b"D":
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
            self._sock.settimeout(min(1.0, _left(self.deadline)))
            self._sock.sendall(_message(b"X", b""))
        except OSError:  # TimeoutError included
            pass  # the server is gone or slow; closing the socket ends the session either way
        finally:
            self._stream.close()
            self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _login(self, target: Target) -> None:
        params = {"user": target.user, "database": target.database}
        params["application_name"] = APPLICATION_NAME
        payload = b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
        self._send_raw(struct.pack("!ii", len(payload) + 8, _PROTOCOL_V3) + payload)
        self._authenticate(target)
        while True:
            kind, body = self._read()
            if kind == b"Z":
                return
            if kind == b"E":
                raise ServerError(_fields(body))
            if kind == b"S":
                self._parameter(body)
            elif kind not in (b"K", b"N"):  # BackendKeyData and notices need no answer
                raise ProtocolError(f"unexpected message {kind!r} after authentication")

    def _authenticate(self, target: Target) -> None:
        scram: Scram | None = None
        while True:
            kind, body = self._read()
            if kind == b"E":
                raise ServerError(_fields(body))
            if kind != b"R" or len(body) < 4:
                raise ProtocolError(f"expected an authentication request, got {kind!r}")
            (code,) = struct.unpack_from("!i", body)
            data = body[4:]
            if code == _AUTH_OK:
                if scram is not None and not scram.verified:
                    raise AuthenticationError("the server skipped the SCRAM server signature")
                return
            if code == _AUTH_CLEARTEXT:
                self._send(b"p", _cstr(_password(target)))
            elif code == _AUTH_MD5:
                self._send(b"p", _cstr(md5_password(target.user, _password(target), data[:4])))
            elif code == _AUTH_SASL:
                mechanisms = [m.decode() for m in data.split(b"\0") if m]
                if _SCRAM not in mechanisms:
                    raise AuthenticationError(
                        f"the server offers {', '.join(mechanisms)}; only {_SCRAM} is supported"
                    )
                scram = Scram(_password(target))
                first = scram.client_first()
                self._send(b"p", _cstr(_SCRAM) + struct.pack("!i", len(first)) + first)
            elif code == _AUTH_SASL_CONTINUE and scram is not None:
                self._send(b"p", scram.client_final(data))
            elif code == _AUTH_SASL_FINAL and scram is not None:
                scram.verify(data)
            else:
                raise AuthenticationError(f"unsupported authentication request {code}")

    def _parameter(self, body: bytes) -> None:
        name, value, *_ = body.split(b"\0")
        self.parameters[name.decode()] = value.decode("utf-8", "replace")

    def _send(self, kind: bytes, body: bytes) -> None:
        self._send_raw(_message(kind, body))

    def _send_raw(self, data: bytes) -> None:
        self._sock.settimeout(_left(self.deadline))
        self._sock.sendall(data)

    def _read(self) -> tuple[bytes, bytes]:
        self._sock.settimeout(_left(self.deadline))
        head = self._stream.read(5)
        if len(head) < 5:
            raise ConnectionError("the server closed the connection")
        kind, length = head[:1], struct.unpack("!i", head[1:])[0]
        if not 4 <= length <= _MAX_MESSAGE:
            raise ProtocolError(f"not a PostgreSQL message: {head!r}")
        self._sock.settimeout(_left(self.deadline))
        body = self._stream.read(length - 4)
        if len(body) < length - 4:
            raise ConnectionError("the server closed the connection mid-message")
        return kind, body


def connect(target: Target, deadline: float) -> Connection:
    """A logged-in connection: TLS as sslmode says, authenticated, ReadyForQuery seen."""
    sock = socket.create_connection((target.host, target.port), timeout=_left(deadline))
    try:
        sock = _start_tls(sock, target, deadline)
        conn = Connection(sock, deadline)
    except BaseException:
        sock.close()
        raise
    try:
        conn._login(target)
    except BaseException:
        conn.close()
        raise
    return conn


def _start_tls(sock: socket.socket, target: Target, deadline: float) -> socket.socket:
    # "allow" means plain text first and TLS only if that fails; one deadline has no room for
    # a second attempt, and a server that insists on TLS says so in its error.
    if target.sslmode in ("disable", "allow"):
        return sock
    sock.settimeout(_left(deadline))
    sock.sendall(struct.pack("!ii", 8, _SSL_REQUEST))
    sock.settimeout(_left(deadline))
    answer = sock.recv(1)  # exactly one byte: anything after it must come through TLS
    if answer == b"N":
        if target.sslmode == "prefer":
            return sock
        raise ConnectionError(f"sslmode={target.sslmode}, but the server does not offer TLS")
    if answer != b"S":
        raise ProtocolError(f"not a PostgreSQL server: it answered {answer!r} to SSLRequest")
    context = tls_context(target)
    sock.settimeout(_left(deadline))
    return context.wrap_socket(sock, server_hostname=target.host)


def tls_context(target: Target) -> ssl.SSLContext:
    """prefer/require check nothing (unless require has a root certificate, as in libpq);
    verify-ca checks the chain; verify-full the chain and the host name."""
    verify = target.sslmode in ("verify-ca", "verify-full") or (
        target.sslmode == "require" and target.sslrootcert is not None
    )
    context = ssl.create_default_context(cafile=target.sslrootcert if verify else None)
    context.check_hostname = target.sslmode == "verify-full"
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    return context


def md5_password(user: str, password: str, salt: bytes) -> str:
    """The MD5 method's answer: "md5" + md5(md5(password + user) + salt), in hex."""
    inner = hashlib.md5((password + user).encode(), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode() + salt, usedforsecurity=False).hexdigest()
    return "md5" + outer


class Scram:
    """The client side of SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding.

    PostgreSQL takes the user name from the startup message, so the SCRAM one stays empty
    there. The password goes in as UTF-8 without SASLprep, which leaves ASCII as it is.
    """

    def __init__(self, password: str, *, user: str = "", nonce: str | None = None) -> None:
        self.password = password.encode()
        self.nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self.client_first_bare = f"n={user},r={self.nonce}"
        self.server_signature = b""
        self.verified = False

    def client_first(self) -> bytes:
        return ("n,," + self.client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = _scram_attributes(text)
        nonce, salt, iterations = attrs.get("r", ""), attrs.get("s"), attrs.get("i", "")
        if not nonce.startswith(self.nonce) or len(nonce) == len(self.nonce):
            raise AuthenticationError("the server's SCRAM nonce does not extend ours")
        if salt is None or not iterations.isdigit():
            raise AuthenticationError(f"not a SCRAM server-first-message: {text!r}")
        salted = hashlib.pbkdf2_hmac(
            "sha256", self.password, base64.b64decode(salt), int(iterations)
        )
        without_proof = f"c=biws,r={nonce}"  # biws: base64 of "n,,", no channel binding
        auth_message = f"{self.client_first_bare},{text},{without_proof}".encode()
        client_key = _hmac(salted, b"Client Key")
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        attrs = _scram_attributes(server_final.decode())
        if "e" in attrs:
            raise AuthenticationError(f"SCRAM failed on the server: {attrs['e']}")
        given = base64.b64decode(attrs.get("v", ""))
        if not self.server_signature or not hmac.compare_digest(given, self.server_signature):
            raise AuthenticationError("the server's SCRAM signature is wrong: not the real server")
        self.verified = True


def _scram_attributes(text: str) -> dict[str, str]:
    pairs = (part.partition("=") for part in text.split(","))
    return {name: value for name, sep, value in pairs if sep}


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def _password(target: Target) -> str:
    if target.password is None:
        raise AuthenticationError(f"the server asks for a password for {target.user}; none given")
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
        values.append(body[offset : offset + length].decode("utf-8", "replace"))
        offset += length
    return tuple(values)


def _fields(body: bytes) -> dict[str, str]:
    """An ErrorResponse's or NoticeResponse's fields by their one-letter codes."""
    return {
        part[:1].decode(): part[1:].decode("utf-8", "replace") for part in body.split(b"\0") if part
    }


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    return left
