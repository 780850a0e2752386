"""The configuration of the installed site: stellarbase.yaml plus the secrets in secrets.env.

Commands that act on a running site (migrate, audit, backup) read it back from here when
no --config is given. secrets.env is root's alone (0600): the services get their own
credentials from systemd instead (see `service.credentials`).
"""

from __future__ import annotations

import os
from pathlib import Path

from stellarbase import config as cfg
from stellarbase import configload, install_state
from stellarbase.envfile import read_env_file
from stellarbase.errors import ExitCode, StellarError
from stellarbase.paths import HostPaths


def load_site(
    paths: HostPaths, site_file: Path | None, sets: list[str] | None, tier: str | None
) -> configload.LoadedConfig:
    """The site file given with --config (secrets from the environment), else the installed one."""
    if site_file is not None:
        return configload.load_config(site_file=site_file, sets=sets or [], tier=tier)
    return load_installed(paths, sets, tier)


def load_installed(
    paths: HostPaths, sets: list[str] | None, tier: str | None
) -> configload.LoadedConfig:
    """stellarbase.yaml as the site file, with secrets.env layered over the environment."""
    if not paths.config_file.is_file():
        raise StellarError(
            f"{paths.config_file}: no installed configuration",
            hint="run `stellarbase install` first, or pass the site file with --config",
            code=ExitCode.CONFIG,
        )
    site = configload.read_site_file(paths.config_file).data
    secrets = _for_site(read_env_file(paths.secrets_file), site)
    return configload.load_config(
        site_file=paths.config_file, sets=sets or [], tier=tier, env={**os.environ, **secrets}
    )


def postgres_target(loaded: configload.LoadedConfig, paths: HostPaths) -> tuple[str, str | None]:
    """The URL (no password in it) and the password of the site's PostgreSQL."""
    pg = loaded.config.postgres
    if pg is not None:
        return pg.url, pg.password.get_secret_value() if pg.password else None
    # A PostgreSQL the installer runs itself is not in the site file; install recorded it.
    url = _installed_database_url(paths)
    if url:
        name = cfg.secret_env_name("postgres", "password")
        return url, read_env_file(paths.secrets_file).get(name) or os.environ.get(name)
    where = loaded.site_file or "the configuration"
    raise StellarError(
        f"{where}: postgres is not configured",
        hint="set postgres.url in the site file and export STELLARBASE_POSTGRES__PASSWORD",
        code=ExitCode.CONFIG,
    )


def _for_site(secrets: dict[str, str], site: dict[str, object]) -> dict[str, str]:
    """The secrets of the sections the site file configures.

    secrets.env also holds the passwords of the servers the installer runs locally, whose
    sections the site file leaves empty: loaded as config they would be half a section.
    """
    section_of = {cfg.secret_env_name(s, k): s for s, k in cfg.SECRET_KEYS}
    return {
        name: value
        for name, value in secrets.items()
        if name not in section_of or site.get(section_of[name]) is not None
    }


def _installed_database_url(paths: HostPaths) -> str:
    try:
        return install_state.load(paths.state_file).database_url
    except (OSError, ValueError, TypeError):
        return ""  # no readable state: nothing installed here to fall back on
