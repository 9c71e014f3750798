"""The layout holds: service/ reaches only training's shared wings, the client reaches neither, service/'s wings
import only downwards (the HTTP side no pool), no import cycles, no hidden imports, small modules.

Imports are read with `ast` (tests/import_graph.py), module-level and function-level alike, so a cycle hidden
behind an import inside a function counts.
"""

from __future__ import annotations

import re
import sys

from import_graph import read_graph

# What service/ may import: training/families/ too, since the server asks a model's family what its requests read
# and how it draws (the family modules import no service/ code and nothing of training's train or commands).
SHARED_WINGS = ("training.sampling", "training.models", "training.runtime", "training.families")
MAX_LINES = 400  # outside training/models/, where an architecture may take more
# A branch on a model's family or on its sampler's type: the family objects (training/families/) own what differs,
# so outside them these stay a handful (a schema's check of a stated name, a warm start's, the classifier's).
FAMILY_BRANCH = re.compile(
    r"(?<!for )\bfamily (==|!=|in)\s|\.family (==|!=|in)\s|isinstance\([^)]*(EBMSampler|GANSampler|FlowSampler)"
    r"|solver is not None|runs_ode_chains|is_velocity_field"
)
MAX_FAMILY_BRANCHES = 8
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
# service/'s wings, top first: a module imports service/ modules of its own wing or of wings below it only. A request
# flows down (HTTP -> engine) and the engine reads the catalogue; entry points start it all; settings and metrics are
# shared by every wing.
SERVICE_WINGS = {
    "entry points": ("service.__main__", "service.ray_engine"),
    "http": ("service.http",),
    "engine": ("service.engine",),
    "catalogue": ("service.catalogue",),
    "shared": ("service.settings", "service.metrics", "service.client", "service"),
}
UPWARD_ALLOWED = {
    ("service.metrics", "service.catalogue.registry"): "a type annotation only (show_models takes a Registry)",
}
MAX_WING_FLOORS = 7  # the longest chain of imports inside one wing
POOLS = "service.engine.pools"  # the device's pools: the HTTP side submits orders to the worker, never to a pool
# What the client distribution (clients/python/pyproject.toml) may import: its own modules, its dependencies (httpcore,
# httpx's own, for the network backend that bounds reads by the deadline) and the standard library; never the
# server's or training's code, and so never torch.
CLIENT_DEPENDENCIES = ("samplebay_client", "httpx", "httpcore", "numpy", "PIL")
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


def wing_of(module: str) -> str:
    """The wing a service/ module belongs to: the longest matching prefix in SERVICE_WINGS."""
    matches = [
        (len(prefix), wing)
        for wing, prefixes in SERVICE_WINGS.items()
        for prefix in prefixes
        if module == prefix or (module.startswith(prefix + ".") and prefix != "service")
    ]
    assert matches, f"{module} is in no wing of SERVICE_WINGS: put it in http/, engine/ or catalogue/"
    return max(matches)[1]


SERVICE_MODULES = {name for name in GRAPH.modules if name.split(".")[0] == "service"}


def test_every_service_module_is_in_a_wing() -> None:
    assert {wing_of(name) for name in SERVICE_MODULES} == set(SERVICE_WINGS)


def test_service_wings_import_only_their_own_wing_or_the_wings_below() -> None:
    rank = {wing: index for index, wing in enumerate(SERVICE_WINGS)}
    upward = sorted(
        f"{imp.importer}:{imp.line} ({wing_of(imp.importer)}) imports {imp.target} ({wing_of(imp.target)})"
        for imp in GRAPH.internal()
        if imp.importer in SERVICE_MODULES
        and imp.target in SERVICE_MODULES
        and rank[wing_of(imp.target)] < rank[wing_of(imp.importer)]
        and (imp.importer, imp.target) not in UPWARD_ALLOWED
    )
    assert not upward, f"service/'s wings import downwards only ({' > '.join(SERVICE_WINGS)}): {upward}"


