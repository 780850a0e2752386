"""`version`: this release, and with -o json the schema range its migrations span."""

from __future__ import annotations

from stellarbase import __version__
from stellarbase.result import Format, Result


def version(output: Format) -> Result:
    """`version -o json` stays flat, not enveloped: other installed releases' binaries read
    its `version`, `schema` and `service_users` (stellarbase.releases), old ones included."""
    if output == Format.TEXT:
        return Result("version", {"version": __version__}, (__version__,), steps=None)
    from stellarbase import migrate

    schema = migrate.schema_range(migrate.load_migrations()).as_dict()
    # service_users: each service runs as its own user (a rollback to a release without
    # it first hands the data back to `stellarbase`).
    data = {"version": __version__, "schema": schema, "service_users": True}
    return Result("version", data, (__version__,), steps=None, flat=True)
