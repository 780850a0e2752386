"""Tiny loopback servers that speak just enough of a protocol to play a server we cannot run.

`FakePostgres` and `FakeRedis` report an old version; `HungServer` accepts TCP connections
and never answers. Each listens on a free 127.0.0.1 port, serves every connection in its own
daemon thread, and closes them all on `stop()` (or when its `with` block ends).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType
from typing import BinaryIO, Self

LOOPBACK = "127.0.0.1"


class _Listener:
    """Accepts connections on a thread and hands each to `serve` on a thread of its own."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((LOOPBACK, 0))
        self._sock.listen(16)
        self.port: int = self._sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # the listening socket was closed by stop()
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve_quietly, args=(conn,), daemon=True).start()

    def _serve_quietly(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ConnectionError, ValueError):
            self.serve(conn)
        with contextlib.suppress(OSError):
            conn.close()

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


class HungServer(_Listener):
    """Accepts every TCP connection, reads nothing, answers nothing."""

    def serve(self, conn: socket.socket) -> None:
        self._stopped.wait()


# --- PostgreSQL (protocol v3) -------------------------------------------------------------

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102


def _pg_msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _pg_error(severity: str, code: str, message: str) -> bytes:
    fields = [b"S" + severity.encode(), b"C" + code.encode(), b"M" + message.encode()]
    return _pg_msg(b"E", b"\0".join(fields) + b"\0\0")


class FakePostgres(_Listener):
    """Startup, optional cleartext password, ParameterStatus (server_version), ready.

    Queries get an error (a client that checks the version from the startup parameters never
    needs to send one), or with `answer_queries=False` no answer at all: a server that hangs
    after a healthy startup.
    """

    def __init__(
        self, version: str = "13.9", password: str | None = None, answer_queries: bool = True
    ) -> None:
        self.version = version
        self.password = password
        self.answer_queries = answer_queries
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        while True:
            length, code = struct.unpack("!ii", _recv_exact(conn, 8))
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                conn.sendall(b"N")  # no TLS, no GSS: go on in plain text
                continue
            if code == _CANCEL_REQUEST:
                return
            fields = _recv_exact(conn, length - 8).split(b"\0")
            break
        params = dict(zip(fields[0::2], fields[1::2], strict=False))
        user = params.get(b"user", b"").decode()
        if self.password is not None:
            conn.sendall(_pg_msg(b"R", struct.pack("!i", 3)))  # AuthenticationCleartextPassword
            kind, length = struct.unpack("!ci", _recv_exact(conn, 5))
            given = _recv_exact(conn, length - 4).rstrip(b"\0").decode()
            if kind != b"p" or given != self.password:
                message = f'password authentication failed for user "{user}"'
                conn.sendall(_pg_error("FATAL", "28P01", message))
                return
        out = _pg_msg(b"R", struct.pack("!i", 0))  # AuthenticationOk
        for name, value in (
            ("server_version", self.version),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
        ):
            out += _pg_msg(b"S", f"{name}\0{value}\0".encode())
        out += _pg_msg(b"K", struct.pack("!ii", 4242, 1234567))  # BackendKeyData
        out += _pg_msg(b"Z", b"I")  # ReadyForQuery, idle
        conn.sendall(out)
        while True:
            kind, length = struct.unpack("!ci", _recv_exact(conn, 5))
            _recv_exact(conn, length - 4)
            if kind == b"X":  # Terminate
                return
            if kind in (b"Q", b"S") and not self.answer_queries:
                self._stopped.wait()
                return
            if kind in (b"Q", b"S"):  # a simple query, or the Sync closing an extended one
                error = _pg_error("ERROR", "0A000", "this fake server answers no queries")
                conn.sendall(error + _pg_msg(b"Z", b"I"))


# --- Redis (RESP2) ------------------------------------------------------------------------


class FakeRedis(_Listener):
    """AUTH, HELLO, PING, INFO, CLIENT and CONFIG GET, as an old Redis would answer them."""

    def __init__(self, version: str = "6.2.0", password: str | None = None) -> None:
        self.version = version
        self.password = password
        self.config = {"maxmemory-policy": "noeviction", "appendonly": "no", "save": ""}
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        authed = self.password is None
        while True:
            args = _read_command(reader)
            if args is None:
                return
            reply, authed = self._answer([a.decode() for a in args], authed)
            conn.sendall(reply)

    def _answer(self, args: list[str], authed: bool) -> tuple[bytes, bool]:
        cmd = args[0].upper() if args else ""
        if cmd == "AUTH":
            if self.password is None:
                return b"-ERR AUTH <password> called without any password configured\r\n", authed
            if args[-1] == self.password:
                return b"+OK\r\n", True
            return b"-WRONGPASS invalid username-password pair or user is disabled.\r\n", authed
        if cmd == "HELLO":
            if len(args) > 1 and args[1] != "2":
                return b"-NOPROTO unsupported protocol version\r\n", authed
            fields = ["server", "redis", "version", self.version, "proto", "2"]
            return _array(fields), authed
        if not authed:
            return b"-NOAUTH Authentication required.\r\n", authed
        if cmd == "PING":
            return b"+PONG\r\n", authed
        if cmd == "INFO":
            text = f"# Server\r\nredis_version:{self.version}\r\nredis_mode:standalone\r\n"
            return _bulk(text), authed
        if cmd == "CLIENT":
            return b"+OK\r\n", authed
        if cmd == "CONFIG" and len(args) > 2 and args[1].upper() == "GET":
            pairs = [x for key in args[2:] if key in self.config for x in (key, self.config[key])]
            return _array(pairs), authed
        return f"-ERR unknown command '{cmd}'\r\n".encode(), authed


def _read_command(reader: BinaryIO) -> list[bytes] | None:
    line = reader.readline()
    if not line:
        return None
    if not line.startswith(b"*"):  # an inline command, as redis-cli sends by hand
        return line.split()
    args = []
    for _ in range(int(line[1:])):
        size = int(reader.readline()[1:])
        args.append(reader.read(size + 2)[:size])
    return args


def _bulk(text: str) -> bytes:
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _array(items: list[str]) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(_bulk(i) for i in items)
