"""What `stellarbase support-bundle` collects, and how it scrubs secrets out of it.

Each part is collected on its own: a part that fails (no config, no database, no
journalctl) leaves its error in summary.json and the others go on, because a broken host is
when a bundle is wanted. Before anything is written, every text is scrubbed of each secret
value the site config, the environment or the credential files hold, in each form a log or
a config file may spell it (see `spellings`); summary.json, the bundle's manifest, lists
every redaction by file, form and count, never the value.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import re
import shlex
import shutil
import socket
import tarfile
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from stellarbase import __version__, configload, envfile, install_state, installed_config
from stellarbase import config as cfg
from stellarbase.errors import ExitCode, StellarError, one_line
from stellarbase.paths import HostPaths
from stellarbase.proc import BASE_ENV, run, running_as_root

REDACTED = "<redacted>"
AUDIT_ROWS = 200
JOURNAL_TIMEOUT = 30.0
# One assignment of an Environment= line: "NAME=value with spaces" or NAME=value.
_ASSIGNMENT = re.compile(r'"([A-Za-z_][A-Za-z0-9_]*)=([^"]*)"|([A-Za-z_][A-Za-z0-9_]*)=(\S*)')


@dataclass(frozen=True)
class Request:
    """What to collect: the site config as other commands take it, and where to write."""

    site_file: Path | None = None
    sets: tuple[str, ...] = ()
    tier: str | None = None
    journal_lines: int = 200
    destination: Path | None = None


@dataclass
class Collected:
    members: dict[str, str] = field(default_factory=dict)  # name in the bundle → text
    errors: dict[str, str] = field(default_factory=dict)  # part → why it is missing
    secrets: dict[str, str] = field(default_factory=dict)  # every spelling → its form

    def add_json(self, name: str, data: Any) -> None:
        self.members[name] = json.dumps(data, indent=2, default=str) + "\n"

    def add_secret(self, value: str | None) -> None:
        if value:
            for spelling, form in spellings(value).items():
                self.secrets.setdefault(spelling, form)

    @contextmanager
    def guard(self, part: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # any failure of one part is recorded; the bundle goes on
            self.errors[part] = describe(exc)


def refuse_unprivileged(paths: HostPaths) -> None:
    if paths.live and not running_as_root():
        raise StellarError(
            "the support bundle reads root-only files (the secrets it must redact, the journal)",
            hint="run it with sudo, or aim it at a test root with --root DIR",
            code=ExitCode.HOST,
        )


def choose_destination(given: Path | None, created: datetime) -> Path:
    """The path given, or the default name in the directory given or the current one."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    name = f"stellarbase-support-{host}-{created:%Y%m%dT%H%M%SZ}.tar.gz"
    if given is None:
        return Path.cwd() / name
    path = given / name if given.is_dir() else given
    if not path.parent.is_dir():
        raise StellarError(
            f"{path.parent}: no such directory for the bundle",
            hint="give --output-file an existing directory or a file in one",
            code=ExitCode.USAGE,
        )
    return path.absolute()


def collect(paths: HostPaths, request: Request) -> Collected:
    found = Collected()
    site: configload.LoadedConfig | None = None
    with found.guard("config"):
        site = installed_config.load_site(
            paths, request.site_file, list(request.sets), request.tier
        )
        found.add_json("config.json", redacted_config(site))
    gather_secrets(found, paths, request, site)
    collect_checks(found, paths, request, site)
    with found.guard("status"):
        from stellarbase.commands.status import status

        found.add_json("status.json", dict(status(paths).data))
    with found.guard("state"):
        found.members["state.json"] = paths.state_file.read_text(errors="replace")
    with found.guard("units"):
        found.members |= unit_files(paths)
    with found.guard("journal"):
        units = list(install_state.load(paths.state_file).units)
        collect_journal(found, paths, units, request.journal_lines)
    with found.guard("versions"):
        found.add_json("versions.json", versions(paths))
    with found.guard("audit"):
        found.add_json("audit.json", audit_tail(found, paths, site))
    return found


def redacted_config(loaded: configload.LoadedConfig) -> dict[str, Any]:
    """The resolved config with each secret that is set shown as REDACTED, and its sources."""
    data = loaded.config.model_dump(mode="json")
    for section, key in cfg.SECRET_KEYS:
        part = data.get(section)
        if isinstance(part, dict) and part.get(key) is not None:
            part[key] = REDACTED
    site_file = str(loaded.site_file) if loaded.site_file else None
    return {"site_file": site_file, "config": data, "sources": loaded.sources}


