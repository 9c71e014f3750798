"""The graph of a vetted `.pt2` archive: its JSON, symbolic sizes and guards inert, its operators ATen's.

Strings torch turns into code (symbolic sizes through `sympify`, guards through `exec`) may use only shape
arithmetic, the shape environment's symbols, bounded integers and plain operators; fx names are dotted names;
operator targets name ATen, prims, control flow or shape arithmetic only (pt2_archive.py says why).
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from typing import Any

import torch
from torch._export.serde.schema import SCHEMA_VERSION
from torch._export.serde.serialize import _SYM_OPS

from training.runtime.checkpoint import CheckpointError

MAX_JSON_DEPTH = 64  # nesting of the graph JSON (an export writes under 20)
MAX_EXPRESSION_CHARS = 256  # one symbolic size or guard (an export's longest here: 61)
MAX_LITERAL = 2**31  # an integer in a symbolic size or guard
NAME = re.compile(r"[A-Za-z0-9_.]*")  # node, input, weight and module names: dotted identifiers (or digits)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # everything but \t and \n
_FREE_TEXT = {  # strings torch keeps as data (metadata, JSON tree specs, string arguments), never as code
    "stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "custom", "from_node",
    "in_spec", "out_spec", "torch_version", "as_string", "as_strings",
}  # fmt: skip
_TARGET = re.compile(  # what a node may call, before torch resolves the name by attribute lookup
    r"torch\.ops\.(?:aten|prims)\.\w+\.\w+|torch\.ops\.higher_order\.\w+|_operator\.\w+|math\.\w+"
    r"|torch\.sym_\w+|torch\._sym_\w+"
)
# sympy's Max, Min, FloorDiv and Mod compare their symbolic arguments under assumptions: up to a quarter
# second for a new expression at these bounds, about a millisecond for one seen before (sympy's cache).
MAX_EXPRESSION_CALLS = 4  # calls other than Symbol and Integer in one symbolic size (an export's: 1)
MAX_EXPRESSION_SYMBOLS = 2  # distinct symbols in one symbolic size (an export's: 1, the batch)
MAX_DISTINCT_EXPRESSIONS = 64  # different symbolic sizes in one graph (glow_mnist: 5)
MAX_EXPRESSIONS = 16_384  # symbolic sizes in one graph (glow_mnist: 724)
MAX_GUARDS = 256  # guards_code lines, compiled into one function (a conditional energy's: 1)


_SHAPE_FUNCTIONS = {  # sympy's and torch.utils._sympy.functions' integer shape arithmetic, as srepr writes it
    "Symbol", "Integer", "Add", "Mul", "Max", "Min", "FloorDiv", "CleanDiv", "Mod", "PythonMod",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "True", "False",
    "integer", "positive", "nonnegative", "nonzero", "real", "finite",  # a Symbol's assumptions
}  # fmt: skip
_GUARD_WORDS = {"and", "or", "not"}
_SYMBOL = re.compile(r"[a-z]{1,4}\d{1,9}")  # s0, u3, zuf0: the shape environment's symbols
_EXPR_TOKEN = re.compile(
    r"\s*(?:L\[(?:'[A-Za-z_]\w{0,63}'|\d{1,4})\]|\.size\(\)|\.stride\(\)|\.storage_offset\(\)|\[\d{1,4}\]"
    r"|'[a-z]{1,4}\d{1,9}'|[A-Za-z_]\w*|\d+|==|!=|<=|>=|//|[-+*/%(),<>=])"
)


def check_expression(text: str, where: str, guard: bool) -> None:
    """A symbolic size or guard holds only shape arithmetic on symbols and integers up to MAX_LITERAL, so
    `sympify` and the guard function's `exec` can do nothing else, and finish quickly. `L[...]`, `.size()`
    and `[i]` are a guard's input sizes (`L['x'].size()[0]`)."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CheckpointError(
            f"{where}: a shape expression of {len(text):,} characters; at most {MAX_EXPRESSION_CHARS}"
        )
    if "**" in text:
        raise CheckpointError(f"{where}: powers (**) in {text[:80]!r} are not evaluated")
    position, calls, symbols = 0, 0, set()
    while position < len(text.rstrip()):
        token = _EXPR_TOKEN.match(text, position)
        if token is None or token.end() == position:
            raise CheckpointError(f"{where}: {text[:80]!r} is not a shape expression this server evaluates")
        word = token.group().strip()
        if word.startswith(("L[", ".", "[")) and not guard:
            raise CheckpointError(f"{where}: {text[:80]!r} is not a shape expression this server evaluates")
        if word.isdigit() and int(word) > MAX_LITERAL:
            raise CheckpointError(f"{where}: the integer {word[:20]} is over 2**31 in {text[:80]!r}")
        if re.fullmatch(r"[A-Za-z_]\w*", word) and not (
            word in _SHAPE_FUNCTIONS or _SYMBOL.fullmatch(word) or (guard and word in _GUARD_WORDS)
        ):
            raise CheckpointError(f"{where}: {word[:40]!r} in {text[:80]!r} is not shape arithmetic")
        if _SYMBOL.fullmatch(word.strip("'")):
            symbols.add(word.strip("'"))
        elif (
            word in _SHAPE_FUNCTIONS
            and word not in ("Symbol", "Integer")
            and text[token.end() : token.end() + 1] == "("
        ):
            calls += 1
        position = token.end()
    if not guard and (calls > MAX_EXPRESSION_CALLS or len(symbols) > MAX_EXPRESSION_SYMBOLS):
        raise CheckpointError(
            f"{where}: {text[:80]!r} makes {calls} calls on {len(symbols)} symbols; a symbolic size may make "
            f"at most {MAX_EXPRESSION_CALLS} on {MAX_EXPRESSION_SYMBOLS} (sympy's time grows fast with them)"
        )


