"""Just enough Redis (the RESP2 protocol) for preflight: AUTH, SELECT, INFO and CONFIG GET.

redis-py takes longer to import than preflight's Redis check takes to run. This client
sends a command, reads its reply, and bounds every socket operation by the time left to
the caller's deadline. Preflight (`preflight.deps`) and readiness (`checks`, for the
services' /readyz and the agent) use it; the services' own work keeps using redis-py.
Valkey answers as Redis does; `server_version` tells the two apart.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

Reply: TypeAlias = "str | int | list[Reply] | ReplyError | None"
_MAX_LINE = 64 * 1024  # a status line or a length; bulk strings are read by their length


class ReplyError(Exception):
    """The server's error reply: its code (ERR, WRONGPASS, NOAUTH …) and its message."""

    def __init__(self, text: str) -> None:
        code, _, rest = text.partition(" ")
        self.code, self.message = (code, rest) if code.isupper() else ("", text)
        super().__init__(self.message)


class ProtocolError(ConnectionError):
    """What came back is not RESP: not a Redis server, or not one we understand."""


@dataclass(frozen=True)
class Target:
    """What a redis:// or rediss:// URL says: where, how, as whom, and which database."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    db: int
    ca_file: str | None = None
    verify: bool = True


def parse_url(url: str) -> Target:
    parts = urlsplit(url)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    db = parts.path.lstrip("/") or query.get("db", "0")
    return Target(
        host=parts.hostname or "localhost",
        port=parts.port or 6379,
        tls=parts.scheme == "rediss",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        db=int(db),
        ca_file=query.get("ssl_ca_certs"),
        verify=query.get("ssl_cert_reqs", "required").lower() not in ("none", "cert_none"),
    )


class Connection:
    """One connection, one command at a time, all before one deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.deadline = deadline  # time.monotonic() by which every command has returned
        self._sock = sock
        self._stream = sock.makefile("rb")

    def command(self, *args: str) -> Reply:
        """Send one command; its reply, or ReplyError raised when it is an error."""
        self._sock.settimeout(_left(self.deadline))
        self._sock.sendall(encode(args))
        self._sock.settimeout(_left(self.deadline))
        reply = read_reply(self._stream)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def close(self) -> None:
        self._stream.close()
        self._sock.close()


def connect(target: Target, deadline: float) -> Connection:
    """A TCP (or TLS) connection to the target; nothing sent yet."""
    sock = socket.create_connection((target.host, target.port), timeout=_left(deadline))
    if not target.tls:
        return Connection(sock, deadline)
    context = ssl.create_default_context(cafile=target.ca_file)
    if not target.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        sock.settimeout(_left(deadline))
        return Connection(context.wrap_socket(sock, server_hostname=target.host), deadline)
    except BaseException:
        sock.close()
        raise


def hello(client: Connection, target: Target, password: str | None) -> dict[str, str]:
    """Authenticate, select the database, and read INFO server."""
    # AUTH, not HELLO 3: an old server then still answers, and says which version it is.
    if password:
        client.command("AUTH", *([target.username] if target.username else []), password)
    if target.db:
        client.command("SELECT", str(target.db))
    return parse_info(client.command("INFO", "server"))


def server_version(info: dict[str, str]) -> tuple[str, str]:
    """(product, version) from INFO server: Valkey reports `valkey_version` besides a
    `redis_version` kept for compatibility (7.2.4), which says nothing of the server."""
    if "valkey_version" in info:
        return "Valkey", info["valkey_version"]
    return "Redis", info.get("redis_version", "?")


def describe(info: dict[str, str]) -> str:
    """The server by name and version: `Redis 7.0.15`, `Valkey 8.1.1`."""
    return " ".join(server_version(info))


def encode(args: Sequence[str | bytes]) -> bytes:
    """A command as RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def read_reply(stream: BinaryIO) -> Reply:
    """One reply; an error reply comes back as a ReplyError value, nested ones included."""
    line = stream.readline(_MAX_LINE)
    if not line:
        raise ConnectionError("the server closed the connection")
    if not line.endswith(b"\r\n"):
        raise ProtocolError(f"not a RESP reply: {line[:40]!r}")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode("utf-8", "replace")
    if kind == b"-":
        return ReplyError(rest.decode("utf-8", "replace"))
    if kind not in (b":", b"$", b"*"):
        raise ProtocolError(f"not a RESP reply: {line[:40]!r}")
    try:
        number = int(rest)
    except ValueError:
        raise ProtocolError(f"not a RESP reply: {line[:40]!r}") from None
    if kind == b":":
        return number
    if number < 0:  # the null bulk string or array
        return None
    if kind == b"*":
        return [read_reply(stream) for _ in range(number)]
    data = stream.read(number + 2)
    if len(data) < number + 2:
        raise ConnectionError("the server closed the connection mid-reply")
    if not data.endswith(b"\r\n"):
        raise ProtocolError("a bulk string longer than its announced length")
    return data[:-2].decode("utf-8", "replace")


def parse_info(reply: Reply) -> dict[str, str]:
    """INFO's "field:value" lines; section headers and blank lines left out."""
    if not isinstance(reply, str):
        raise ProtocolError(f"INFO answered {type(reply).__name__}, not text")
    fields = {}
    for line in reply.splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[name] = value
    return fields


def as_pairs(reply: Reply) -> dict[str, str]:
    """A flat [name, value, name, value …] array (CONFIG GET's answer) as a dict."""
    if not isinstance(reply, list) or len(reply) % 2:
        raise ProtocolError("expected an array of names and values")
    return {str(name): str(value) for name, value in zip(reply[0::2], reply[1::2], strict=True)}


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    return left
