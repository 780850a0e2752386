"""The few S3 calls preflight makes, signed with AWS Signature Version 4 over http.client.

Importing boto3 and building a client costs more than half a second, most of the time a
whole preflight may take, for six plain HTTP requests. This client makes just those
requests, over one kept-alive connection; http.client parses the HTTP. Every call obeys
one deadline, however slowly the answer trickles in (`netio`), and reads at most
MAX_BODY bytes of a body. Preflight (`preflight.deps`) and readiness (`checks`, for the
services' /readyz and the agent) use it; everything else (the services' own work,
install, backups) keeps using boto3.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import re
import ssl
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote, urlsplit

from stellarbase import netio

if TYPE_CHECKING:
    from stellarbase.config import S3Config

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
_DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_BODY = 1024 * 1024  # the probes' answers: a listing of one key, a 64-byte object, errors


class ProtocolError(ConnectionError):
    """Not an HTTP answer this client reads: malformed, or larger than MAX_BODY. An
    OSError, like every failure to talk to the endpoint."""


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None  # the session token of temporary credentials


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes

    @property
    def code(self) -> str:
        """S3's error code: from the XML error body, else the HTTP status; "" on success."""
        if self.status < 300:
            return ""
        return xml_text(self.body, "Code") or str(self.status)


class S3Error(Exception):
    """S3 answered, with an error status."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"HTTP {response.status} {response.code}")
        self.response = response
        self.code = response.code


@dataclass(frozen=True)
class Address:
    """Where the requests of one bucket go: path-style or virtual-host addressing."""

    scheme: str
    host: str  # to connect to
    port: int
    host_header: str  # what is signed and sent as Host
    prefix: str  # the path before an object key: "/bucket" path-style, "" virtual


def address(
    endpoint: str | None, region: str, bucket: str, addressing: Literal["path", "virtual"]
) -> Address:
    """The address of `bucket`; no endpoint means AWS itself, in `region`."""
    parts = urlsplit(endpoint or f"https://s3.{region}.amazonaws.com")
    scheme = parts.scheme
    host = parts.hostname or ""
    port = parts.port or _DEFAULT_PORTS[scheme]
    base = parts.path.rstrip("/")
    if addressing == "virtual":
        host, prefix = f"{bucket}.{host}", base
    else:
        prefix = f"{base}/{bucket}"
    shown = f"[{host}]" if ":" in host else host
    header = shown if port == _DEFAULT_PORTS[scheme] else f"{shown}:{port}"
    return Address(scheme, host, port, header, prefix)


def credentials(access_key: str | None, secret_key: str | None) -> Credentials | None:
    """The configured key pair; without one, what botocore's chain finds (environment,
    profile, instance role), as the services would use. None: no credentials at all."""
    if access_key and secret_key:
        return Credentials(access_key, secret_key)
    # Only AWS itself may go without configured keys; botocore is imported for it alone.
    from botocore.session import get_session

    found = get_session().get_credentials()
    if found is None:
        return None
    frozen = found.get_frozen_credentials()
    return Credentials(frozen.access_key, frozen.secret_key, frozen.token)


def client_for(dep: S3Config, deadline: float) -> Client | None:
    """A client of the configured bucket; None when no credentials can be found."""
    access = dep.access_key.get_secret_value() if dep.access_key else None
    secret = dep.secret_key.get_secret_value() if dep.secret_key else None
    creds = credentials(access, secret)
    if creds is None:
        return None
    where = address(dep.endpoint, dep.region, dep.bucket, dep.addressing)
    return Client(where, dep.region, creds, deadline, dep.checksums)


class Client:
    """One bucket, one request at a time over one connection, all before one deadline."""

    def __init__(
        self,
        where: Address,
        region: str,
        creds: Credentials,
        deadline: float,
        checksums: Literal["when_supported", "when_required"] = "when_required",
    ) -> None:
        self.where = where
        self.region = region
        self.creds = creds
        self.deadline = deadline  # time.monotonic() by which every call has returned
        self.checksums = checksums
        self._conn: http.client.HTTPConnection | None = None

    def list_objects(self, prefix: str) -> Response:
        query = {"list-type": "2", "prefix": prefix, "max-keys": "1"}
        return self._call("GET", "", query)

    def create_bucket(self) -> None:
        body = b""
        if self.region != "us-east-1":  # the one region S3 refuses a LocationConstraint for
            body = (
                f'<CreateBucketConfiguration xmlns="{_XMLNS}"><LocationConstraint>'
                f"{self.region}</LocationConstraint></CreateBucketConfiguration>"
            ).encode()
        self._call("PUT", "", {}, body)

    def enable_versioning(self) -> None:
        body = (
            f'<VersioningConfiguration xmlns="{_XMLNS}"><Status>Enabled</Status>'
            "</VersioningConfiguration>"
        ).encode()
        # S3 demands a checksum on this call; Content-MD5 is the one every S3 store knows.
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        self._call("PUT", "", {"versioning": ""}, body, {"content-md5": md5})

    def versioning(self) -> str | None:
        """The bucket's versioning status (Enabled, Suspended); None if never enabled."""
        return xml_text(self._call("GET", "", {"versioning": ""}).body, "Status")

    def put_object(self, key: str, body: bytes) -> str | None:
        """Store the object; returns its version id where the bucket keeps versions."""
        headers = {}
        if self.checksums == "when_supported":  # as boto3 would send it
            crc = zlib.crc32(body).to_bytes(4, "big")
            headers["x-amz-checksum-crc32"] = base64.b64encode(crc).decode()
            headers["x-amz-sdk-checksum-algorithm"] = "CRC32"
        response = self._call("PUT", key, {}, body, headers)
        return response.headers.get("x-amz-version-id") or None

    def get_object(self, key: str) -> bytes:
        headers = {"x-amz-checksum-mode": "ENABLED"} if self.checksums == "when_supported" else {}
        return self._call("GET", key, {}, headers=headers).body

    def delete_object(self, key: str, version_id: str | None = None) -> None:
        self._call("DELETE", key, {"versionId": version_id} if version_id else {})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _call(
        self,
        method: str,
        key: str,
        query: Mapping[str, str],
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """One signed request; raises S3Error on an error status, OSError when S3 does not
        answer in time or at all."""
        path = self.where.prefix + (f"/{key}" if key else "") or "/"
        signed = sign_request(
            method,
            self.where.host_header,
            path,
            query,
            body,
            self.creds,
            self.region,
            datetime.now(UTC),
            headers or {},
        )
        target = canonical_uri(path) + (f"?{canonical_query(query)}" if query else "")
        response = self._send(method, target, body, signed)
        if response.status >= 300:
            raise S3Error(response)
        return response

    def _send(
        self, method: str, target: str, body: bytes, headers: dict[str, str], retry: bool = True
    ) -> Response:
        reused = self._conn is not None and self._conn.sock is not None
        try:
            return self._exchange(method, target, body, headers)
        except (ConnectionResetError, BrokenPipeError):
            self.close()
            if not (reused and retry):
                raise
        except (http.client.HTTPException, ValueError) as exc:
            self.close()
            raise ProtocolError(f"not an HTTP answer: {exc!r}"[:300]) from exc
        except OSError:
            self.close()  # a timeout leaves the connection in an unknown state
            raise
        # The server closed the kept-alive connection between two calls: once more, anew.
        return self._send(method, target, body, headers, retry=False)

    def _exchange(self, method: str, target: str, body: bytes, headers: dict[str, str]) -> Response:
        conn = self._connection()
        conn.request(method, target, body or None, headers)
        answer = conn.getresponse()
        # Content-Length may promise anything: read one byte past the limit, no more.
        data = answer.read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            raise ProtocolError(f"an answer of more than {MAX_BODY} bytes")
        if not answer.isclosed():
            answer.read()  # nothing left (Content-Length reached), or the connection goes
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = _connection(self.where, self.deadline)
        return self._conn


class _HTTP(http.client.HTTPConnection):
    """http.client over a deadline socket: the headers and body of every answer arrive
    before the client's deadline, or the call fails."""

    def __init__(self, host: str, port: int, deadline: float) -> None:
        super().__init__(host, port, timeout=netio.left(deadline))
        self.deadline = deadline

    def connect(self) -> None:
        self.sock = netio.connect(self.host, self.port, self.deadline)


class _HTTPS(_HTTP):
    default_port = 443

    def connect(self) -> None:
        plain = netio.connect(self.host, self.port, self.deadline)
        try:
            self.sock = netio.start_tls(plain, ssl.create_default_context(), self.host)
        except BaseException:
            plain.close()
            raise


def _connection(where: Address, deadline: float) -> http.client.HTTPConnection:
    kind = _HTTPS if where.scheme == "https" else _HTTP
    return kind(where.host, where.port, deadline)


# --- Signature Version 4 ----------------------------------------------------------------


def sign_request(
    method: str,
    host: str,
    path: str,
    query: Mapping[str, str],
    body: bytes,
    creds: Credentials,
    region: str,
    now: datetime,
    extra: Mapping[str, str],
) -> dict[str, str]:
    """The headers of a request, Authorization included; `extra` headers are signed too."""
    headers = {name.lower(): value for name, value in extra.items()}
    headers["host"] = host
    headers["x-amz-date"] = now.strftime("%Y%m%dT%H%M%SZ")
    headers["x-amz-content-sha256"] = hashlib.sha256(body).hexdigest()
    if creds.token:
        headers["x-amz-security-token"] = creds.token
    payload = headers["x-amz-content-sha256"]
    headers["authorization"] = authorization(
        method, path, query, headers, payload, creds, region, now
    )
    headers["user-agent"] = "stellarbase-preflight"  # after signing: not part of it
    return headers


def authorization(
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    payload_sha256: str,
    creds: Credentials,
    region: str,
    now: datetime,
    service: str = "s3",
) -> str:
    """The Authorization header of a request whose `headers` (Host and X-Amz-Date among
    them) are all signed. `path` is not yet percent-encoded; S3 encodes it once."""
    names = sorted(name.lower() for name in headers)
    values = {name.lower(): " ".join(value.split()) for name, value in headers.items()}
    signed = ";".join(names)
    request = "\n".join(
        [
            method,
            canonical_uri(path),
            canonical_query(query),
            "".join(f"{name}:{values[name]}\n" for name in names),
            signed,
            payload_sha256,
        ]
    )
    day = now.strftime("%Y%m%d")
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            now.strftime("%Y%m%dT%H%M%SZ"),
            scope,
            hashlib.sha256(request.encode()).hexdigest(),
        ]
    )
    key = f"AWS4{creds.secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.digest(key, part.encode(), "sha256")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return (
        f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )


def canonical_uri(path: str) -> str:
    return quote(path, safe="/")


def canonical_query(query: Mapping[str, str]) -> str:
    pairs = sorted((quote(k, safe=""), quote(v, safe="")) for k, v in query.items())
    return "&".join(f"{k}={v}" for k, v in pairs)


def xml_text(body: bytes, tag: str) -> str | None:
    """The text of the first `tag` element of an S3 XML answer (None: there is none).

    S3's answers are flat and small; a pattern spares the XML parser for two fields.
    """
    found = re.search(rb"<(?:\w+:)?" + tag.encode() + rb">([^<]*)</", body)
    return found.group(1).decode("utf-8", "replace") if found else None
