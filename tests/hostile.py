"""Hostile servers on loopback: each connection gets a script that drips, lies about
lengths or floods, as a broken or malicious PostgreSQL, Redis or S3 endpoint could.

They are the adversary of the small protocol clients, not a stand-in for a dependency:
a real server would never send these bytes, which is the point.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.fakes import _Listener, _recv_exact

Script = Callable[[socket.socket], None]
DRIP_FOR = 3.0  # seconds a drip goes on at most: past any deadline the tests use


class Hostile(_Listener):
    """Runs `script` on every connection; `received` collects what the clients sent."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.received = bytearray()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        self.script(conn)

    def recv_some(self, conn: socket.socket, n: int = 65536) -> bytes:
        data = conn.recv(n)
        self.received += data
        return data


def drip(conn: socket.socket, data: bytes, every: float = 0.05) -> None:
    """One byte of `data` every `every` seconds (endlessly repeated), for DRIP_FOR seconds."""
    stop = time.monotonic() + DRIP_FOR
    i = 0
    while time.monotonic() < stop:
        conn.sendall(data[i % len(data) : i % len(data) + 1])
        i += 1
        time.sleep(every)


def flood(conn: socket.socket, data: bytes, total: int) -> None:
    """`data` over and over, `total` bytes in all, as fast as the client reads."""
    chunk = data * max(1, 65536 // len(data))
    sent = 0
    while sent < total:
        conn.sendall(chunk)
        sent += len(chunk)


# --- PostgreSQL ------------------------------------------------------------------------------


def pg_msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def pg_startup(conn: socket.socket) -> dict[bytes, bytes]:
    """Answer SSLRequest/GSSENCRequest with "N" and read the startup message."""
    while True:
        length, code = struct.unpack("!ii", _recv_exact(conn, 8))
        if code in (80877103, 80877104):
            conn.sendall(b"N")
            continue
        fields = _recv_exact(conn, length - 8).split(b"\0")
        return dict(zip(fields[0::2], fields[1::2], strict=False))


PG_READY = (
    pg_msg(b"R", struct.pack("!i", 0))
    + pg_msg(b"S", b"server_version\x0016.2\x00")
    + pg_msg(b"Z", b"I")
)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost (its own CA) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
