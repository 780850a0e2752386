"""The options several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stellarbase.result import Format

Root = Annotated[
    Path, typer.Option("--root", help="Host root all paths hang off (a test dir; / is live).")
]
Output = Annotated[Format, typer.Option("--output", "-o", help="text for people, json for tools.")]
Debug = Annotated[bool, typer.Option("--debug", help="Debug logs and tracebacks.")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="Site config file (YAML).")]
Sets = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override one key: --set worker.instances=3 (not secrets: use the site file "
        "or STELLARBASE_SECTION__KEY).",
    ),
]
TierOpt = Annotated[str | None, typer.Option("--tier", help="pilot, department or enterprise.")]
Skip = Annotated[
    list[str] | None,
    typer.Option("--skip", help="Skip a preflight check or family by name (repeatable)."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")]
