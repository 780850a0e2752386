"""Configuration: tier defaults ⊕ site file ⊕ --set ⊕ STELLARBASE_* env → one frozen model.

Every leaf value remembers which layer gave it, so an error names the file (or flag, or
variable), the key and a fix. The model itself is in `config`.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

from stellarbase import redact, resources, values
from stellarbase.config import (
    ENV_PREFIX,
    NON_CONFIG_ENV,
    Config,
    Tier,
    require_secrets,
    secret_env_name,
)
from stellarbase.errors import ExitCode, StellarError
from stellarbase.files import read_text


@dataclass(frozen=True)
class Layer:
    """One source of settings: a name for messages and a nested mapping."""

    name: str
    data: dict[str, Any]


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    sources: dict[str, str]  # dotted key (and each prefix) → the layer that set it last
    site_file: Path | None


def tier_defaults(tier: str) -> dict[str, Any]:
    # yaml is imported where it is used: a running service reads JSON settings only.
    import yaml

    path = resources.config_dir() / "tiers" / f"{tier}.yaml"
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


NO_FILE = "pass an existing file to --config"
UNREADABLE = "check the path and its permissions (it must be a readable YAML file)"


def read_site_file(path: Path) -> Layer:
    import yaml

    text = read_text(path, "file", missing=NO_FILE, unreadable=UNREADABLE, code=ExitCode.CONFIG)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise StellarError(
            f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})",
            hint="fix the YAML syntax; `stellarbase config schema` shows the expected shape",
            code=ExitCode.CONFIG,
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise StellarError(
            f"{path}: the top level must be a mapping of keys, not {type(data).__name__}",
            hint="see config/site.example.yaml",
            code=ExitCode.CONFIG,
        )
    return Layer(str(path), data)


def parse_sets(items: list[str]) -> Layer:
    """--set KEY=VALUE layers. Secrets are refused: argv is readable by every local user
    (ps, /proc/PID/cmdline) and an upgrade would hand it on to the release's binary."""
    data: dict[str, Any] = {}
    for number, item in enumerate(items, start=1):
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*", key):
            # Never echo the argument: its value part may be a secret.
            raise StellarError(
                f"--set (argument {number} of --set): expected KEY=VALUE with a dotted "
                "lower-case key",
                hint="for example --set worker.instances=3",
                code=ExitCode.CONFIG,
            )
        _refuse_control(raw, f"--set {key}")
        value = _scalar(raw)
        one: dict[str, Any] = {}
        _put(one, key.split("."), value)
        for path in secret_paths():
            if _holds(one, path):  # also --set 'postgres={password: ...}'
                raise secret_on_command_line(".".join(path))
        _put(data, key.split("."), value)
    return Layer("--set", data)


def secret_on_command_line(dotted: str) -> StellarError:
    section, _, key = dotted.partition(".")
    return StellarError(
        f"--set {dotted}: secrets are not taken on the command line (every local user can "
        "read a command line)",
        hint=f"put {dotted} in the site file (chmod 600) or export "
        f"{secret_env_name(section, key)}; install keeps it in secrets.env",
        code=ExitCode.CONFIG,
    )


@functools.cache
def secret_paths() -> tuple[tuple[str, ...], ...]:
    """The key path of every SecretStr field of the config model."""
    found: list[tuple[str, ...]] = []

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, field in model.model_fields.items():
            args = [field.annotation, *getattr(field.annotation, "__args__", ())]
            if SecretStr in args:
                found.append((*prefix, name))
            for arg in args:
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    walk(arg, (*prefix, name))

    walk(Config, ())
    return tuple(found)


