"""The client side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, 7677, 5929), as
PostgreSQL speaks it, for `pgwire`.

The password goes through SASLprep (RFC 4013) built on Python's `stringprep` tables and
the Unicode 3.2 normalisation `unicodedata.ucd_3_2_0` keeps for it. As in PostgreSQL, an
ASCII password is left as it is, and a password that SASLprep refuses (prohibited or
unassigned characters, mixed directions) is used as its raw UTF-8, so both sides still
derive the same key. The server's iteration count is capped: a forged server cannot
make the client spend minutes in PBKDF2.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata

MAX_ITERATIONS = 100_000  # PostgreSQL's default is 4096 (scram_iterations)

_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21,
    stringprep.in_table_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
    stringprep.in_table_a1,  # unassigned in Unicode 3.2: prohibited in stored strings
)


class ScramError(ConnectionError):
    """The SCRAM exchange cannot go on: a malformed or forged server message."""


def saslprep(password: str) -> str:
    """RFC 4013 SASLprep, or the password unchanged where PostgreSQL leaves it unchanged."""
    if password.isascii():
        return password
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    )
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if not prepared or any(check(c) for c in prepared for check in _PROHIBITED):
        return password
    if any(stringprep.in_table_d1(c) for c in prepared):
        ends = stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])
        if not ends or any(stringprep.in_table_d2(c) for c in prepared):
            return password
    return prepared


class Scram:
    """One SCRAM-SHA-256 exchange. `binding` is the GS2 header's channel-binding flag
    ("n": none, "y": the client could but the server offered none, "p=tls-server-end-point":
    bound to the TLS certificate given as `cbind_data`).

    PostgreSQL takes the user name from the startup message, so the SCRAM one stays empty.
    """

    def __init__(
        self,
        password: str,
        *,
        user: str = "",
        nonce: str | None = None,
        binding: str = "n",
        cbind_data: bytes = b"",
    ) -> None:
        self.password = saslprep(password).encode()
        self.nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self.gs2_header = f"{binding},,"
        self.cbind_data = cbind_data
        self.client_first_bare = f"n={user},r={self.nonce}"
        self.server_signature = b""
        self.verified = False

    def client_first(self) -> bytes:
        return (self.gs2_header + self.client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        text = _text(server_first)
        attrs = _attributes(text)
        nonce, salt, iterations = attrs.get("r", ""), attrs.get("s"), attrs.get("i", "")
        if not nonce.startswith(self.nonce) or len(nonce) == len(self.nonce):
            raise ScramError("the server's SCRAM nonce does not extend ours")
        if salt is None or not iterations.isdigit() or len(iterations) > 10:
            raise ScramError(f"not a SCRAM server-first-message: {text[:100]!r}")
        if not 1 <= int(iterations) <= MAX_ITERATIONS:
            raise ScramError(
                f"the server asks for {iterations} SCRAM iterations; "
                f"at most {MAX_ITERATIONS} are computed"
            )
        salted = hashlib.pbkdf2_hmac("sha256", self.password, _b64(salt), int(iterations))
        binding = base64.b64encode(self.gs2_header.encode() + self.cbind_data).decode()
        without_proof = f"c={binding},r={nonce}"
        auth_message = f"{self.client_first_bare},{text},{without_proof}".encode()
        client_key = _hmac(salted, b"Client Key")
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        attrs = _attributes(_text(server_final))
        if "e" in attrs:
            raise ScramError(f"SCRAM failed on the server: {attrs['e'][:100]}")
        given = _b64(attrs.get("v", ""))
        if not self.server_signature or not hmac.compare_digest(given, self.server_signature):
            raise ScramError("the server's SCRAM signature is wrong: not the real server")
        self.verified = True


def certificate_hash(der: bytes) -> bytes:
    """tls-server-end-point (RFC 5929): the server certificate hashed with its signature's
    hash, SHA-256 where that is MD5 or SHA-1."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes

    try:
        algorithm = x509.load_der_x509_certificate(der).signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ScramError(f"cannot read the server certificate for channel binding: {exc}") from None
    if algorithm is None:  # Ed25519 and the like: RFC 5929 defines no binding for them
        raise ScramError("the server certificate's algorithm has no tls-server-end-point hash")
    if algorithm.name in ("md5", "sha1"):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(der)
    return digest.finalize()


def _attributes(text: str) -> dict[str, str]:
    pairs = (part.partition("=") for part in text.split(","))
    return {name: value for name, sep, value in pairs if sep}


def _text(message: bytes) -> str:
    try:
        return message.decode()
    except UnicodeDecodeError:
        raise ScramError("a SCRAM message that is not UTF-8") from None


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ScramError("a SCRAM message with malformed base64") from None


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")
