"""Print the layout's figures: files, import cycles, function-level imports, service/'s import floors (all of it and
wing by wing), largest modules.

python scripts/layout_figures.py
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from import_graph import read_graph


def main() -> None:
    graph = read_graph()
    for package in ("training", "service", "samplebay_client"):
        names = [name for name in graph.modules if name == package or name.startswith(package + ".")]
        # One statement counts once, however many names it imports.
        inner = {(imp.importer, imp.line) for imp in graph.function_level() if imp.importer in names}
        print(f"{package}/: {len(names)} files, {len(inner)} function-level import statements")
        for importer, count in Counter(importer for importer, _ in inner).most_common(5):
            print(f"  {count:3d} {importer}")
    service = {name for name in graph.modules if name.split(".")[0] == "service"}
    print(f"service/ import floors: {max(graph.floors(service).values())}")
    for wing in ("http", "engine", "catalogue"):
        members = {name for name in service if name.startswith(f"service.{wing}")}
        print(f"  service/{wing}/: {len(members)} files, {max(graph.floors(members).values())} floors")
    cycles = graph.cycles()
    print(f"import cycles (strongly connected groups): {len(cycles)}")
    for group in cycles:
        print("  " + " <-> ".join(group))
    print("largest modules:")
    for name, lines in sorted(graph.lines().items(), key=lambda item: -item[1])[:8]:
        print(f"  {lines:4d} {name}")


if __name__ == "__main__":
    main()
