"""The S3 client of preflight: Signature V4 against AWS's published examples, addressing,
error codes, and deadlines."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stellarbase import s3probe
from tests.fakes import HungServer

# The example key pair, bucket and time of the Signature V4 examples in AWS's S3 API
# reference ("Examples: Signature Calculations in AWS Signature Version 4").
EXAMPLE = s3probe.Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
EXAMPLE_HOST = "examplebucket.s3.amazonaws.com"
EXAMPLE_TIME = datetime(2013, 5, 24, tzinfo=UTC)
EXAMPLE_DATE = "20130524T000000Z"
EMPTY = s3probe.EMPTY_SHA256


def signature(header: str) -> str:
    found = re.search(r"Signature=([0-9a-f]{64})$", header)
    assert found, header
    return found.group(1)


@pytest.mark.parametrize(
    ("method", "path", "query", "extra", "body", "expected"),
    [
        (  # GET Object, the first 10 bytes
            "GET",
            "/test.txt",
            {},
            {"Range": "bytes=0-9"},
            b"",
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        ),
        (  # PUT Object: a key with a character to encode, a Date and a storage class
            "PUT",
            "/test$file.text",
            {},
            {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
            b"Welcome to Amazon S3.",
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
        ),
        (  # GET Bucket Lifecycle: a sub-resource without a value
            "GET",
            "/",
            {"lifecycle": ""},
            {},
            b"",
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
        ),
        (  # GET Bucket (List Objects): query parameters in sorted order
            "GET",
            "/",
            {"prefix": "J", "max-keys": "2"},
            {},
            b"",
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
        ),
    ],
)
def test_signature_matches_the_aws_examples(
    method: str,
    path: str,
    query: dict[str, str],
    extra: dict[str, str],
    body: bytes,
    expected: str,
) -> None:
    payload = hashlib.sha256(body).hexdigest()
    headers = {
        "Host": EXAMPLE_HOST,
        "x-amz-content-sha256": payload,
        "x-amz-date": EXAMPLE_DATE,
        **extra,
    }
    auth = s3probe.authorization(
        method, path, query, headers, payload, EXAMPLE, "us-east-1", EXAMPLE_TIME
    )
    assert auth.startswith(
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
    )
    assert signature(auth) == expected


def test_a_signed_request_carries_what_s3_checks() -> None:
    extra = {"Range": "bytes=0-9"}
    headers = s3probe.sign_request(
        "GET", EXAMPLE_HOST, "/test.txt", {}, b"", EXAMPLE, "us-east-1", EXAMPLE_TIME, extra
    )
    assert headers["x-amz-date"] == EXAMPLE_DATE
    assert headers["x-amz-content-sha256"] == EMPTY
    assert "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date," in headers["authorization"]
    # The same request as AWS's GET Object example, so the same signature.
    assert signature(headers["authorization"]) == (
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    temporary = s3probe.Credentials(EXAMPLE.access_key, EXAMPLE.secret_key, token="session")
    signed = s3probe.sign_request(
        "GET", EXAMPLE_HOST, "/", {}, b"", temporary, "us-east-1", EXAMPLE_TIME, {}
    )
    assert signed["x-amz-security-token"] == "session"
    assert "x-amz-security-token" in signed["authorization"]


def test_keys_and_query_values_are_encoded_once() -> None:
    assert s3probe.canonical_uri("/bucket/stellarbase-preflight/host a+b") == (
        "/bucket/stellarbase-preflight/host%20a%2Bb"
    )
    assert s3probe.canonical_query({"prefix": "stellarbase-preflight/", "list-type": "2"}) == (
        "list-type=2&prefix=stellarbase-preflight%2F"
    )


def test_addressing_path_virtual_and_aws() -> None:
    path = s3probe.address("http://127.0.0.1:9000", "us-east-1", "b-1", "path")
    assert (path.host, path.port, path.host_header, path.prefix) == (
        "127.0.0.1",
        9000,
        "127.0.0.1:9000",
        "/b-1",
    )
    virtual = s3probe.address("https://s3.example.com/", "eu-west-1", "b-1", "virtual")
    assert (virtual.scheme, virtual.host, virtual.port, virtual.host_header, virtual.prefix) == (
        "https",
        "b-1.s3.example.com",
        443,
        "b-1.s3.example.com",  # the default port is left out of Host
        "",
    )
    aws = s3probe.address(None, "eu-central-1", "b-1", "virtual")
    assert (aws.scheme, aws.host_header) == ("https", "b-1.s3.eu-central-1.amazonaws.com")
    behind_a_path = s3probe.address("http://gw:8080/storage", "us-east-1", "b-1", "path")
    assert behind_a_path.prefix == "/storage/b-1"


def test_the_error_code_comes_from_the_body_else_the_status() -> None:
    xml = b"<?xml version='1.0'?><Error><Code>NoSuchBucket</Code><Message>m</Message></Error>"
    assert s3probe.Response(404, {}, xml).code == "NoSuchBucket"
    assert s3probe.Response(403, {}, b"").code == "403"  # a HEAD, or a proxy's own page
    assert s3probe.Response(404, {}, b"<html>not found</html>").code == "404"
    assert s3probe.Response(200, {}, xml).code == ""
    status = b'<VersioningConfiguration xmlns="x"><s3:Status>Enabled</s3:Status>'
    assert s3probe.xml_text(status, "Status") == "Enabled"


class _Store(BaseHTTPRequestHandler):
    """An in-memory bucket that keeps versions and records each request line."""

    protocol_version = "HTTP/1.1"  # keep-alive, as S3 does
    objects: dict[str, bytes]
    seen: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        self.seen.append(f"PUT {self.path}")
        self.objects[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(200, x_amz_version_id="v1")

    def do_GET(self) -> None:
        self.seen.append(f"GET {self.path}")
        if self.path in self.objects:
            self._answer(200, self.objects[self.path])
        else:
            self._answer(404, b"<Error><Code>NoSuchKey</Code></Error>")

    def do_DELETE(self) -> None:
        self.seen.append(f"DELETE {self.path}")
        self.objects.pop(self.path.split("?")[0], None)
        self._answer(204)


@pytest.fixture
def store() -> Iterator[tuple[s3probe.Address, type[_Store]]]:
    handler = type("Store", (_Store,), {"objects": {}, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        where = f"http://127.0.0.1:{server.server_address[1]}"
        yield s3probe.address(where, "us-east-1", "b-1", "path"), handler
    finally:
        server.shutdown()
        server.server_close()


def test_an_object_goes_in_comes_back_and_its_version_is_deleted(
    store: tuple[s3probe.Address, type[_Store]],
) -> None:
    where, handler = store
    client = s3probe.Client(where, "us-east-1", EXAMPLE, time.monotonic() + 5)
    try:
        version = client.put_object("probe/one", b"\x00bytes\xff")
        assert version == "v1"
        assert client.get_object("probe/one") == b"\x00bytes\xff"
        client.delete_object("probe/one", version)
        with pytest.raises(s3probe.S3Error) as missing:
            client.get_object("probe/one")
    finally:
        client.close()
    assert missing.value.code == "NoSuchKey"
    assert handler.seen == [
        "PUT /b-1/probe/one",
        "GET /b-1/probe/one",
        "DELETE /b-1/probe/one?versionId=v1",
        "GET /b-1/probe/one",
    ]


def test_a_hung_endpoint_costs_the_deadline_and_no_more() -> None:
    with HungServer() as hung:
        where = s3probe.address(f"http://127.0.0.1:{hung.port}", "us-east-1", "b-1", "path")
        start = time.monotonic()
        client = s3probe.Client(where, "us-east-1", EXAMPLE, start + 0.3)
        with pytest.raises(TimeoutError):
            client.list_objects("stellarbase-preflight/")
        assert time.monotonic() - start < 0.6
        with pytest.raises(TimeoutError):  # the deadline is gone: nothing more is sent
            client.versioning()
        client.close()
