"""Which releases this host accepts: no silent downgrade, no revoked release, and a record
of the release key override.

Install, upgrade, rollback and status use it. The record lives in
/var/lib/stellarbase/release-trust.json (root's, beside state.json):
- `revoked`: every version that a signed release.json installed here withdrew; the list only
  grows, so an older bundle cannot take a revocation back;
- `key_override`: the last time a bundle was accepted on the keys of
  STELLARBASE_RELEASE_PUBKEY instead of the built-in ones (file, key fingerprints, action,
  version, time).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import structlog

from stellarbase import install_state
from stellarbase.errors import ExitCode, StellarError
from stellarbase.files import write_atomic
from stellarbase.paths import HostPaths

log = structlog.get_logger()

_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)(.*)")
RECORD = "release-trust.json"


def version_key(version: str) -> tuple[int, int, int, bool, str]:
    """Sort key of a release version: numbers first; 1.2.0rc1 comes before 1.2.0."""
    match = _VERSION.fullmatch(version)
    if match is None:
        raise StellarError(
            f"{version!r} is not a release version",
            hint="versions look like 1.4.2",
            code=ExitCode.USAGE,
        )
    major, minor, patch, suffix = match.groups()
    return int(major), int(minor), int(patch), suffix == "", suffix


def load_record(paths: HostPaths) -> dict[str, Any]:
    try:
        data = json.loads((paths.state_dir / RECORD).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StellarError(
            f"{paths.state_dir / RECORD}: unreadable ({exc.__class__.__name__})",
            hint="it lists revoked releases: restore it from a backup of /var/lib/stellarbase, "
            "or remove it and install the newest release again",
            code=ExitCode.UPGRADE,
        ) from None
    return data if isinstance(data, dict) else {}


def revoked_releases(paths: HostPaths) -> list[str]:
    found = load_record(paths).get("revoked", [])
    return sorted({str(v) for v in found}) if isinstance(found, list) else []


def check_release_allowed(
    paths: HostPaths,
    version: str,
    *,
    allow_downgrade: bool,
    revoked_by_bundle: Iterable[str] = (),
) -> None:
    """Refuse a revoked release always, and an older one than installed without the flag."""
    revoked = {*revoked_releases(paths), *revoked_by_bundle}
    if version in revoked:
        raise StellarError(
            f"release {version} is revoked: a signed newer release withdrew it",
            hint="install a release that is not revoked (the newest one); "
            "`stellarbase status` lists the revoked releases",
            code=ExitCode.BUNDLE,
        )
    installed = install_state.load(paths.state_file).version
    if not installed or allow_downgrade or version_key(version) >= version_key(installed):
        return
    raise StellarError(
        f"release {version} is older than the installed {installed}: not downgrading",
        hint="`stellarbase rollback` returns to a release installed before; to install an "
        "older release anyway add --allow-downgrade (migrations are not undone)",
        code=ExitCode.UPGRADE,
    )


def check_rollback_allowed(paths: HostPaths, version: str) -> None:
    if version in revoked_releases(paths):
        raise StellarError(
            f"release {version} is revoked: a signed newer release withdrew it",
            hint="roll back to another installed release with --to, or stay",
            code=ExitCode.UPGRADE,
        )


def remember(
    paths: HostPaths,
    *,
    revoked: Iterable[str],
    key_override: dict[str, Any] | None,
    action: str,
    version: str,
) -> None:
    """After a bundle was installed: keep its revocations, and its key override if any."""
    record = load_record(paths)
    record["revoked"] = sorted({*revoked_releases(paths), *revoked}, key=_sortable)
    if key_override is not None:
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        record["key_override"] = {**key_override, "action": action, "version": version, "at": at}
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    write_atomic(paths.state_dir / RECORD, text.encode(), mode=0o644)


def status_lines(paths: HostPaths, override_now: dict[str, Any] | None) -> list[str]:
    """What `status` says about release trust."""
    record = load_record(paths)
    lines = []
    used = record.get("key_override")
    if isinstance(used, dict):
        keys = ", ".join(str(k) for k in used.get("keys", []))
        lines.append(
            f"release key: OVERRIDDEN by {used.get('file')} (keys {keys}) for "
            f"{used.get('action')} of {used.get('version')} at {used.get('at')}"
        )
    else:
        lines.append("release key: built-in")
    if override_now is not None:
        lines.append(
            f"release key override set in this environment: {override_now['file']} "
            f"(keys {', '.join(override_now['keys'])})"
        )
    if revoked := revoked_releases(paths):
        lines.append("revoked releases: " + ", ".join(revoked))
    return lines


def _sortable(version: str) -> tuple[Any, ...]:
    return version_key(version) if _VERSION.fullmatch(version) else (0, 0, 0, False, version)