def check_graph_json(value: Any, key: str, where: str, depth: int = 0, expressions: Counter[str] | None = None) -> None:
    """Every string of models/model.json: free text only where torch keeps it as data; shape expressions
    and guards only shape arithmetic; operator targets only ATen, prims, control flow and shape arithmetic;
    every other string (names that become Python identifiers or attribute paths in generated code) a
    dotted name. Nested at most MAX_JSON_DEPTH deep. Symbolic sizes are counted into `expressions`."""
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(f"{where}: nested deeper than {MAX_JSON_DEPTH}")
    if isinstance(value, dict):
        for child_key, child in value.items():
            if not NAME.fullmatch(child_key):
                raise CheckpointError(f"{where}: key {child_key[:80]!r} is not a plain name")
            check_graph_json(child, child_key, f"{where}.{child_key}", depth + 1, expressions)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            check_graph_json(child, key, f"{where}[{index}]", depth + 1, expressions)
    elif isinstance(value, str):
        if _CONTROL.search(value) or ("\n" in value and key != "stack_trace"):
            raise CheckpointError(f"{where}: a control character in {value[:80]!r}")
        if key == "expr_str":
            check_expression(value, where, guard=False)
            if expressions is not None:
                expressions[value] += 1
        elif key == "guards_code":
            check_expression(value, where, guard=True)
        elif key == "target":
            if not _TARGET.fullmatch(value):
                raise CheckpointError(
                    f"{where}: the program calls {value[:80]!r}; only ATen and prims operators are run"
                )
        elif key not in _FREE_TEXT and not NAME.fullmatch(value):
            raise CheckpointError(f"{where}: {value[:80]!r} is not a plain name")


def check_graph(graph: dict[str, Any], source: str) -> None:
    """models/model.json: this torch's export schema, range constraints of symbols and integer bounds, and
    every string inert (check_graph_json)."""
    where = f"{source}: models/model.json"
    version = graph.get("schema_version")
    major = version.get("major") if isinstance(version, dict) else None
    if major != SCHEMA_VERSION[0]:
        raise CheckpointError(
            f"{where}: export schema version {str(version)[:40]} is not this torch's {SCHEMA_VERSION[0]}.x; "
            f"export it again with torch {torch.__version__.split('+')[0]}"
        )
    constraints = graph.get("range_constraints") or {}
    if not isinstance(constraints, dict):
        raise CheckpointError(f"{where}: range_constraints is not an object")
    for symbol, bound in constraints.items():
        if not _SYMBOL.fullmatch(symbol) or not isinstance(bound, dict):
            raise CheckpointError(f"{where}: range constraint {symbol[:40]!r} is not a shape symbol's")
        if not all(type(bound.get(end)) in (int, type(None)) for end in ("min_val", "max_val")):
            raise CheckpointError(f"{where}: the range constraint of {symbol} is not a pair of integers")
    guards = graph.get("guards_code") or []
    if not isinstance(guards, list) or len(guards) > MAX_GUARDS:
        raise CheckpointError(f"{where}: guards_code must be a list of at most {MAX_GUARDS} guards")
    expressions: Counter[str] = Counter()
    check_graph_json(graph, "", where, expressions=expressions)
    if len(expressions) > MAX_DISTINCT_EXPRESSIONS or expressions.total() > MAX_EXPRESSIONS:
        raise CheckpointError(
            f"{where}: {expressions.total():,} symbolic sizes, {len(expressions):,} of them different; at most "
            f"{MAX_EXPRESSIONS:,} and {MAX_DISTINCT_EXPRESSIONS} (a server evaluates each when it starts)"
        )


_SAFE_NAMESPACES = ("aten", "prims")
_CONTROL_FLOW = {"cond", "while_loop", "map_impl", "scan", "wrap_with_set_grad_enabled", "wrap_with_autocast"}


def check_operators(program: torch.export.ExportedProgram, source: str) -> None:
    """Every call in the deserialized graph (and its control-flow subgraphs) is an ATen or prims operator,
    shape arithmetic, or control flow: no custom operator a library registered in this process."""
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if not node.name.isidentifier():
                raise CheckpointError(f"{source}: graph node {node.name[:80]!r} is not an identifier")
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.OpOverload) and target.namespace in _SAFE_NAMESPACES:
                continue
            if isinstance(target, torch._ops.HigherOrderOperator) and target.name() in _CONTROL_FLOW:
                continue
            if target in _SYM_OPS or target is operator.getitem:  # getitem: one output of a multi-output op
                continue
            raise CheckpointError(
                f"{source}: the program calls {target}, which is not an ATen operator; export with plain "
                "PyTorch operations"
            )
