"""`config show` (the merged configuration, secrets left out, and where each key came
from) and `config schema` (the JSON Schema of the site config file)."""

from __future__ import annotations

import json

from stellarbase import config as cfg
from stellarbase.configload import LoadedConfig
from stellarbase.result import Result


def show(loaded: LoadedConfig) -> Result:
    """As text, the config as YAML; as JSON, the config and each key's source."""
    import yaml

    data = cfg.public_dict(loaded.config)
    text = yaml.safe_dump(data, sort_keys=False)
    shown = {"config": data, "sources": loaded.sources}
    return Result("config show", shown, tuple(text.splitlines()), steps=None)


def schema() -> Result:
    """As text, the JSON Schema itself, for editors and CI linting."""
    found = cfg.json_schema()
    text = json.dumps(found, indent=2)
    return Result("config schema", found, tuple(text.splitlines()), steps=None)
