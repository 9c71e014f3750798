"""The layout holds: service/ reaches only training's shared wings, the client reaches neither, no import cycles, no
hidden imports, small modules.

Imports are read with `ast` (tests/import_graph.py), module-level and function-level alike, so a cycle hidden
behind an import inside a function counts.
"""

from __future__ import annotations

import sys

from import_graph import read_graph

SHARED_WINGS = ("training.sampling", "training.models", "training.runtime")  # what service/ may import
MAX_LINES = 400  # outside training/models/, where an architecture may take more
# Imports inside functions, each with why: an optional dependency kept optional, or work deferred on purpose.
FUNCTION_LEVEL_ALLOWED = {
    ("training.train.losses", "scipy.optimize"): "scipy: only minibatch OT pairing of a CNF needs it",
    ("service.ray_engine", "ray"): "the ray extra is optional",
    ("service.ray_engine", "service.http.app"): "torch loads in each Ray replica, not in the driver",
    ("service.__main__", "service.ray_engine"): "the ray extra is optional",
    ("service.__main__", "importlib.util"): "the check that the ray extra is installed",
    ("service.__main__", "uvicorn"): "settings and files are checked before the server and torch load",
    ("service.__main__", "service.http.app"): "settings and files are checked before the server and torch load",
    ("service.__main__", "service.catalogue.buffer_store"): "settings and files are checked before torch loads",
    ("service.__main__", "service.http.middleware"): "settings and files are checked before the server loads",
    ("service.__main__", "training.runtime.device"): "settings and files are checked before torch loads",
}
# What the client distribution (clients/python/pyproject.toml) may import: its own modules, its three dependencies
# and the standard library; never the server's or training's code, and so never torch.
CLIENT_DEPENDENCIES = ("samplebay_client", "httpx", "numpy", "PIL")
GRAPH = read_graph()


def test_service_imports_only_the_shared_wings_of_training() -> None:
    reaching = sorted(
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for imp in GRAPH.imports
        if imp.importer.startswith("service")
        and imp.target.startswith("training")
        and not imp.target.startswith(SHARED_WINGS)
    )
    assert not reaching, f"service/ may import only {', '.join(SHARED_WINGS)}: {reaching}"


def test_the_client_imports_only_itself_its_dependencies_and_the_standard_library() -> None:
    client_imports = [imp for imp in GRAPH.imports if imp.importer.startswith("samplebay_client")]
    assert len({imp.importer for imp in client_imports}) >= 4  # the graph does read the client's modules
    outside = sorted(
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for imp in client_imports
        if imp.target.split(".")[0] not in (*CLIENT_DEPENDENCIES, *sys.stdlib_module_names, "__future__")
    )
    assert not outside, f"the client imports only {', '.join(CLIENT_DEPENDENCIES)} and the stdlib: {outside}"


def test_the_server_reaches_the_client_only_through_its_alias() -> None:
    """service.client is the one door: the rest of the server does not grow on the client's internals."""
    reaching = sorted(
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for imp in GRAPH.imports
        if imp.target.startswith("samplebay_client")
        and imp.importer.startswith(("service", "training"))
        and imp.importer != "service.client"
    )
    assert not reaching, f"import the client through service.client or samplebay_client's front: {reaching}"


def test_no_import_cycles_among_training_and_service_modules() -> None:
    assert GRAPH.cycles() == []


def test_function_level_imports_only_where_the_allow_list_says_why() -> None:
    hidden = sorted(
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for imp in GRAPH.function_level()
        if (imp.importer, imp.target) not in FUNCTION_LEVEL_ALLOWED
    )
    assert not hidden, f"imports inside functions hide the module's dependencies; move them to the top: {hidden}"


def test_no_module_outside_models_is_over_400_lines() -> None:
    long = {
        name: lines
        for name, lines in GRAPH.lines().items()
        if lines > MAX_LINES and not name.startswith("training.models")
    }
    assert not long, f"split these modules (at most {MAX_LINES} lines outside training/models/): {long}"


def test_the_graph_reader_sees_a_cycle_hidden_in_a_function(tmp_path) -> None:
    """The checks above can fail: a cycle made of one module-level and one function-level import is found."""
    package = tmp_path / "training"
    package.mkdir()
    (tmp_path / "service").mkdir()
    (package / "a.py").write_text("from training.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from training import a\n    return a\n")
    graph = read_graph(tmp_path)
    assert graph.cycles() == [["training.a", "training.b"]]
    assert [(imp.importer, imp.target) for imp in graph.function_level()] == [("training.b", "training.a")]
