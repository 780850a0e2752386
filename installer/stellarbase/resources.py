"""Find the data files (unit templates, tier defaults, catalog) in the source tree or binary."""

from __future__ import annotations

import sys
from pathlib import Path


def data_root() -> Path:
    """The directory that holds `units/` and `config/`.

    A PyInstaller binary unpacks them under `sys._MEIPASS`; from the source tree they sit
    two levels above the package (`installer/stellarbase/`).
    """
    bundled = getattr(sys, "_MEIPASS", None)
    if bundled:
        return Path(bundled)
    return Path(__file__).resolve().parents[2]


def units_dir() -> Path:
    return data_root() / "units"


def config_dir() -> Path:
    return data_root() / "config"


def is_frozen() -> bool:
    return bool(getattr(sys, "frozen", False))