def test_the_http_wing_imports_no_pool() -> None:
    """The HTTP side hands orders to the worker (service/engine/worker.py); which pool runs them is the engine's."""
    reaching = sorted(
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for imp in GRAPH.imports
        if imp.importer in SERVICE_MODULES
        and wing_of(imp.importer) == "http"
        and (imp.target == POOLS or imp.target.startswith(POOLS + "."))
    )
    assert not reaching, f"the HTTP wing imports no module of {POOLS}: {reaching}"


def test_each_service_wing_is_at_most_seven_floors_deep() -> None:
    deep = {}
    for wing in SERVICE_WINGS:
        members = {name for name in SERVICE_MODULES if wing_of(name) == wing}
        floors = GRAPH.floors(members)
        if max(floors.values()) > MAX_WING_FLOORS:
            deep[wing] = sorted(floors.items(), key=lambda item: -item[1])[:3]
    assert not deep, f"a wing of service/ is over {MAX_WING_FLOORS} import floors (its deepest modules): {deep}"


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


def family_branches(graph=GRAPH) -> list[str]:
    """Each line of training/ or service/ outside training/families/ that branches on a model's family."""
    return [
        f"{name}:{number}: {line.strip()}"
        for name, path in sorted(graph.modules.items())
        if name.startswith(("training", "service")) and not name.startswith("training.families")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if FAMILY_BRANCH.search(line)
    ]


def test_family_branches_outside_the_family_modules_are_a_handful() -> None:
    """The CLI, the server, export and evaluate ask a model's family (training/families/) instead of testing it."""
    branches = family_branches()
    assert len(branches) <= MAX_FAMILY_BRANCHES, (
        f"{len(branches)} branches on a model's family outside training/families/ (at most {MAX_FAMILY_BRANCHES}); "
        "give the family object a method or attribute instead:\n" + "\n".join(branches)
    )


def test_the_family_branch_count_sees_a_branch(tmp_path) -> None:
    """The count above can fail: a module that tests a family's name or a sampler's type is counted."""
    (tmp_path / "service").mkdir()
    (tmp_path / "training").mkdir()
    (tmp_path / "service" / "route.py").write_text(
        'def pool(model):\n    if model.family == "gan":\n        return 1\n'
        "    return 2 if isinstance(model.sampler, FlowSampler) else 3\n"
        "\n\ndef each(families):\n    return [family for family in families]\n"
    )
    assert [line.split(": ")[0] for line in family_branches(read_graph(tmp_path))] == [
        "service.route:2",
        "service.route:4",
    ]


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


def test_no_test_module_imports_another() -> None:
    """What tests share lives in helper modules (conftest's model writers, server, payloads, engine_bench,
    page_driver, programs, toy_runs), so a test module runs and reads on its own."""
    import ast
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    importing = []
    for module in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            importing += [f"{module.name} imports {name}" for name in names if name.split(".")[0].startswith("test_")]
    assert importing == []


# Where each folder of tests points in the code: a test is found by the wing it tests.
TEST_FOLDERS = {
    "service_http": "service/http",
    "service_engine": "service/engine",
    "service_catalogue": "service/catalogue",
    "service_main": "service",  # the entry points: startup, the process, the Ray engine
    "client_package": "clients/python/samplebay_client",
    "training_models": "training/models",
    "training_sampling": "training/sampling",
    "training_runtime": "training/runtime",
    "training_train": "training/train",
    "training_commands": "training/commands",
    "training_families": "training/families",
}
REPOSITORY_TESTS = {"test_layout.py", "test_repository.py", "test_docker.py", "test_bench.py"}  # the whole tree


def test_tests_mirror_the_code_one_folder_per_wing() -> None:
    """Every test module sits in the folder of the wing it tests (or at the top, for checks of the whole
    repository), every folder names a wing that exists, and no two test modules share a name (pytest imports
    them by name)."""
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    root = tests.parent
    modules = sorted(tests.rglob("test_*.py"))
    top = {module.name for module in modules if module.parent == tests}
    folders = {module.parent.name for module in modules if module.parent != tests}
    assert top == REPOSITORY_TESTS
    assert folders == set(TEST_FOLDERS)
    assert all((root / code).is_dir() for code in TEST_FOLDERS.values())
    assert all(module.parent.parent == tests for module in modules if module.parent != tests)  # one level
    names = [module.name for module in modules]
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)
