"""The import graph of training/, service/ and the client (clients/python/samplebay_client/), read with `ast`
(nothing is imported or run).

tests/test_layout.py asserts on it and scripts/layout_figures.py prints its figures for a closing note.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each package and the folder it is found under, relative to the repository root.
PACKAGES = {"training": ".", "service": ".", "samplebay_client": "clients/python"}


@dataclass(frozen=True)
class Import:
    """One `import` statement's target inside the project (or outside it), where it stands."""

    importer: str
    target: str
    line: int
    in_function: bool


@dataclass
class ImportGraph:
    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)

    def internal(self) -> list[Import]:
        return [imp for imp in self.imports if imp.target in self.modules]

    def function_level(self) -> list[Import]:
        return [imp for imp in self.imports if imp.in_function]

    def lines(self) -> dict[str, int]:
        return {name: len(path.read_text().splitlines()) for name, path in self.modules.items()}

    def floors(self, names: set[str]) -> dict[str, int]:
        """Each module's floor among `names`: 1 for one importing none of them, else one above the highest it imports
        (imports inside functions count too). The graph must have no cycles among them."""
        edges: dict[str, set[str]] = {name: set() for name in names}
        for imp in self.internal():
            if imp.importer in names and imp.target in names and imp.target != imp.importer:
                edges[imp.importer].add(imp.target)
        floor: dict[str, int] = {}

        def visit(node: str) -> int:
            if node not in floor:
                floor[node] = 1 + max((visit(target) for target in edges[node]), default=0)
            return floor[node]

        for name in sorted(names):
            visit(name)
        return floor

    def cycles(self) -> list[list[str]]:
        """Strongly connected groups of two or more modules (or one importing itself), by Tarjan's algorithm."""
        edges: dict[str, set[str]] = {name: set() for name in self.modules}
        for imp in self.internal():
            edges[imp.importer].add(imp.target)
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        groups: list[list[str]] = []

        def visit(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for nxt in sorted(edges[node]):
                if nxt not in index:
                    visit(nxt)
                    low[node] = min(low[node], low[nxt])
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in edges[node]:
                    groups.append(sorted(group))

        for name in sorted(self.modules):
            if name not in index:
                visit(name)
        return groups


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    others = [alias for alias in node.names if f"{base}.{alias.name}" not in modules]
    return submodules + ([base] if others or not submodules else [])


def read_graph(root: Path = ROOT) -> ImportGraph:
    graph = ImportGraph()
    for package, folder in PACKAGES.items():
        for path in sorted((root / folder / package).rglob("*.py")):
            graph.modules[module_name(path, root / folder)] = path
    for name, path in graph.modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"

        def walk(node: ast.AST, in_function: bool, name: str = name, is_package: bool = is_package) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import | ast.ImportFrom):
                    for target in _targets(child, name, is_package, graph.modules):
                        graph.imports.append(Import(name, target, child.lineno, in_function))
                walk(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

        walk(tree, False)
    return graph
