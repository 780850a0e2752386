"""The one subprocess wrapper: argv lists only, minimal env, stdin closed, a timeout."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

import structlog

from stellarbase.errors import ExitCode, StellarError

log = structlog.get_logger()

BASE_ENV = {
    "LANG": "C.UTF-8",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
}


class CommandError(StellarError):
    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        tail = stderr.strip().splitlines()[-5:]
        super().__init__(
            f"command failed with exit code {returncode}: {' '.join(argv)}"
            + (f": {tail[-1]}" if tail else ""),
            hint="run again with --debug for the full command output",
            code=ExitCode.APPLY,
        )
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.details = tail[:-1]


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    secrets: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run argv and return its output; raise CommandError on a non-zero exit when check."""
    shown = [_mask(a, secrets) for a in argv]
    log.debug("run", argv=shown)
    try:
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**BASE_ENV, **(env or {})},
            check=False,
        )
    except OSError as exc:
        raise _cannot_start(argv[0], exc) from None
    except subprocess.TimeoutExpired:
        raise StellarError(
            f"command timed out after {timeout:.0f}s: {' '.join(shown)}",
            hint="the host may be overloaded; run again with --debug",
            code=ExitCode.APPLY,
        ) from None
    if check and proc.returncode != 0:
        raise CommandError(shown, proc.returncode, _mask(proc.stderr, secrets))
    return proc


def _cannot_start(program: str, exc: OSError) -> StellarError:
    if isinstance(exc, FileNotFoundError):
        return StellarError(
            f"{program}: command not found", hint="install it or check PATH", code=ExitCode.HOST
        )
    return StellarError(
        f"cannot run {program}: {exc.strerror or exc}",
        hint="check that it is an executable file",
        code=ExitCode.HOST,
    )


def _mask(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "******")
    return text


def running_as_root() -> bool:
    return os.geteuid() == 0
