"""backup.repository is parsed once, when the config is validated, into a RepositoryLocation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from stellarbase.config import BackupConfig
from stellarbase.values import RepositoryKind, RepositoryLocation


@pytest.mark.parametrize(
    ("text", "kind", "directory"),
    [
        ("none", RepositoryKind.NONE, None),
        ("s3", RepositoryKind.S3, None),
        ("file:///srv/backups", RepositoryKind.FILE, "/srv/backups"),
        ("file:///srv/backups/", RepositoryKind.FILE, "/srv/backups"),
    ],
)
def test_the_config_carries_the_parsed_repository(
    text: str, kind: RepositoryKind, directory: str | None
) -> None:
    backup = BackupConfig(repository=text)
    assert backup.location == RepositoryLocation(kind, directory)
    assert backup.enabled == (kind != RepositoryKind.NONE)
    assert backup.repository == str(backup.location)  # the text, written back as read


def test_a_copy_keeps_the_location_and_equal_configs_stay_equal() -> None:
    backup = BackupConfig(repository="file:///srv/backups/")
    assert backup == BackupConfig(repository="file:///srv/backups")
    assert backup.model_copy(update={"encryption_key": None}).location.directory == "/srv/backups"
    again = BackupConfig.model_validate_json(backup.model_dump_json())
    assert again.location == backup.location


@pytest.mark.parametrize("text", ["file://srv/b", "s3://bucket", "/srv/b", "file:///b"])
def test_a_bad_repository_is_refused_when_the_config_is_read(text: str) -> None:
    with pytest.raises(ValidationError, match="repository"):
        BackupConfig(repository=text)
