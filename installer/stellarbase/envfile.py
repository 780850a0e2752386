"""systemd EnvironmentFile= files: the one place that reads and writes their syntax.

Values are written double quoted (a backslash escapes " \\ ` $) and read the way systemd
reads them: bare, 'single quoted' (taken literally) or "double quoted".
"""

from __future__ import annotations

import re
from pathlib import Path

from stellarbase.errors import ExitCode, StellarError
from stellarbase.files import read_text

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Inside double quotes systemd unescapes only these; any other backslash stays as it is.
_DOUBLE_QUOTE_ESCAPES = '"\\`$'


ROOT_ONLY = "run as root: the file is readable by root only"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value pairs of a systemd EnvironmentFile; a missing file has none."""
    text = read_text(path, "secrets", missing=None, unreadable=ROOT_ONLY, code=ExitCode.CONFIG)
    if text is None:
        return {}
    return parse_env_file(text, str(path))


def parse_env_file(text: str, name: str) -> dict[str, str]:
    """systemd EnvironmentFile= syntax, one assignment a line.

    Values are bare, 'single quoted' (taken literally) or "double quoted" (a backslash
    escapes " \\ ` $). Errors name the line, never its value: it may be a secret.
    """
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        key, sep, raw = stripped.partition("=")
        key = key.strip()
        value = _unquote(raw.strip()) if sep else None
        if value is None or not ENV_NAME.fullmatch(key):
            raise StellarError(
                f"{name}: line {number} is not KEY=value",
                hint="fix the line, or run `stellarbase install` again to rewrite the file",
                code=ExitCode.CONFIG,
            )
        values[key] = value
    return values


def _unquote(raw: str) -> str | None:
    """The value of one assignment, or None when its quotes do not close."""
    if raw[:1] == "'":
        end = raw.find("'", 1)
        return raw[1:end] if end != -1 and not raw[end + 1 :].strip() else None
    if raw[:1] != '"':
        return re.sub(r"\\(.)", r"\1", raw)
    out: list[str] = []
    i = 1
    while i < len(raw):
        char = raw[i]
        if char == "\\" and i + 1 < len(raw):
            follower = raw[i + 1]
            out.append(follower if follower in _DOUBLE_QUOTE_ESCAPES else char + follower)
            i += 2
            continue
        if char == '"':
            return "".join(out) if not raw[i + 1 :].strip() else None
        out.append(char)
        i += 1
    return None


def render_env_file(values: dict[str, str], header: str) -> str:
    lines = [f"{k}={quote(v)}\n" for k, v in sorted(values.items())]
    return f"# {header}\n" + "".join(lines)


def env_escape(value: str) -> str:
    """The value as written between systemd EnvironmentFile= (and Redis) double quotes: a
    backslash escapes " \\ ` $. Newlines cannot be written this way; config validation
    refuses them in secrets."""
    return re.sub(r'(["\\\\`$])', r"\\\1", value)


def quote(value: str) -> str:
    """The value double quoted, as render_env_file writes it."""
    return f'"{env_escape(value)}"'


def loose_values(text: str) -> list[str]:
    """The value of each `KEY=value` (env file) or `directive value` (redis-auth.conf) line,
    as written and unquoted: a file that no longer parses is scrubbed all the same."""
    values: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        key, sep, raw = stripped.partition("=")
        if not sep or not ENV_NAME.fullmatch(key.strip()):
            _, _, raw = stripped.partition(" ")
        raw = raw.strip()
        values += [raw, raw.strip("\"'"), _unquoted(raw)]
    return values


def _unquoted(raw: str) -> str:
    try:
        return parse_env_file(f"VALUE={raw}", "secret").get("VALUE", raw)
    except StellarError:
        return raw