def _holds(data: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = data
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def parse_env(env: Mapping[str, str]) -> list[Layer]:
    layers = []
    secret_names = {"__".join(path).upper() for path in secret_paths()}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower().split("__")
        _refuse_control(env[name], f"environment variable {name}")
        data: dict[str, Any] = {}
        # A secret is taken as written: YAML would turn 0123 into 83, "a: b" into a mapping.
        raw = name[len(ENV_PREFIX) :] in secret_names
        _put(data, key, env[name] if raw else _scalar(env[name]))
        layers.append(Layer(f"environment variable {name}", data))
    return layers


def _refuse_control(raw: str, where: str) -> None:
    """YAML would fold a line break into a space: refuse it before it is parsed."""
    found = values.control_character(raw)
    if found:
        raise StellarError(
            f"{where}: the value contains a control character ({found})",
            hint="every value lands in a unit file or a server setting on one line: "
            "remove line breaks and other control characters",
            code=ExitCode.CONFIG,
        )


def load_config(
    *,
    site_file: Path | None = None,
    sets: list[str] | None = None,
    tier: str | None = None,
    env: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Merge every layer and validate; raise StellarError naming the layer and key."""
    env = os.environ if env is None else env
    upper: list[Layer] = []
    if site_file is not None:
        upper.append(read_site_file(site_file))
    upper.append(parse_sets(sets or []))
    upper.extend(parse_env(env))
    if tier is not None:
        upper.append(Layer("--tier", {"tier": tier}))

    chosen, chosen_from = Tier.PILOT.value, "the default tier"
    for layer in upper:
        if "tier" in layer.data:
            chosen, chosen_from = layer.data["tier"], layer.name
    if chosen not in {t.value for t in Tier}:
        raise StellarError(
            f"{chosen_from}: tier: unknown tier {chosen!r}",
            hint="choose one of: " + ", ".join(t.value for t in Tier),
            code=ExitCode.CONFIG,
        )

    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer in [Layer(f"tier defaults ({chosen})", tier_defaults(chosen)), *upper]:
        _merge(merged, layer.data, layer.name, sources, ())
    try:
        config = Config.model_validate(merged)
        require_secrets(config, sources)
    except ValidationError as exc:
        secrets = redact.values_at(merged, secret_paths())
        raise redact.redact_error(_explain(exc, sources), secrets) from None
    except StellarError as exc:
        raise redact.redact_error(exc, redact.values_at(merged, secret_paths())) from None
    return LoadedConfig(config, sources, site_file)


def _merge(
    into: dict[str, Any],
    data: Mapping[str, Any],
    layer: str,
    sources: dict[str, str],
    prefix: tuple[str, ...],
) -> None:
    for key, value in data.items():
        path = (*prefix, str(key))
        dotted = ".".join(path)
        sources[dotted] = layer
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, layer, sources, path)
        elif isinstance(value, Mapping):
            into[key] = {}
            _merge(into[key], value, layer, sources, path)
        else:
            into[key] = value


def _explain(exc: ValidationError, sources: Mapping[str, str]) -> StellarError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
    dotted = ".".join(loc)
    layer = _source_of(dotted, sources)
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {'.'.join([*loc[:-1], close[0]])!r}? " if close else ""
        return StellarError(
            f"{layer}: {dotted}: unknown key",
            hint=hint + "`stellarbase config schema` lists every key",
            code=ExitCode.CONFIG,
        )
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    hint = _hint_for(loc)
    if any(tuple(loc[: len(path)]) == path for path in secret_paths()):
        shown = ""  # a secret's value is never shown, whatever its type
        hint = (
            f"a secret is one line of text: quote it in YAML ({loc[-1]}: '...'); "
            "an environment variable is taken as written"
        )
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a rule across keys: name the layer of the first key the message mentions
        keys = re.findall(
            r"\b(?:api|agent|worker|local|postgres|redis|inference|backup)(?:\.[a-z_]+)*", msg
        )
        named = [sources[k] for k in keys if k in sources]
        # The user's own layer is the likelier culprit than the tier defaults.
        named.sort(key=lambda name: name.startswith("tier defaults"))
        layer = named[0] if named else "configuration"
        return StellarError(
            f"{layer}: {msg}",
            hint="`stellarbase config show -o json` shows where each key comes from",
            code=ExitCode.CONFIG,
        )
    key = dotted
    return StellarError(
        f"{layer}: {key}: {msg}{shown}",
        hint=hint,
        code=ExitCode.CONFIG,
    )


def _source_of(dotted: str, sources: Mapping[str, str]) -> str:
    parts = dotted.split(".") if dotted else []
    while parts:
        found = sources.get(".".join(parts))
        if found:
            return found
        parts.pop()
    return "configuration"


def _hint_for(loc: list[str]) -> str:
    leaf = loc[-1] if loc else ""
    if leaf == "port" or not loc:
        return "ports are integers 1-65535 and must not overlap; see `stellarbase config schema`"
    return f"fix {'.'.join(loc)}; `stellarbase config schema` shows its type and allowed values"


def _known_keys(loc: list[str]) -> list[str]:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type)]
        model = next(
            (a for a in [ann, *args] if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if model is None:
            return []
    return list(model.model_fields)


def _put(data: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def _scalar(raw: str) -> Any:
    import yaml

    if re.fullmatch(r"\d+(:\d+)+", raw.strip()):
        return raw  # a time like 02:30, not YAML 1.1's base-60 integer
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw
