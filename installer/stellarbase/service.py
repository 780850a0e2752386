"""`stellarbase run api|worker|agent|inference`: what every unit starts.

Reads the unit's settings file (secrets from the environment), then runs the HTTP service
(`service_runtime.Service`) or, for `agent`, the host agent (`agent.runtime.Agent`) in the
foreground until SIGTERM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import ValidationError

from stellarbase import log as logsetup
from stellarbase.errors import ExitCode, StellarError
from stellarbase.files import read_text
from stellarbase.service_runtime import Service
from stellarbase.service_settings import ServiceSettings

NOT_INSTALLED = "run `stellarbase install` first, or pass --settings"
REWRITE = "re-run `stellarbase install` to rewrite it"


def load_settings(path: Path) -> ServiceSettings:
    text = read_text(path, "settings file", missing=NOT_INSTALLED, unreadable=REWRITE,
                     code=ExitCode.CONFIG)  # fmt: skip
    try:
        return ServiceSettings.model_validate(json.loads(text)).with_secrets(os.environ)
    except (ValueError, ValidationError) as exc:
        raise StellarError(
            f"{path}: unreadable service settings ({exc.__class__.__name__})",
            hint=REWRITE,
            code=ExitCode.CONFIG,
        ) from None


def run_service(name: str, settings_path: Path, instance: int | None) -> None:
    settings = load_settings(settings_path)
    if name == "inference":  # one settings file for every unit; each unit has its own $PORT
        port = os.environ.get("PORT", "")
        if not port.isdigit():
            raise StellarError(
                "inference needs its port in $PORT",
                hint="the stellarbase-inference@ units set it from /etc/stellarbase/inference/",
                code=ExitCode.CONFIG,
            )
        settings = settings.model_copy(update={"port": int(port)})
    if settings.service != name:
        raise StellarError(
            f"{settings_path} holds settings of {settings.service}, not {name}",
            hint=f"pass --settings with the {name} file",
            code=ExitCode.CONFIG,
        )
    import sys

    logsetup.setup(settings.log_level, sys.stdout)
    logsetup.bind_correlation_id()
    if name == "agent":
        from stellarbase.agent.runtime import Agent

        Agent(settings).serve()
    else:
        Service(settings, instance).serve()
