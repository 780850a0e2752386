"""Secret values out of error messages: the second line of defence of config errors.

The config loader (stellarbase.config) writes its messages so that they never show a
secret's input; this blanks any secret value, and any URL password, that a check quoting
what it was given (a URL, a value next to a secret) still let through.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from stellarbase.errors import StellarError

REDACTED = "[redacted]"
# The password part of a URL's user info: scheme://user:PASSWORD@host
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*):[^@\s/]*@")
# Shorter secret values are not searched for: they would blank out ordinary words.
MIN_REDACTED_LENGTH = 3


def redact_error(exc: StellarError, secrets: Iterable[str]) -> StellarError:
    """The same error without any of `secrets` nor a URL's password in its text."""
    values = sorted({s for s in secrets if len(s) >= MIN_REDACTED_LENGTH}, key=len, reverse=True)

    def clean(text: str) -> str:
        text = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
        for value in values:
            text = text.replace(value, REDACTED)
        return text

    cleaned = StellarError(clean(exc.message), hint=clean(exc.hint), code=exc.code)
    return cleaned.with_details([clean(line) for line in exc.details])


def values_at(data: Mapping[str, Any], paths: Iterable[tuple[str, ...]]) -> set[str]:
    """Every way the values under these key paths of `data` may be printed: each scalar
    (str and repr), and each list or mapping whole, at any depth."""
    found: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, Mapping):
            found.update({str(value), repr(value)})
            for item in value.values():
                collect(item)
        elif isinstance(value, list | tuple | set):
            found.update({str(value), repr(value)})
            for item in value:
                collect(item)
        elif hasattr(value, "get_secret_value"):
            collect(value.get_secret_value())
        elif value is not None:
            found.update({str(value), repr(value)})

    for path in paths:
        node: Any = data
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        collect(node)
    return found
