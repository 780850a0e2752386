"""The options several commands share, declared once, and `shared`, which gives them to a
command as one `Common` value and starts the command's session."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from stellarbase.cli.session import begin
from stellarbase.paths import HostPaths
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


@dataclass(frozen=True)
class Common:
    """The shared options' values; those a command does not take keep their defaults."""

    tier: str | None = None
    config: Path | None = None
    sets: list[str] | None = None
    root: Path = Path("/")
    output: Format = Format.TEXT
    quiet: bool = False
    debug: bool = False

    @property
    def paths(self) -> HostPaths:
        return HostPaths(self.root)


# name in `shared` → (parameter, its annotation, its default, the Common field)
_OPTIONS: dict[str, tuple[tuple[str, Any, Any, str], ...]] = {
    "tier": (("tier", TierOpt, None, "tier"),),
    "config": (("config", ConfigFile, None, "config"), ("set_", Sets, None, "sets")),
    "root": (("root", Root, Path("/"), "root"),),
    "output": (("output", Output, Format.TEXT, "output"),),
    "quiet": (("quiet", Quiet, False, "quiet"),),
}


def shared(
    command: str, *options: str, show_diff: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the named shared options (and --debug) to a command, which receives them as
    `opts: Common`; begin the command's session with them first."""
    taken = [spec for name in options for spec in _OPTIONS[name]]
    taken.append(("debug", Debug, False, "debug"))

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            opts = Common(**{field: kwargs.pop(param) for param, _, _, field in taken})
            begin(command, opts.output, opts.debug, show_diff=show_diff, quiet=opts.quiet)
            return func(*args, opts=opts, **kwargs)

        own = inspect.signature(func, eval_str=True).parameters.values()
        added = [
            inspect.Parameter(
                param, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
            )
            for param, annotation, default, _ in taken
        ]
        # typer reads this signature, with func's annotations resolved in func's module
        kept = [p for p in own if p.name != "opts"]
        wrapper.__signature__ = inspect.Signature([*kept, *added])  # type: ignore[attr-defined]
        return wrapper

    return decorate
