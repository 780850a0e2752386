"""What a config must hold before install acts on it, beyond what the config model checks
alone: the settings each kind of dependency needs, and values read by tools or files of
the host (systemd's calendar parser, the kernel's privileged ports, TLS files, the
inference executable). Install, plan and preflight run it before anything else; it
imports little, so that the command line can refuse a config before loading the rest.
"""

from __future__ import annotations

import os
import shlex
import ssl
from pathlib import Path
from typing import Literal

from stellarbase import systemd, values
from stellarbase.config import DependencyMode
from stellarbase.configload import LoadedConfig
from stellarbase.errors import ExitCode, StellarError
from stellarbase.paths import HostPaths

UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
URL_EXAMPLES = {"postgres": "postgresql://USER@HOST:5432/DB", "redis": "redis://HOST:6379/0"}


def check_install(loaded: LoadedConfig, paths: HostPaths) -> None:
    """Raise a config error (exit 3) naming the key and where it was set; changes nothing."""
    config = loaded.config
    require_external_urls(loaded)
    where = config.backup.location.directory
    problem = values.repository_location_problem(where) if where is not None else None
    if problem:
        raise _error(loaded, "backup.repository", problem, "e.g. file:///srv/stellarbase-backups")
    if config.backup.enabled:
        problem = systemd.calendar_problem(config.backup.schedule)
        if problem:
            raise _error(
                loaded,
                "backup.schedule",
                f"{config.backup.schedule!r} is not an OnCalendar= expression: {problem}",
                "use a form `systemd-analyze calendar` accepts: daily, weekly, "
                "'Mon..Fri *-*-* 02:00', '*-*-* 00/6:00'",
            )
    if not paths.live:
        return  # the files are for another host: its ports, certificates and executables
    _check_privileged_ports(loaded)
    _check_tls_files(loaded)
    _check_inference_command(loaded)


def require_external_urls(loaded: LoadedConfig) -> None:
    """An external dependency is reached by its URL: without one there is nothing to use."""
    config = loaded.config
    deps: tuple[Literal["postgres", "redis"], ...] = ("postgres", "redis")
    for dep in deps:
        if config.mode_of(dep) != DependencyMode.EXTERNAL or getattr(config, dep) is not None:
            continue
        key = f"dependencies.{dep}" if getattr(config.dependencies, dep) else "dependencies.mode"
        raise _error(
            loaded,
            key,
            f"{dep} is external but {dep}.url is not set",
            f"set {dep}.url ({URL_EXAMPLES[dep]}) and export "
            f"STELLARBASE_{dep.upper()}__PASSWORD, or keep it on this host with "
            f"dependencies.{dep}=local (pilot)",
        )


def _check_privileged_ports(loaded: LoadedConfig) -> None:
    """The services run unprivileged: the kernel lets them bind only from this port up."""
    try:
        start = int(UNPRIVILEGED_PORT_START.read_text().strip())
    except (OSError, ValueError):
        start = 1024
    config = loaded.config
    ports = [*config.fixed_ports(), ("worker.port", config.worker.port)]
    ports.append(("inference.port", config.inference.port))
    for key, port in ports:
        if port < start:
            raise _error(
                loaded,
                key,
                f"{port} is a privileged port (below {start}) and the services run as an "
                "unprivileged user",
                "choose a port from 1024 up, and put a reverse proxy in front for a low one",
            )


def _check_tls_files(loaded: LoadedConfig) -> None:
    agent = loaded.config.agent
    if agent.remote_port is None or agent.tls_cert is None or agent.tls_key is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(agent.tls_cert, agent.tls_key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or exc.__class__.__name__
        raise _error(
            loaded,
            "agent.tls_cert",
            f"{agent.tls_cert} with {agent.tls_key} is no usable certificate and key ({reason})",
            "give PEM files of a certificate (chain) and its private key",
        ) from None


def _check_inference_command(loaded: LoadedConfig) -> None:
    from stellarbase.layout import DEFAULT_INFERENCE_COMMAND

    command = loaded.config.inference.command
    if command == DEFAULT_INFERENCE_COMMAND:
        return  # installed by this run
    executable = shlex.split(command)[0]
    if not os.access(executable, os.X_OK) or not Path(executable).is_file():
        raise _error(
            loaded,
            "inference.command",
            f"{executable} is not an executable file on this host",
            "install the inference server first, or fix the path",
        )


def _error(loaded: LoadedConfig, key: str, message: str, hint: str) -> StellarError:
    where = loaded.sources.get(key, "the configuration")
    return StellarError(f"{where}: {key}: {message}", hint=hint, code=ExitCode.CONFIG)
