"""Vetting of torch.export `.pt2` archives: all a file must pass before any of its bytes reach torch.

`check_archive` is the only reader of the file. What it guarantees, whatever the bytes (else CheckpointError
naming what is wrong; nothing is unpickled, evaluated or decompressed on the way):

- One reading of the zip. `read_zip` (pt2_zip.py) parses the structure itself, strictly, and no other zip reader ever
  sees the file (torch's miniz and Python's zipfile locate the central directory differently; an archive
  could show each a different program). Refused: an end record that is not the file's last bytes (trailing
  data, a comment), a stated directory offset other than where the directory lies, an entry count other
  than the directory's, inconsistent zip64 records, zip64 fields in entries, entries on other disks,
  encrypted or compressed entries, duplicate names, bytes before the first entry or between entries,
  overlapping entries, local headers or data descriptors that disagree with the directory, CRC mismatches.
- Bounded. At most MAX_ARCHIVE_BYTES and MAX_ENTRIES entries; each JSON record at most MAX_JSON_BYTES and
  nested at most MAX_JSON_DEPTH; each tensor record exactly the bytes its declared dtype, shape, strides
  and offset span (no more, no less: no empty record standing for zeros), at most MAX_RECORD_BYTES, and all
  of them together at most MAX_TENSOR_BYTES. No record is ever inflated: loading holds the file's bytes, one
  copy of its tensors and the parsed graph.
- No pickle anywhere. Only the records a CPU `torch.export.save` writes (and `extra/` files, never read):
  no legacy `model.pt` pickles, no custom or opaque objects, no AOTInductor libraries; every payload raw
  tensor bytes, each record backing a declared tensor; the sample inputs
  are never loaded, and refused unless their pickle names only torch's plain-tensor rebuilders (scanned as
  opcodes, not run), so the file is not a trap for a stock `torch.export.load` either.
- Strings that torch turns into code are inert: symbolic sizes (`sympify`, an `eval`) and guards (`exec`)
  use only names of shape arithmetic, the shape environment's symbols, integers up to MAX_LITERAL and the
  operators + - * // % and comparisons (no `Pow`, no `**`, no floats, no attribute access), at most
  MAX_EXPRESSION_CHARS long; a symbolic size makes at most MAX_EXPRESSION_CALLS calls on at most
  MAX_EXPRESSION_SYMBOLS symbols, and a graph holds at most MAX_EXPRESSIONS of them, MAX_DISTINCT_EXPRESSIONS
  different, so sympy's work at start-up is bounded (seconds, not hours); node, input and weight names that fx
  writes into generated source are dotted names; operator targets name ATen, prims, control flow or shape
  arithmetic only, and `check_operators` checks the deserialized graph again.

`training/runtime/exported.py` deserializes the vetted records with torch's current-format deserializer directly
(never `torch.export.load`, whose legacy fallback reads the file again through zipfile and unpickles).
"""

from __future__ import annotations

import json
import pickletools
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE
from torch.export.pt2_archive.constants import ARCHIVE_VERSION_VALUE

from training.runtime.checkpoint import CheckpointError
from training.runtime.pt2_graph import NAME, check_graph
from training.runtime.pt2_zip import MAX_TENSOR_BYTES, read_zip

MAX_RECORD_BYTES = 2**29  # one weight or constant: 512 MiB
MAX_JSON_BYTES = 2**24  # models/model.json and each payload config: 16 MiB (glow_mnist's graph: 1 MB)

_ROOT = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # torch.export.save's one top-level folder (the file's stem)
_ENTRY = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/sample_inputs/model\.pt|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+|extra/[A-Za-z0-9_.-]+"
)
_PAYLOAD = {"data/weights/": re.compile(r"weight_\d+"), "data/constants/": re.compile(r"tensor_\d+")}
_SAMPLE_INPUT_GLOBALS = {  # what the pickle of plain tensors names: torch.save's tensor rebuilders
    "torch._utils _rebuild_tensor_v2", "collections OrderedDict",
    *(f"torch {kind}Storage" for kind in (
        "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
        "ComplexFloat", "ComplexDouble",
    )),
}  # fmt: skip
_CALLABLE_OPCODES = {"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"}  # other ways a pickle finds a callable


@dataclass(frozen=True)
class TensorRecord:
    """One weight or constant as its config declares it; `record` names its raw bytes in the archive."""

    fqn: str
    record: str  # e.g. data/weights/weight_0
    dtype: torch.dtype
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    storage_offset: int
    is_param: bool
    requires_grad: bool


@dataclass
class VettedArchive:
    """What check_archive let through: the graph JSON, the tensors it declares and their bytes."""

    graph: dict[str, Any]  # models/model.json
    weights: list[TensorRecord]
    constants: list[TensorRecord]
    records: dict[str, memoryview]  # name without the root folder -> stored bytes


def check_archive(payload: bytes | bytearray | memoryview, source: str) -> VettedArchive:
    """The archive's records, vetted as the module docstring says; CheckpointError naming the first thing
    that is wrong."""
    records = _strip_root(read_zip(payload, source), source)
    for needed in ("archive_format", "archive_version", "models/model.json"):
        if needed not in records:
            raise CheckpointError(f"{source}: the archive lacks {needed}; write it with torch.export.save")
    if bytes(records["archive_format"]) != b"pt2":
        raise CheckpointError(f"{source}: archive_format is not 'pt2'")
    if bytes(records["archive_version"]) != ARCHIVE_VERSION_VALUE.encode():
        raise CheckpointError(
            f"{source}: archive_version {bytes(records['archive_version'][:20])!r} is not this torch's "
            f"{ARCHIVE_VERSION_VALUE!r}; save it again with torch {torch.__version__.split('+')[0]}"
        )
    if "byteorder" in records and bytes(records["byteorder"]) != sys.byteorder.encode():
        raise CheckpointError(
            f"{source}: the tensors are {bytes(records['byteorder'][:10])!r}-endian; this machine's are {sys.byteorder}"
        )
    weights = _check_payloads(records, "data/weights/", source)
    constants = _check_payloads(records, "data/constants/", source)
    _check_tensor_bytes([*weights, *constants], records, source)
    if "data/sample_inputs/model.pt" in records:
        _check_sample_inputs(records["data/sample_inputs/model.pt"], source)
    graph = _read_json(records, "models/model.json", source)
    check_graph(graph, source)
    return VettedArchive(graph, weights, constants, records)


def _strip_root(entries: dict[str, memoryview], source: str) -> dict[str, memoryview]:
    """Records by their name under the one top-level folder torch.export.save writes; only known records."""
    if not entries:
        raise CheckpointError(f"{source}: the archive is empty")
    root = next(iter(entries)).split("/", 1)[0]
    records: dict[str, memoryview] = {}
    for name, data in entries.items():
        top, _, inner = name.partition("/")
        if top != root or not _ROOT.fullmatch(root):
            raise CheckpointError(f"{source}: entry {name[:80]!r} is not under the archive's one folder {root[:80]!r}")
        records[inner] = data
    strange = sorted(name for name in records if not _ENTRY.fullmatch(name))
    if strange:
        raise CheckpointError(
            f"{source}: the archive holds {', '.join(name[:80] for name in strange[:3])}: not part of a plain "
            "torch.export program (compiled AOTInductor code, pickled state or a second program are not loaded)"
        )
    return records


def _read_json(records: dict[str, memoryview], name: str, source: str) -> dict[str, Any]:
    data = records[name]
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{source}: {name} holds {len(data):,} bytes; at most {MAX_JSON_BYTES:,}")
    try:
        value = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{source}: {name} is not readable JSON ({str(error)[:120]})") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{source}: {name} is not a JSON object")
    return value


def _int_field(value: Any, where: str) -> int:
    """A {"as_int": n} size, stride or offset; refused when symbolic or not a non-negative integer."""
    number = value.get("as_int") if isinstance(value, dict) else None
    if type(number) is not int or number < 0:
        raise CheckpointError(f"{where} has no fixed non-negative size ({str(value)[:80]})")
    return number


def _check_payloads(records: dict[str, memoryview], directory: str, source: str) -> list[TensorRecord]:
    """A weights or constants config: every payload raw tensor bytes of a known dtype on the CPU, with a fixed
    shape, in an allowed record of the archive."""
    config_name = f"{directory}model_{directory.split('/')[1]}_config.json"
    if config_name not in records:
        raise CheckpointError(f"{source}: the archive lacks {config_name}")
    config = _read_json(records, config_name, source).get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: {config_name} has no config object")
    tensors = []
    for fqn, meta in config.items():
        if not NAME.fullmatch(fqn) or not isinstance(meta, dict):
            raise CheckpointError(f"{source}: {config_name} names a tensor {fqn[:80]!r}; expected a dotted name")
        path_name = meta.get("path_name")
        where = f"{source}: {directory}{str(path_name)[:40]} ({fqn[:80]})"
        if (
            meta.get("use_pickle") is not False
            or not isinstance(path_name, str)
            or not _PAYLOAD[directory].fullmatch(path_name)
        ):
            raise CheckpointError(
                f"{where} is a pickled object, not raw tensor bytes; this server unpickles nothing "
                "(export plain tensors: no tensor subclasses, custom classes or opaque objects)"
            )
        if directory + path_name not in records:
            raise CheckpointError(f"{where} is missing from the archive")
        tensor_meta = meta.get("tensor_meta")
        if not isinstance(tensor_meta, dict):
            raise CheckpointError(f"{where} has no tensor metadata")
        code = tensor_meta.get("dtype")
        dtype = _SERIALIZE_TO_TORCH_DTYPE.get(code) if type(code) is int else None
        if dtype is None:
            raise CheckpointError(f"{where} has no known dtype ({str(tensor_meta.get('dtype'))[:20]})")
        device = tensor_meta.get("device")
        if not isinstance(device, dict) or device.get("type") != "cpu":
            raise CheckpointError(f"{where} is saved on {str(device)[:40]}; export the module on the CPU")
        sizes, strides = tensor_meta.get("sizes"), tensor_meta.get("strides")
        if (
            not isinstance(sizes, list)
            or not isinstance(strides, list)
            or len(sizes) != len(strides)
            or len(sizes) > 16
        ):
            raise CheckpointError(f"{where} has no fixed shape")
        is_param, requires_grad = meta.get("is_param"), tensor_meta.get("requires_grad")
        if not isinstance(is_param, bool) or not isinstance(requires_grad, bool):
            raise CheckpointError(f"{where}: is_param and requires_grad must be true or false")
        tensors.append(
            TensorRecord(
                fqn=fqn,
                record=directory + path_name,
                dtype=dtype,
                sizes=tuple(_int_field(size, where) for size in sizes),
                strides=tuple(_int_field(stride, where) for stride in strides),
                storage_offset=_int_field(tensor_meta.get("storage_offset"), where),
                is_param=is_param,
                requires_grad=requires_grad,
            )
        )
    unused = sorted(
        name for name in records if name.startswith(directory) and name != config_name
        and name not in {tensor.record for tensor in tensors}
    )  # fmt: skip
    if unused:
        raise CheckpointError(f"{source}: {', '.join(unused[:3])} belongs to no tensor of {config_name}")
    return tensors