def collect_checks(
    found: Collected, paths: HostPaths, request: Request, site: configload.LoadedConfig | None
) -> None:
    """preflight.json and doctor.json: the fields `preflight -o json` and `doctor -o json`
    print under "data"."""
    from stellarbase.commands.doctor import doctor, preflight

    with found.guard("preflight"):
        # Without a site config, preflight asks what `stellarbase preflight` asks: can this
        # host take the tier defaults?
        loaded = site or configload.load_config(sets=list(request.sets), tier=request.tier)
        for value in cfg.secrets_env(loaded.config).values():
            found.add_secret(value)
        result = preflight(loaded, paths, [])
        used = "the site config" if site else "the tier defaults (the site config did not load)"
        found.add_json("preflight.json", {**result.as_dict(), "config": used})
    if site is None:
        found.errors["doctor"] = "not run: it checks the site config, which did not load"
        return
    with found.guard("doctor"):
        # Off the live system, `systemctl show` would describe this machine's units instead.
        skip = [] if paths.live else ["units"]
        result = doctor(site, paths, skip)
        found.add_json("doctor.json", result.as_dict())


def unit_files(paths: HostPaths) -> dict[str, str]:
    """The installer's units and every drop-in, secret-named Environment= values redacted."""
    out: dict[str, str] = {}
    for path in sorted(paths.unit_dir.glob("stellarbase*")):
        if path.is_symlink():  # a masked unit points at /dev/null
            out[f"units/{path.name}"] = f"# a symlink to {os.readlink(path)}\n"
        elif path.is_dir() and path.name.endswith(".d"):
            for conf in sorted(path.glob("*.conf")):
                out[f"units/{path.name}/{conf.name}"] = redact_environment(
                    conf.read_text(errors="replace")
                )
        elif path.is_file():
            out[f"units/{path.name}"] = redact_environment(path.read_text(errors="replace"))
    return out


def redact_environment(text: str) -> str:
    """Unit text with the value of each Environment= assignment whose name names a secret
    redacted: an admin's drop-in may carry credentials the site config knows nothing of."""
    from stellarbase.audit import is_secret_name

    def redact(match: re.Match[str]) -> str:
        quoted = match[1] is not None
        name = match[1] if quoted else match[3]
        if not is_secret_name(name):
            return match[0]
        return f'"{name}={REDACTED}"' if quoted else f"{name}={REDACTED}"

    lines = []
    for line in text.splitlines(keepends=True):
        key, sep, rest = line.partition("=")
        if sep and key.strip() == "Environment":
            line = key + sep + _ASSIGNMENT.sub(redact, rest)
        lines.append(line)
    return "".join(lines)


