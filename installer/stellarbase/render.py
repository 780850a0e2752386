"""Pure rendering of unit files and config files from the validated config."""

from __future__ import annotations

import json
from dataclasses import dataclass

import jinja2
import yaml

from stellarbase import config as cfg
from stellarbase import resources
from stellarbase.paths import GROUP, USER, HostPaths

TARGET = "stellarbase.target"


@dataclass(frozen=True)
class UnitInstance:
    """A unit the installer runs: `template` is the file on disk (worker@.service)."""

    name: str
    template: str
    service: str
    port: int


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(resources.units_dir()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def unit_instances(config: cfg.Config) -> list[UnitInstance]:
    """Every service unit to run, in start order."""
    catalog = cfg.load_catalog().services
    out = [UnitInstance(catalog["agent"].unit, catalog["agent"].unit, "agent", config.agent.port)]
    out.append(UnitInstance(catalog["api"].unit, catalog["api"].unit, "api", config.api.port))
    template = catalog["worker"].unit
    for n, port in enumerate(config.worker_ports(), start=1):
        out.append(UnitInstance(template.replace("@", f"@{n}"), template, "worker", port))
    return out


def render_units(config: cfg.Config, paths: HostPaths) -> dict[str, str]:
    """Unit file name → content, for the target and every service template."""
    env = environment()
    catalog = cfg.load_catalog().services
    binary = str(paths.host_view(paths.current / "stellarbase"))
    out: dict[str, str] = {}
    for name, entry in catalog.items():
        settings = paths.host_view(paths.service_settings_dir / f"{name}.json")
        command = f"{name} --settings {settings}"
        if entry.instanced:
            command = f"{name} --instance %i --settings {settings}"
        svc = {
            "description": entry.description,
            "command": command,
            "limits": getattr(config, name).limits,
        }
        out[entry.unit] = env.get_template(f"{entry.unit}.j2").render(
            svc=svc,
            binary=binary,
            secrets_file=paths.host_view(paths.secrets_file),
            user=USER,
            group=GROUP,
            watchdog_seconds=config.health.watchdog_seconds,
        )
    wants = [u.name for u in unit_instances(config)]
    out[TARGET] = env.get_template(f"{TARGET}.j2").render(wants=wants)
    return out


def render_sysusers(paths: HostPaths) -> str:
    return (
        environment()
        .get_template("sysusers.conf.j2")
        .render(user=USER, home=paths.host_view(paths.state_dir))
    )


def render_site_config(config: cfg.Config) -> str:
    header = "# Resolved by `stellarbase install`; secrets live in secrets.env.\n"
    return header + yaml.safe_dump(cfg.public_dict(config), sort_keys=False)


def render_secrets(config: cfg.Config) -> str:
    lines = [f"{k}={_env_quote(v)}" for k, v in sorted(cfg.secrets_env(config).items())]
    return "# Credentials of the StellarBase services; never copy into unit files.\n" + "".join(
        line + "\n" for line in lines
    )


def render_service_settings(config: cfg.Config, name: cfg.ServiceName) -> str:
    settings = cfg.service_settings(config, name)
    return json.dumps(settings.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def _env_quote(value: str) -> str:
    # systemd EnvironmentFile= honours double quotes with backslash escapes.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
