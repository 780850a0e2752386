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


# The signature algorithms of X.509 certificates by the DER of their OID, and the hash
# tls-server-end-point uses for each: the signature's own, SHA-256 for MD5 and SHA-1.
_SIGNATURE_HASHES = {
    bytes.fromhex(oid): name
    for oid, name in (
        ("2a864886f70d010104", "sha256"),  # md5WithRSAEncryption
        ("2a864886f70d010105", "sha256"),  # sha1WithRSAEncryption
        ("2a864886f70d01010e", "sha224"),  # sha224WithRSAEncryption
        ("2a864886f70d01010b", "sha256"),  # sha256WithRSAEncryption
        ("2a864886f70d01010c", "sha384"),  # sha384WithRSAEncryption
        ("2a864886f70d01010d", "sha512"),  # sha512WithRSAEncryption
        ("2a8648ce3d0401", "sha256"),  # ecdsa-with-SHA1
        ("2a8648ce3d040301", "sha224"),  # ecdsa-with-SHA224
        ("2a8648ce3d040302", "sha256"),  # ecdsa-with-SHA256
        ("2a8648ce3d040303", "sha384"),  # ecdsa-with-SHA384
        ("2a8648ce3d040304", "sha512"),  # ecdsa-with-SHA512
    )
}


def certificate_hash(der: bytes) -> bytes:
    """tls-server-end-point (RFC 5929): the server certificate hashed with its signature's
    hash, SHA-256 where that is MD5 or SHA-1.

    Read from the DER by hand: the OID is three elements in, and the agent would otherwise
    load an X.509 library (some 7 MB) for it. Algorithms PostgreSQL cannot bind either
    (RSA-PSS, Ed25519) are refused, as libpq does.
    """
    try:
        _, body = _der(der, 0, 0x30)  # Certificate
        tbs_end, _ = _der(der, body, 0x30)  # tbsCertificate: skipped
        _, algorithm = _der(der, tbs_end, 0x30)  # signatureAlgorithm
        oid_end, oid = _der(der, algorithm, 0x06)
    except IndexError:
        raise ScramError("cannot read the server certificate for channel binding") from None
    name = _SIGNATURE_HASHES.get(der[oid:oid_end])
    if name is None:
        raise ScramError("the server certificate's signature algorithm has no channel binding")
    return hashlib.new(name, der).digest()


def _der(data: bytes, at: int, tag: int) -> tuple[int, int]:
    """The element of `tag` at `at`: (where it ends, where its content starts)."""
    if data[at] != tag:
        raise IndexError("unexpected DER tag")
    length, at = data[at + 1], at + 2
    if length & 0x80:  # long form: that many length bytes follow
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise IndexError("unsupported DER length")
        length, at = int.from_bytes(data[at : at + count], "big"), at + count
    if at + length > len(data):
        raise IndexError("DER element past the end")
    return at + length, at


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