def span_of(tensor: TensorRecord) -> int:
    """The elements of its record a tensor reaches (0 for an empty tensor)."""
    if 0 in tensor.sizes:
        return 0
    reach = sum((size - 1) * stride for size, stride in zip(tensor.sizes, tensor.strides, strict=True))
    return tensor.storage_offset + 1 + reach


def _check_tensor_bytes(tensors: list[TensorRecord], records: dict[str, memoryview], source: str) -> None:
    """Each record holds exactly the bytes its tensors span (one record may back several views of one
    dtype), at most MAX_RECORD_BYTES; all records together at most MAX_TENSOR_BYTES."""
    spans: dict[str, tuple[torch.dtype, int]] = {}
    for tensor in tensors:
        where = f"{source}: {tensor.record} ({tensor.fqn[:80]})"
        declared = span_of(tensor) * torch.empty((), dtype=tensor.dtype).element_size()
        if declared > MAX_RECORD_BYTES:
            raise CheckpointError(
                f"{where}: {list(tensor.sizes)} of {tensor.dtype} claims {declared:,} bytes; at most "
                f"{MAX_RECORD_BYTES:,} bytes per record"
            )
        dtype, span = spans.get(tensor.record, (tensor.dtype, 0))
        if dtype != tensor.dtype:
            raise CheckpointError(f"{where} is read as {tensor.dtype} and as {dtype}")
        spans[tensor.record] = (dtype, max(span, declared))
    total = sum(span for _, span in spans.values())
    if total > MAX_TENSOR_BYTES:
        raise CheckpointError(
            f"{source}: the archive declares {total:,} tensor bytes in all; at most {MAX_TENSOR_BYTES:,}"
        )
    for name, (dtype, span) in spans.items():
        held = len(records[name])
        if held != span:
            shapes = [list(tensor.sizes) for tensor in tensors if tensor.record == name]
            raise CheckpointError(
                f"{source}: {name} holds {held:,} bytes; its tensors {str(shapes)[:80]} of {dtype} span {span:,}"
            )


def _check_sample_inputs(data: memoryview, source: str) -> None:
    """The sample inputs (a torch.save archive) name only torch's tensor rebuilders in their pickle. Never
    loaded here: the pickle's opcodes are listed without running any of them."""
    what = f"{source}: data/sample_inputs/model.pt"
    pickles = {name: blob for name, blob in read_zip(data, what).items() if name.endswith("data.pkl")}
    if len(pickles) != 1:
        raise CheckpointError(f"{what} is not plain tensors (it holds {len(pickles)} pickles, not one data.pkl)")
    (blob,) = pickles.values()
    if len(blob) > MAX_JSON_BYTES:
        raise CheckpointError(f"{what} is not plain tensors (a pickle of {len(blob):,} bytes)")
    try:
        for opcode, argument, _ in pickletools.genops(bytes(blob)):
            if opcode.name in _CALLABLE_OPCODES or (opcode.name == "GLOBAL" and argument not in _SAMPLE_INPUT_GLOBALS):
                found = argument if opcode.name == "GLOBAL" else opcode.name
                raise CheckpointError(
                    f"{what} is not plain tensors (its pickle names {str(found)[:80]}); torch.export.load would "
                    "unpickle it, so it is refused"
                )
    except ValueError as error:  # a damaged pickle: genops raises ValueError
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{what} is not plain tensors (a damaged pickle: {str(error)[:80]})") from error
