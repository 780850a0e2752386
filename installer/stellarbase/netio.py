"""Sockets bound by one deadline and one byte budget, for the small protocol clients.

`pgwire`, `resp` and `s3probe` talk to servers that may be slow, broken or hostile. A
socket timeout bounds one `recv`, so a server that drips a byte just inside it holds the
caller for as long as it likes. These sockets instead set the timeout to what is left of
the operation's deadline before every receive, and count what they receive: past the
budget they raise, so no reply can grow without bound whatever its framing says.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

BUDGET = 8 * 1024 * 1024  # bytes one connection may receive: the probes' answers are small


class ReplyTooLarge(ConnectionError):
    """The server sent more than the client's limits allow: not the server we asked for."""


def left(deadline: float) -> float:
    """Seconds until `deadline` (time.monotonic()); TimeoutError once it has passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the deadline passed")
    return remaining


class _Bounded:
    """What both socket classes add: every receive waits at most until the deadline, and
    all receives together stay within the byte budget."""

    deadline: float = 0.0
    budget: int = BUDGET
    received: int = 0

    def _before_recv(self) -> None:
        self.settimeout(left(self.deadline))  # type: ignore[attr-defined]

    def _count(self, n: int) -> int:
        self.received += n
        if self.received > self.budget:
            raise ReplyTooLarge(f"the server sent more than {self.budget} bytes")
        return n


class DeadlineSocket(_Bounded, socket.socket):
    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._before_recv()
        data = super().recv(bufsize, flags)
        self._count(len(data))
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._before_recv()
        return self._count(super().recv_into(buffer, nbytes, flags))

    def sendall(self, data: Any, flags: int = 0) -> None:
        # One sendall with a timeout is bounded as a whole (not per send) since Python 3.5.
        self.settimeout(left(self.deadline))
        super().sendall(data, flags)


class DeadlineSSLSocket(_Bounded, ssl.SSLSocket):
    # An SSLSocket read with a timeout waits at most that long in all, however the records
    # arrive; the handshake likewise.
    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        self._before_recv()
        data = super().recv(buflen, flags)
        self._count(len(data))
        return data

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        self._before_recv()
        return self._count(super().recv_into(buffer, nbytes, flags))

    def sendall(self, data: Any, flags: int = 0) -> None:
        self.settimeout(left(self.deadline))
        super().sendall(data, flags)


def connect(host: str, port: int, deadline: float, budget: int = BUDGET) -> DeadlineSocket:
    """A TCP connection, each address tried with what is left of the deadline.

    Name resolution is the one step no timeout reaches: getaddrinfo blocks as the resolver
    says (resolv.conf `timeout`/`attempts`), so endpoints are best given as addresses.
    """
    error: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = DeadlineSocket(family, kind, proto)
        sock.deadline, sock.budget = deadline, budget
        try:
            sock.settimeout(left(deadline))
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            if isinstance(exc, TimeoutError):
                raise
            continue
        return sock
    raise error or OSError(f"{host}: no address to connect to")


def start_tls(
    sock: DeadlineSocket, context: ssl.SSLContext, server_hostname: str
) -> DeadlineSSLSocket:
    """The handshake, bounded by the socket's deadline; the TLS socket keeps its budget."""
    context.sslsocket_class = DeadlineSSLSocket
    deadline, budget, received = sock.deadline, sock.budget, sock.received
    sock.settimeout(left(deadline))
    tls = context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
    assert isinstance(tls, DeadlineSSLSocket)
    tls.deadline, tls.budget, tls.received = deadline, budget, received
    try:
        tls.settimeout(left(deadline))
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls
