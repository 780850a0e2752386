"""Just enough Redis (the RESP2 protocol) for preflight: AUTH, SELECT, INFO and CONFIG GET.

redis-py takes longer to import than preflight's Redis check takes to run. This client
sends a command and reads its reply, connection, TLS and all, before one deadline
(`netio`), and bounds every reply: a bulk string, an array, its nesting and the whole
connection have a size limit, so no header makes it allocate what the server announces.
Preflight (`preflight.deps`) and readiness (`checks`, for the services' /readyz and the
agent) use it; the services' own work keeps using redis-py. Valkey answers as Redis does;
`server_version` tells the two apart.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

from stellarbase import netio

Reply: TypeAlias = "str | int | list[Reply] | ReplyError | None"
# INFO, the largest answer asked for, is a few kB; CONFIG GET of three names is 6 elements.
MAX_LINE = 64 * 1024  # a status line, an error or a length
MAX_BULK = 1024 * 1024  # one bulk string
MAX_ELEMENTS = 1024  # all the array elements of one reply, nested ones included
MAX_DEPTH = 8  # arrays within arrays


class ReplyError(Exception):
    """The server's error reply: its code (ERR, WRONGPASS, NOAUTH …) and its message."""

    def __init__(self, text: str) -> None:
        code, _, rest = text.partition(" ")
        self.code, self.message = (code, rest) if code.isupper() else ("", text)
        super().__init__(self.message)


class ProtocolError(ConnectionError):
    """What came back is not RESP, or is larger than this client reads: not a Redis server,
    or not one we understand. An OSError, like every failure to talk to the server."""


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

    def __init__(self, sock: netio.DeadlineSocket | netio.DeadlineSSLSocket) -> None:
        self.deadline = sock.deadline  # time.monotonic() by which every command has returned
        self._sock = sock
        self._stream = sock.makefile("rb")

    def command(self, *args: str) -> Reply:
        """Send one command; its reply, or ReplyError raised when it is an error."""
        self._sock.sendall(encode(args))
        reply = read_reply(self._stream)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def close(self) -> None:
        self._stream.close()
        self._sock.close()


def connect(target: Target, deadline: float) -> Connection:
    """A TCP (or TLS) connection to the target; nothing sent yet."""
    sock = netio.connect(target.host, target.port, deadline)
    if not target.tls:
        return Connection(sock)
    context = ssl.create_default_context(cafile=target.ca_file)
    if not target.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        return Connection(netio.start_tls(sock, context, target.host))
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
    """One reply; an error reply comes back as a ReplyError value, nested ones included.

    Lengths, element counts and nesting are checked against the limits above before
    anything is read or allocated for them; a reply past one is a ProtocolError.
    """
    return _Reader(stream).reply(0)


class _Reader:
    """One reply's reading, with the count of array elements it has announced so far."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.elements = 0

    def reply(self, depth: int) -> Reply:
        line = self.stream.readline(MAX_LINE)
        if not line:
            raise ConnectionError("the server closed the connection")
        if not line.endswith(b"\r\n"):
            raise ProtocolError(f"not a RESP reply: {line[:40]!r}")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return ReplyError(rest.decode("utf-8", "replace"))
        if kind not in (b":", b"$", b"*") or not _is_integer(rest):
            raise ProtocolError(f"not a RESP reply: {line[:40]!r}")
        number = int(rest)
        if kind == b":":
            return number
        if number < 0:  # the null bulk string or array
            return None
        if kind == b"*":
            return self.array(number, depth + 1)
        return self.bulk(number)

    def array(self, count: int, depth: int) -> list[Reply]:
        if depth > MAX_DEPTH:
            raise ProtocolError(f"a reply nested deeper than {MAX_DEPTH} arrays")
        self.elements += count
        if self.elements > MAX_ELEMENTS:
            raise ProtocolError(f"a reply of more than {MAX_ELEMENTS} elements")
        return [self.reply(depth) for _ in range(count)]

    def bulk(self, length: int) -> str:
        if length > MAX_BULK:
            raise ProtocolError(f"a bulk string of {length} bytes (at most {MAX_BULK} read)")
        data = self.stream.read(length + 2)
        if len(data) < length + 2:
            raise ConnectionError("the server closed the connection mid-reply")
        if not data.endswith(b"\r\n"):
            raise ProtocolError("a bulk string longer than its announced length")
        return data[:-2].decode("utf-8", "replace")


def _is_integer(text: bytes) -> bool:
    digits = text[1:] if text.startswith(b"-") else text
    return 0 < len(digits) <= 19 and digits.isdigit()


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
