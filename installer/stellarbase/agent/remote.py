"""The agent's listener for remote scrapers: a token, TLS, and bounds on every connection.

A scraper on the network may be anything, so one connection never holds up another:
the accept loop only accepts, each connection gets a worker thread of a fixed pool of
slots (over the cap a new connection is closed at once), and a worker does the TLS
handshake, reads the request and writes the answer under one deadline for the whole
connection. A reaper shuts down a connection that outlives it, so neither an idle TCP
connection nor a request dripped a byte at a time (slowloris) keeps a slot for longer.

Used by `runtime.Agent`; the handler (token check, paths) is the services' own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import structlog

from stellarbase.errors import ExitCode, StellarError

log = structlog.get_logger()

TOKEN_ENV = "STELLARBASE_AGENT__METRICS_TOKEN"  # the bearer token, from secrets.env
MAX_CONNECTIONS = 16  # concurrent connections (and worker threads); Prometheus needs one
CONNECTION_SECONDS = 10.0  # handshake + request + answer, whatever the client's pace
REFUSED_LOG_EVERY = 60.0


class BoundedServer(HTTPServer):
    """HTTP(S) server with at most `max_connections` connections, each cut at `deadline`."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        context: ssl.SSLContext | None = None,
        max_connections: int = MAX_CONNECTIONS,
        deadline: float = CONNECTION_SECONDS,
    ) -> None:
        if ipaddress.ip_address(address[0]).version == 6:
            self.address_family = socket.AF_INET6
        self.context = context
        self.deadline = deadline
        self.refused = 0
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: dict[int, tuple[float, socket.socket]] = {}
        self._open_lock = threading.Lock()
        self._refused_logged = 0.0
        self._closed = threading.Event()
        super().__init__(address, handler)
        threading.Thread(target=self._reap, name="http-remote-reaper", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            threading.Thread(
                target=self._serve_one,
                args=(request, client_address),
                name="http-remote-conn",
                daemon=True,
            ).start()
        except RuntimeError:  # no thread to be had: the same as over the cap
            self._slots.release()
            self._refuse(request)

    def _refuse(self, request: socket.socket) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= REFUSED_LOG_EVERY:
            self._refused_logged = now
            log.warning("remote listener full: connection closed", refused_total=self.refused)
        self.shutdown_request(request)

    def _serve_one(self, request: socket.socket, client_address: Any) -> None:
        key = self._track(request)
        conn: socket.socket = request
        try:
            conn.settimeout(self.deadline)
            if self.context is not None:
                conn = self.context.wrap_socket(request, server_side=True)  # the handshake
            self.finish_request(conn, client_address)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.debug("remote connection dropped", peer=str(client_address[0]), error=str(exc))
        finally:
            self._untrack(key)
            self.shutdown_request(conn)
            self._slots.release()

    def _track(self, request: socket.socket) -> int:
        # A duplicate of the descriptor: shutting it down ends the connection whatever the
        # worker wraps the original in, and it stays valid until the worker is done.
        twin = request.dup()
        with self._open_lock:
            self._open[id(twin)] = (time.monotonic() + self.deadline, twin)
        return id(twin)

    def _untrack(self, key: int) -> None:
        with self._open_lock:
            _, twin = self._open.pop(key)
        twin.close()

    def _reap(self) -> None:
        while not self._closed.wait(0.2):
            now = time.monotonic()
            with self._open_lock:
                late = [twin for deadline, twin in self._open.values() if deadline <= now]
                for twin in late:
                    with contextlib.suppress(OSError):
                        twin.shutdown(socket.SHUT_RDWR)

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StellarError(
            f"cannot load the agent's TLS certificate or key: {exc}",
            hint="agent.tls_cert/tls_key: PEM files the stellarbase-agent user can read",
            code=ExitCode.CONFIG,
        ) from None
    return context
