"""Backup repositories: an S3 bucket and prefix, or a directory (`file://`) for a pilot.

Here: the S3 store, opening the store `backup.repository` names, and repo.json (the
cluster a repository belongs to); both stores answer the small API of `store`. A put is
durable and verified when it returns: S3 gets Content-MD5 on every request that carries
bytes, so the store rejects anything that arrived damaged; the file repository
(`filerepo`) writes a temp file, fsyncs it, renames it into place and fsyncs the
directory. Every failure is a RepositoryError naming the store.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from stellarbase.backup.filerepo import FileRepository
from stellarbase.backup.store import (
    ObjectInfo,
    ObjectNotFound,
    ObjectWriter,
    Repository,
    RepositoryError,
    check_key,
)
from stellarbase.errors import one_line
from stellarbase.values import RepositoryKind

if TYPE_CHECKING:
    from stellarbase.config import BackupConfig, Config, S3Config

PART_SIZE = 16 * 1024 * 1024
_DELETE_BATCH = 1000
REPO_FORMAT = 1
REPO_JSON = "repo.json"


def _md5_b64(data: bytes | bytearray | memoryview | BinaryIO) -> str:
    if isinstance(data, bytes | bytearray | memoryview):
        return base64.b64encode(hashlib.md5(data).digest()).decode()
    start = data.tell()
    digest = hashlib.md5()
    while chunk := data.read(1024 * 1024):
        digest.update(chunk)
    data.seek(start)
    return base64.b64encode(digest.digest()).decode()


# --------------------------------------------------------------------------- S3


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


class S3Repository:
    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.description = f"s3://{bucket}/{self.prefix}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}"

    def _fail(self, action: str, key: str, exc: BaseException) -> RepositoryError:
        return RepositoryError(f"{self.description}: {action} {key} failed: {one_line(exc)}")

    @contextlib.contextmanager
    def _calling(self, action: str, key: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"{self.description}: no object {key}") from None
            raise self._fail(action, key, exc) from exc

    def put(self, key: str, data: bytes | BinaryIO, meta: Mapping[str, str]) -> None:
        with self._calling("put", key):
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ContentMD5=_md5_b64(data),
                Metadata=dict(meta),
            )

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with self._calling("head", key):
                resp = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return None
        return ObjectInfo(key, int(resp["ContentLength"]), dict(resp.get("Metadata", {})))

    def get(self, key: str) -> bytes:
        with self.open_read(key) as reader:
            return reader.read()

    def open_read(self, key: str) -> BinaryIO:
        with self._calling("get", key):
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        return io.BufferedReader(_S3Body(resp["Body"], self, key), buffer_size=1024 * 1024)

    def open_write(self, key: str, meta: Mapping[str, str]) -> ObjectWriter:
        return _S3Writer(self, key, meta)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        full = f"{self.prefix}/{prefix}"
        strip = len(self.prefix) + 1
        with self._calling("list", prefix or "/"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                # S3 lists keys in UTF-8 byte order, which is the sort order of our ASCII keys.
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][strip:], int(obj["Size"]), {})

    def delete(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            with self._calling("delete", batch[0]):
                resp = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True},
                )
            errors = resp.get("Errors", [])
            if errors:
                first = errors[0]
                raise RepositoryError(
                    f"{self.description}: delete {first.get('Key')} failed: "
                    f"{first.get('Code')} {first.get('Message', '')}".strip()
                    + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
                )


class _S3Body(io.RawIOBase):
    """A botocore StreamingBody as a raw stream, with errors turned into RepositoryError."""

    def __init__(self, body: Any, repo: S3Repository, key: str) -> None:
        self._body = body
        self._repo = repo
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]  # RawIOBase's buffer type is broader
        with self._repo._calling("get", self._key):
            data: bytes = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


class _S3Writer:
    """Multipart upload in PART_SIZE parts, each with Content-MD5; small objects use one put."""

    def __init__(self, repo: S3Repository, key: str, meta: Mapping[str, str]) -> None:
        self._repo = repo
        self._key = key
        self._meta = dict(meta)
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._stored = 0
        self._closed = False

    def _client(self) -> Any:
        return self._repo._client

    def _send_part(self, data: bytes) -> None:
        repo = self._repo
        if self._upload_id is None:
            with repo._calling("start upload of", self._key):
                resp = self._client().create_multipart_upload(
                    Bucket=repo.bucket, Key=repo._key(self._key), Metadata=self._meta
                )
            self._upload_id = str(resp["UploadId"])
        number = len(self._parts) + 1
        with repo._calling(f"upload part {number} of", self._key):
            resp = self._client().upload_part(
                Bucket=repo.bucket,
                Key=repo._key(self._key),
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,
                ContentMD5=_md5_b64(data),
            )
        self._parts.append({"PartNumber": number, "ETag": resp["ETag"]})
        self._stored += len(data)

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ValueError("write to a committed or aborted object")
        self._buf += data
        try:
            while len(self._buf) >= PART_SIZE:
                self._send_part(bytes(self._buf[:PART_SIZE]))
                del self._buf[:PART_SIZE]
        except BaseException:
            self.abort()
            raise

    def commit(self) -> int:
        if self._closed:
            raise ValueError("commit of a committed or aborted object")
        repo = self._repo
        try:
            if self._upload_id is None:
                repo.put(self._key, bytes(self._buf), self._meta)
                self._stored = len(self._buf)
            else:
                if self._buf:
                    self._send_part(bytes(self._buf))
                with repo._calling("complete upload of", self._key):
                    self._client().complete_multipart_upload(
                        Bucket=repo.bucket,
                        Key=repo._key(self._key),
                        UploadId=self._upload_id,
                        MultipartUpload={"Parts": self._parts},
                    )
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._buf = bytearray()
        return self._stored

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buf = bytearray()
        if self._upload_id is not None:
            # Best effort: a lifecycle rule for incomplete uploads catches what this misses.
            with contextlib.suppress(Exception):
                self._client().abort_multipart_upload(
                    Bucket=self._repo.bucket,
                    Key=self._repo._key(self._key),
                    UploadId=self._upload_id,
                )


# --------------------------------------------------------------------------- opening


def _s3_client(s3: S3Config, timeout: float) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.session.Session().client(
        "s3",
        endpoint_url=s3.endpoint,
        region_name=s3.region,
        aws_access_key_id=s3.access_key.get_secret_value() if s3.access_key else None,
        aws_secret_access_key=s3.secret_key.get_secret_value() if s3.secret_key else None,
        config=BotoConfig(
            connect_timeout=timeout,
            read_timeout=timeout,
            # A few quick retries per request ride out a blip; longer outages are the
            # caller's to handle (the archiver keeps trying, a backup fails).
            retries={"total_max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": s3.addressing},
            request_checksum_calculation=s3.checksums,
            response_checksum_validation=s3.checksums,
            max_pool_connections=32,
        ),
    )


def repository_from(backup: BackupConfig, s3: S3Config | None, timeout: float = 30.0) -> Repository:
    """The repository that `backup.repository` names (s3 uses the `s3` section's bucket)."""
    where = backup.location
    if where.kind == RepositoryKind.S3:
        if s3 is None:
            raise RepositoryError(
                "backup.repository is s3 but there is no s3 section",
                hint="configure s3 (endpoint, bucket, keys) or use file:///PATH",
            )
        return S3Repository(_s3_client(s3, timeout), s3.bucket, backup.prefix)
    if where.directory is not None:
        return FileRepository(Path(where.directory) / backup.prefix)
    raise RepositoryError(
        f"backups are not configured (backup.repository is {str(where)!r})",
        hint="set backup.repository to s3 or file:///PATH",
    )


def open_repository(config: Config, timeout: float = 30.0) -> Repository:
    return repository_from(config.backup, config.s3, timeout)


# --------------------------------------------------------------------------- repo.json


@dataclass(frozen=True)
class ClusterIdentity:
    """What ties a repository to one PostgreSQL cluster."""

    system_identifier: str  # decimal, as pg_control_system() shows it
    pg_version: int  # server_version_num
    wal_segment_size: int


def read_identity(repo: Repository) -> ClusterIdentity | None:
    """repo.json's cluster identity, or None for a repository nothing was written to yet."""
    try:
        raw = repo.get(REPO_JSON)
    except ObjectNotFound:
        return None
    try:
        doc = json.loads(raw)
        if doc.get("format") != REPO_FORMAT:
            raise RepositoryError(
                f"{repo.description}: {REPO_JSON} has format {doc.get('format')!r}, "
                f"this version reads {REPO_FORMAT}",
                hint="use the stellarbase release that wrote this repository",
            )
        return ClusterIdentity(
            str(doc["system_identifier"]), int(doc["pg_version"]), int(doc["wal_segment_size"])
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RepositoryError(f"{repo.description}: {REPO_JSON} is malformed: {exc}") from None


def ensure_identity(repo: Repository, ident: ClusterIdentity) -> None:
    """Write repo.json on first use; afterwards refuse a repository of another cluster."""
    stored = read_identity(repo)
    if stored is None:
        doc = {
            "format": REPO_FORMAT,
            "system_identifier": ident.system_identifier,
            "pg_version": ident.pg_version,
            "wal_segment_size": ident.wal_segment_size,
            "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        repo.put(REPO_JSON, (json.dumps(doc, indent=2) + "\n").encode(), {})
        return
    if stored.system_identifier != ident.system_identifier:
        raise RepositoryError(
            f"{repo.description} belongs to cluster {stored.system_identifier}, "
            f"this cluster is {ident.system_identifier}",
            hint="use another backup.prefix for a new cluster",
        )
    if stored.wal_segment_size != ident.wal_segment_size:
        raise RepositoryError(
            f"{repo.description} holds {stored.wal_segment_size}-byte WAL segments, "
            f"this cluster writes {ident.wal_segment_size}-byte ones",
            hint="use another backup.prefix for a new cluster",
        )