def collect_journal(found: Collected, paths: HostPaths, units: list[str], lines: int) -> None:
    """The last `lines` journal lines of each unit (those the state file names)."""
    if not paths.live:
        found.errors["journal"] = f"not collected: {paths.root} is not the live system"
        return
    if shutil.which("journalctl", path=BASE_ENV["PATH"]) is None:
        found.errors["journal"] = "not collected: journalctl is not installed"
        return
    for unit in units:
        with found.guard(f"journal:{unit}"):
            argv = ["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "short-iso"]
            out = run(argv, check=False, timeout=JOURNAL_TIMEOUT)
            found.members[f"journal/{unit}.log"] = out.stdout
            if out.returncode != 0:
                found.errors[f"journal:{unit}"] = (
                    f"journalctl exited {out.returncode}: {out.stderr.strip()[-300:]}"
                )


def versions(paths: HostPaths) -> dict[str, Any]:
    found: dict[str, Any] = {
        "stellarbase": __version__,
        "os_release": attempt(lambda: os_release(paths)),
        "kernel": platform.release(),
        "releases": attempt(lambda: sorted(p.name for p in paths.releases.iterdir())),
        "current": attempt(lambda: os.readlink(paths.current)),
    }
    if not paths.live:
        away = f"not collected: {paths.root} is not the live system"
        return found | {"systemd": away, "postgresql": away, "redis": away}
    from stellarbase import localdeps

    found["systemd"] = attempt(lambda: run(["systemctl", "--version"]).stdout.split("\n")[0])
    found["postgresql"] = attempt(lambda: _server_versions(localdeps.find_postgres))
    found["redis"] = attempt(lambda: _server_versions(localdeps.find_redis))
    return found


def os_release(paths: HostPaths) -> dict[str, str]:
    from stellarbase.preflight.host import OS_RELEASE, parse_os_release

    for name in OS_RELEASE:
        path = paths.at(name)
        if path.exists():
            return parse_os_release(path.read_text(errors="replace"))
    raise FileNotFoundError(2, "no os-release", str(paths.at(OS_RELEASE[0])))


def _server_versions(find: Callable[[], tuple[Any, list[Any]]]) -> list[str]:
    _, every = find()
    return [f"{b.version_text or '?'} at {b.path}" for b in every]


def audit_tail(found: Collected, paths: HostPaths, site: configload.LoadedConfig | None) -> Any:
    """The newest AUDIT_ROWS audit rows, oldest first."""
    from stellarbase import audit

    if site is None:
        raise StellarError("not read: the database is named by the site config, which did not load")
    conninfo, password = installed_config.postgres_target(site, paths)
    found.add_secret(password)
    rows = audit.read(conninfo, password, limit=AUDIT_ROWS)
    return {"database": conninfo, "rows": [row.as_dict() for row in rows]}


# --- secrets --------------------------------------------------------------------------


def gather_secrets(
    found: Collected, paths: HostPaths, request: Request, site: configload.LoadedConfig | None
) -> None:
    """Every secret value: of the loaded config, and, in case it did not load, of the site
    file and the environment as written; and of the credential files of the host."""
    values: list[str | None] = []
    if site is not None:
        values += cfg.secrets_env(site.config).values()
    values += [os.environ.get(cfg.secret_env_name(s, k)) for s, k in cfg.SECRET_KEYS]
    for site_file in {request.site_file, paths.config_file} - {None}:
        values += raw_site_secrets(site_file)
    for path in (paths.secrets_file, paths.admin_secrets_file, paths.redis_auth):
        try:
            values += envfile.loose_values(path.read_text(errors="replace"))
        except FileNotFoundError:
            continue
        except OSError as exc:
            found.errors[f"scrub:{path.name}"] = f"{describe(exc)}: its values are not scrubbed"
    for value in values:
        found.add_secret(value)


def raw_site_secrets(path: Path | None) -> list[str]:
    if path is None or not path.is_file():
        return []
    try:
        data = configload.read_site_file(path).data
    except StellarError:
        return []
    sections = [(data.get(section), key) for section, key in cfg.SECRET_KEYS]
    return [str(part[key]) for part, key in sections if isinstance(part, dict) and part.get(key)]


# Base64 spans shorter than this are left alone: they would match by chance.
MIN_BASE64_SPAN = 8


def spellings(value: str) -> dict[str, str]:
    """How a secret may appear in collected text, each with the name of its form: as is;
    JSON-, env-file-, SQL-, shell- and Python-quoted; URL-encoded (either hex case, + for
    space); and base64 (standard and URL alphabets) at each of the three byte alignments,
    so that it is found inside a longer encoded string such as `Basic base64(user:pass)`."""
    forms: dict[str, str] = {}

    def add(form: str, *texts: str) -> None:
        for text in texts:
            if text:
                forms.setdefault(text, form)

    add("plain", value)
    add("json-escaped", json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1])
    add("quoted", envfile.env_escape(value), value.replace("'", "''"), shlex.quote(value),
        repr(value)[1:-1])  # fmt: skip
    for encoded in (urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)):
        add("url-encoded", encoded, re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), encoded))
    raw = value.encode()
    for offset in range(3):
        first = -(-offset * 8 // 6)  # the first character made of the value's bits only
        last = (offset + len(raw)) * 8 // 6  # one past the last such character
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            span = encode(bytes(offset) + raw).decode()[first:last]
            if len(span) >= MIN_BASE64_SPAN:
                add("base64", span)
    return forms


def scrub(
    text: str,
    secrets: Iterable[str] | dict[str, str],
    name: str = "",
    redactions: list[dict[str, Any]] | None = None,
) -> str:
    """`text` with each occurrence of every secret spelling replaced by REDACTED, longest
    first, so a secret that contains another goes as a whole. With `redactions`, one entry
    per file and form is added: {"file", "form", "count"}, never the value."""
    forms = secrets if isinstance(secrets, dict) else dict.fromkeys(secrets, "plain")
    counts: dict[str, int] = {}
    for spelling in sorted(forms, key=len, reverse=True):
        found = text.count(spelling) if spelling else 0
        if found:
            text = text.replace(spelling, REDACTED)
            counts[forms[spelling]] = counts.get(forms[spelling], 0) + found
    if redactions is not None:
        for form, count in sorted(counts.items()):
            redactions.append({"file": name, "form": form, "count": count})
    return text


# --- the bundle -----------------------------------------------------------------------


def summary(
    paths: HostPaths,
    request: Request,
    found: Collected,
    created: datetime,
    redactions: list[dict[str, Any]],
) -> dict[str, Any]:
    """The bundle's manifest."""
    return {
        "stellarbase": __version__,
        "created": created.isoformat(),
        "host": socket.gethostname(),
        "root": str(paths.root),
        "journal_lines": request.journal_lines,
        "members": sorted([*found.members, "summary.json"]),
        "errors": found.errors,
        "redactions": redactions,
    }


def pack(texts: dict[str, str], top: str, mtime: float) -> bytes:
    """A gzipped tar of `texts` under the directory `top`, every member 0600 root:root."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in sorted(texts.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o600, int(mtime)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def attempt(get: Callable[[], Any]) -> Any:
    """What `get` returns, or its error as {"error": …}: one missing fact spoils no other."""
    try:
        return get()
    except Exception as exc:  # any failure is the fact to report
        return {"error": describe(exc)}


def describe(exc: BaseException) -> str:
    if isinstance(exc, StellarError):
        return exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{exc.__class__.__name__}: {one_line(exc)}"
