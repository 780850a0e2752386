"""The agent's listener for remote scrapers, served by a real `stellarbase run agent` process:
TLS, and a bearer token for /metrics and /readyz."""

from __future__ import annotations

import datetime
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.servers import free_port

TOKEN = "s3cret-scrape-token"


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "agent.crt", tmp_path / "agent.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _get(url: str, token: str | None = None) -> int:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test's own self-signed certificate
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_remote_listener_speaks_tls_and_wants_the_token(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    local, remote = free_port(), free_port()
    settings = tmp_path / "agent.json"
    settings.write_text(
        json.dumps(
            {
                "service": "agent",
                "bind": "127.0.0.1",
                "port": local,
                "log_level": "warning",
                "check_timeout_seconds": 1,
                "agent": {
                    "interval_seconds": 1,
                    "restart_after_failures": 3,
                    "restart_backoff_seconds": 10,
                    "restart_backoff_max_seconds": 600,
                    "remote_port": remote,
                    "remote_bind": "127.0.0.1",
                    "tls_cert": str(cert),
                    "tls_key": str(key),
                },
            }
        )
    )
    env = {
        **os.environ,
        "STELLARBASE_AGENT__METRICS_TOKEN": TOKEN,
    }
    argv = [sys.executable, "-m", "stellarbase", "run", "agent", "--settings", str(settings)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"https://127.0.0.1:{remote}"
    try:
        deadline = time.monotonic() + 30
        while _healthz(base) != 200:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the remote listener never answered"
            time.sleep(0.2)
        assert _get(f"{base}/metrics") == 401
        assert _get(f"{base}/metrics", "wrong") == 401
        assert _get(f"{base}/readyz") == 401
        assert _get(f"{base}/metrics", TOKEN) == 200
        assert _get(f"{base}/readyz", TOKEN) in (200, 503)  # an answer, whatever the host
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _healthz(base: str) -> int:
    try:
        return _get(f"{base}/healthz")
    except (OSError, ssl.SSLError):
        return 0
