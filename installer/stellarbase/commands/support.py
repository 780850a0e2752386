"""`support-bundle`: one tar.gz with what support asks for first, secrets out (the
collecting and scrubbing is `stellarbase.support`'s)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from stellarbase.files import write_atomic
from stellarbase.paths import HostPaths
from stellarbase.result import Result
from stellarbase.support import (
    Request,
    choose_destination,
    collect,
    pack,
    refuse_unprivileged,
    scrub,
    summary,
)


def support_bundle(paths: HostPaths, request: Request) -> Result:
    """Collect every part, scrub secrets out of all of it, write one 0600 tar.gz."""
    refuse_unprivileged(paths)
    created = datetime.now(UTC)
    destination = choose_destination(request.destination, created)
    found = collect(paths, request)
    redactions: list[dict[str, Any]] = []
    texts = {
        name: scrub(text, found.secrets, name, redactions) for name, text in found.members.items()
    }
    found.errors = {
        part: scrub(text, found.secrets, "summary.json", redactions)
        for part, text in found.errors.items()
    }
    texts["summary.json"] = (
        json.dumps(summary(paths, request, found, created, redactions), indent=2, default=str)
        + "\n"
    )
    top = destination.name.removesuffix(".tar.gz").removesuffix(".tgz")
    write_atomic(destination, pack(texts, top, created.timestamp()), mode=0o600)
    errors = found.errors
    failed = f"; errors recorded for {', '.join(sorted(errors))}" if errors else ""
    return Result(
        "support-bundle",
        {
            "path": str(destination),
            "members": sorted(texts),
            "errors": errors,
            "redactions": redactions,
        },
        (str(destination), f"{len(texts)} files, secrets redacted{failed}"),
    )
