"""The shape of installer/stellarbase, read from its import graph: no import cycle, no module
over 600 lines, and imports that run with the flow facts -> config -> plan -> apply ->
verify (the renderer serves the planner only; `cli` sits on top, below `__main__` alone).

The graph is built with `ast` from every module's source, so it sees imports inside
functions as well as at module level. An edge goes from a module to each module of the
package it imports: `from stellarbase import cli` imports `stellarbase.cli`, and
`from stellarbase.plan import Plan` imports `stellarbase.plan`.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "stellarbase"
SOURCE = Path(__file__).resolve().parents[1] / "installer" / PACKAGE
MAX_LINES = 600


@dataclass(frozen=True)
class Graph:
    files: dict[str, Path]  # module name -> its source file
    imports: dict[str, frozenset[str]]  # module name -> the package's modules it imports

    def importers_of(self, target: str) -> set[str]:
        """Modules outside `target` (a module, or a package and its modules) importing it."""
        return {
            module
            for module, imported in self.imports.items()
            if not within(module, target) and any(within(i, target) for i in imported)
        }


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(
    module: str, path: Path, tree: ast.Module, known: Iterable[str]
) -> frozenset[str]:
    """The package's modules that `module` imports anywhere in its source."""
    modules = set(known)

    def nearest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if within(alias.name, PACKAGE) and (hit := nearest(alias.name)):
                    found.add(hit)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if not within(source, PACKAGE):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                hit = submodule if submodule in modules else nearest(source)
                if hit:
                    found.add(hit)
    found.discard(module)
    return frozenset(found)


@functools.cache
def graph() -> Graph:
    files = {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}
    imports = {
        module: imported_modules(module, path, ast.parse(path.read_text(), str(path)), files)
        for module, path in files.items()
    }
    return Graph(files, imports)


def strongly_connected(imports: dict[str, frozenset[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module, each sorted (iterative: no recursion
    limit to meet however long an import chain gets)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(imports):
        if root in index:
            continue
        work = [(root, iter(sorted(imports[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(imports[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def a_cycle_through(start: str, component: list[str], imports: dict[str, frozenset[str]]) -> str:
    """The shortest import chain from `start` back to itself inside its component."""
    inside = set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(imports[node] & inside):
            if nxt == start:
                chain = [node]  # walked back to start, then read forwards
                while chain[-1] != start:
                    chain.append(came_from[chain[-1]])
                return " -> ".join([*reversed(chain), start])
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is in no cycle of {component}")


def test_no_import_cycle() -> None:
    imports = graph().imports
    cycles = strongly_connected(imports)
    described = [f"{', '.join(c)}\n    e.g. {a_cycle_through(c[0], c, imports)}" for c in cycles]
    assert not cycles, "import cycles in installer/:\n  " + "\n  ".join(described)


def test_no_module_over_600_lines() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in graph().files.items()}
    over = {m: n for m, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def is_planner(module: str) -> bool:
    """`stellarbase.plan` and any `stellarbase.plan*` (a `planners` package, say)."""
    return module.startswith(f"{PACKAGE}.plan")


def test_only_the_planner_imports_the_renderer() -> None:
    others = {m for m in graph().importers_of(f"{PACKAGE}.render") if not is_planner(m)}
    assert not others, f"stellarbase.render is imported by more than the planner: {others}"


def test_facts_import_neither_the_planner_nor_the_renderer() -> None:
    facts = f"{PACKAGE}.facts"
    imports = graph().imports
    assert facts in imports, "stellarbase.facts is missing"
    wrong = {
        i
        for module in imports
        if within(module, facts)
        for i in imports[module]
        if not within(i, facts) and (is_planner(i) or within(i, f"{PACKAGE}.render"))
    }
    assert not wrong, f"stellarbase.facts sits below the planner, yet imports {wrong}"


def test_nothing_but_main_imports_the_cli() -> None:
    others = graph().importers_of(f"{PACKAGE}.cli") - {f"{PACKAGE}.__main__"}
    assert not others, f"stellarbase.cli is imported from inside the package by {others}"
