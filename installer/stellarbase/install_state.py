"""The state file: what this installer owns on the host and what each unit last ran with."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stellarbase.files import write_atomic


@dataclass
class State:
    version: str = ""
    files: list[str] = field(default_factory=list)  # host paths we created, in creation order
    units: dict[str, str] = field(default_factory=dict)  # unit → digest of its inputs when started
    ports: dict[str, int] = field(default_factory=dict)  # unit → port it listens on
    config_source: str = ""
    database_url: str = ""  # where the audit log lives (no password)
    features: dict[str, bool] = field(default_factory=dict)  # e.g. vector: semantic search on
    previous_version: str = ""  # the release before the last upgrade: what rollback returns to

    def own(self, path: str) -> bool:
        """Record a path as ours; True when that is new."""
        if path in self.files:
            return False
        self.files.append(path)
        return True


def load(path: Path) -> State:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return State()
    known = State.__dataclass_fields__
    return State(**{k: v for k, v in data.items() if k in known})


def save(path: Path, state: State) -> None:
    text = json.dumps(asdict(state), indent=2, sort_keys=True) + "\n"
    write_atomic(path, text.encode(), mode=0o640)
