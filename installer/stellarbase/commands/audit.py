"""`audit`: the audit log, who ran what on which host and whether it worked."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from stellarbase import audit
from stellarbase.result import Result


def audit_command(
    conninfo: str, password: str | None, *, since: datetime | None, limit: int
) -> Result:
    """The rows as a table for people; as a list under "rows" in JSON."""
    rows = audit.read(conninfo, password, since=since, limit=limit)
    lines = [
        f"{r.at.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}  {r.outcome:<7}  {r.action:<16}  "
        f"{r.actor}@{r.host}  {r.correlation_id}  {json.dumps(r.details, sort_keys=True)}"
        for r in rows
    ]
    if not rows:
        lines = ["no audit rows" + (f" since {since.isoformat()}" if since else "")]
    return Result("audit", {"rows": [r.as_dict() for r in rows]}, tuple(lines))
