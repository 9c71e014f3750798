"""Vetting of torch.export `.pt2` archives: all a file must pass before any of its bytes reach torch.

`check_archive` is the only reader of the file. What it guarantees, whatever the bytes (else CheckpointError
naming what is wrong; nothing is unpickled, evaluated or decompressed on the way):

- One reading of the zip. `read_zip` parses the structure itself, strictly, and no other zip reader ever
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
import operator
import pickletools
import re
import struct
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from training.runtime.checkpoint import CheckpointError

MAX_TENSOR_BYTES = 2**30  # all tensor records of one archive together: 1 GiB (MNIST models here: < 5 MB)
MAX_RECORD_BYTES = 2**29  # one weight or constant: 512 MiB
MAX_JSON_BYTES = 2**24  # models/model.json and each payload config: 16 MiB (glow_mnist's graph: 1 MB)
MAX_JSON_DEPTH = 64  # nesting of the graph JSON (an export writes under 20)
MAX_ARCHIVE_BYTES = MAX_TENSOR_BYTES + 2**28  # the tensors, the JSON, the sample inputs and the zip structure
MAX_ENTRIES = 8192  # zip entries (glow_mnist: 249)
MAX_EXPRESSION_CHARS = 256  # one symbolic size or guard (an export's longest here: 61)
MAX_LITERAL = 2**31  # an integer in a symbolic size or guard
# sympy's Max, Min, FloorDiv and Mod compare their symbolic arguments under assumptions: up to a quarter
# second for a new expression at these bounds, about a millisecond for one seen before (sympy's cache).
MAX_EXPRESSION_CALLS = 4  # calls other than Symbol and Integer in one symbolic size (an export's: 1)
MAX_EXPRESSION_SYMBOLS = 2  # distinct symbols in one symbolic size (an export's: 1, the batch)
MAX_DISTINCT_EXPRESSIONS = 64  # different symbolic sizes in one graph (glow_mnist: 5)
MAX_EXPRESSIONS = 16_384  # symbolic sizes in one graph (glow_mnist: 724)
MAX_GUARDS = 256  # guards_code lines, compiled into one function (a conditional energy's: 1)

# --- the zip structure --------------------------------------------------------------------------------

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory entry, 46 bytes
_END = struct.Struct("<IHHHHIIH")  # end of central directory, 22 bytes
_END64 = struct.Struct("<IQHHIIQQQQ")  # zip64 end of central directory, 56 bytes
_LOCATOR = struct.Struct("<IIQI")  # zip64 end of central directory locator, 20 bytes
_DESCRIPTOR = struct.Struct("<IIII")  # data descriptor with its signature, 16 bytes
_ALLOWED_FLAGS = 0x0808  # bit 3: sizes in a data descriptor (torch writes them); bit 11: UTF-8 names
_ZIP64_EXTRA = 0x0001


@dataclass(frozen=True)
class _Entry:
    name: str
    header: int  # offset of its local header
    size: int
    crc: int
    flags: int
    name_bytes: bytes


def read_zip(payload: bytes | bytearray | memoryview, source: str) -> dict[str, memoryview]:
    """The stored entries of a zip archive, name -> bytes (views into payload), read strictly: any layout two
    zip readers could read differently, or that disagrees with itself, is refused (see the module docstring)."""
    view = memoryview(payload).cast("B")
    size = len(view)
    if size > MAX_ARCHIVE_BYTES:
        raise CheckpointError(f"{source}: {size:,} bytes; an archive may hold at most {MAX_ARCHIVE_BYTES:,}")
    if size < _END.size or bytes(view[size - _END.size : size - _END.size + 4]) != b"PK\x05\x06":
        raise CheckpointError(
            f"{source}: not a torch.export archive (the end record is not at the end of the file: not a zip, "
            "or data or a comment after it)"
        )
    _, disk, directory_disk, disk_count, count, directory_size, directory_offset, _ = _END.unpack_from(
        view, size - _END.size
    )
    directory_end = size - _END.size
    locator = directory_end - _LOCATOR.size
    if locator >= 0 and bytes(view[locator : locator + 4]) == b"PK\x06\x07":
        disk_count, count, directory_size, directory_offset, directory_end = _read_zip64_end(
            view, locator, (disk_count, count, directory_size, directory_offset), source
        )
    elif 0xFFFF in (disk_count, count) or 0xFFFFFFFF in (directory_size, directory_offset):
        raise CheckpointError(f"{source}: the end record defers to a zip64 end record the archive does not have")
    if disk or directory_disk or disk_count != count:
        raise CheckpointError(f"{source}: the archive claims to span several disks")
    if count > MAX_ENTRIES:
        raise CheckpointError(f"{source}: the archive has {count:,} entries; at most {MAX_ENTRIES:,}")
    if directory_offset + directory_size != directory_end:
        raise CheckpointError(
            f"{source}: the end record says the central directory starts at byte {directory_offset:,} and "
            f"holds {directory_size:,} bytes, but it lies at {directory_end - directory_size:,} (zip readers "
            "would read different archives from this file)"
        )
    entries = _read_directory(view, directory_offset, directory_end, count, source)
    return _read_entries(view, entries, directory_offset, source)


def _read_zip64_end(
    view: memoryview, locator: int, stated: tuple[int, int, int, int], source: str
) -> tuple[int, int, int, int, int]:
    """(entries on this disk, entries, directory size, directory offset, where the directory must end) from
    the zip64 records torch
    writes before the end record; each 32-bit value of the end record must agree or be the zip64 escape."""
    _, locator_disk, end64_offset, disks = _LOCATOR.unpack_from(view, locator)
    end64 = locator - _END64.size
    if (
        locator_disk
        or disks != 1
        or end64 < 0
        or end64_offset != end64
        or bytes(view[end64 : end64 + 4]) != b"PK\x06\x06"
    ):
        raise CheckpointError(f"{source}: the zip64 locator does not point at a zip64 end record just before it")
    _, record_size, _, _, disk, directory_disk, disk_count, count, directory_size, directory_offset = (
        _END64.unpack_from(view, end64)
    )
    if record_size != _END64.size - 12 or disk or directory_disk or disk_count != count:
        raise CheckpointError(f"{source}: the zip64 end record is not a single-disk record of {_END64.size} bytes")
    escapes = (0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    for value, value64, escape in zip(stated, (count, count, directory_size, directory_offset), escapes, strict=True):
        if value not in (value64, escape):
            raise CheckpointError(f"{source}: the end record and the zip64 end record disagree ({value} != {value64})")
    return disk_count, count, directory_size, directory_offset, end64


def _read_directory(view: memoryview, start: int, end: int, count: int, source: str) -> list[_Entry]:
    """The central directory's entries: exactly `count` of them, filling it exactly."""
    entries: list[_Entry] = []
    names: set[str] = set()
    position = start
    for _ in range(count):
        if position + _CENTRAL.size > end or bytes(view[position : position + 4]) != b"PK\x01\x02":
            raise CheckpointError(
                f"{source}: the end record counts {count} entries; the central directory holds {len(entries)}"
            )
        (
            _,
            _,
            _,
            flags,
            method,
            _,
            _,
            crc,
            stored,
            size,
            name_length,
            extra_length,
            comment_length,
            disk,
            _,
            _,
            header,
        ) = _CENTRAL.unpack_from(view, position)
        name_end = position + _CENTRAL.size + name_length
        entry_end = name_end + extra_length + comment_length
        if entry_end > end:
            raise CheckpointError(f"{source}: a central directory entry runs past the directory")
        name_bytes = bytes(view[position + _CENTRAL.size : name_end])
        try:
            name = name_bytes.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CheckpointError(f"{source}: an entry name is not UTF-8 ({name_bytes[:40]!r})") from error
        if flags & ~_ALLOWED_FLAGS:
            raise CheckpointError(
                f"{source}: entry {name[:80]!r} is encrypted or uses zip features (flags {flags:#06x})"
            )
        if method != 0 or stored != size:
            raise CheckpointError(
                f"{source}: entry {name[:80]!r} is compressed (method {method}); a program's records are stored "
                "uncompressed, as torch.export.save writes them"
            )
        if 0xFFFFFFFF in (size, header) or disk:
            raise CheckpointError(f"{source}: entry {name[:80]!r} uses zip64 or multi-disk fields")
        _check_extra(view[name_end : name_end + extra_length], name, source)
        if name in names:
            raise CheckpointError(f"{source}: the archive names {name[:80]!r} twice")
        names.add(name)
        entries.append(_Entry(name, header, size, crc, flags, name_bytes))
        position = entry_end
    if position != end:
        raise CheckpointError(
            f"{source}: the end record counts {count} entries; the central directory holds more "
            f"({end - position:,} bytes after them)"
        )
    return entries


def _check_extra(extra: memoryview, name: str, source: str) -> None:
    """Extra fields are (id, size, data) records that fill the field exactly; zip64 sizes are refused (no
    record of a bounded archive needs them, and readers disagree on their precedence)."""
    position = 0
    while position < len(extra):
        if position + 4 > len(extra):
            raise CheckpointError(f"{source}: entry {name[:80]!r} has a damaged extra field")
        field_id, field_size = struct.unpack_from("<HH", extra, position)
        position += 4 + field_size
        if position > len(extra):
            raise CheckpointError(f"{source}: entry {name[:80]!r} has a damaged extra field")
        if field_id == _ZIP64_EXTRA:
            raise CheckpointError(f"{source}: entry {name[:80]!r} carries zip64 sizes")


def _read_entries(view: memoryview, entries: list[_Entry], directory: int, source: str) -> dict[str, memoryview]:
    """Each entry's bytes, from its local header: the entries tile the file from byte 0 to the directory
    with nothing before, between or overlapping, and every local record agrees with the directory."""
    records: dict[str, memoryview] = {}
    expected = 0
    previous = None
    for entry in sorted(entries, key=lambda entry: entry.header):
        if entry.header != expected:
            if entry.header < expected:
                raise CheckpointError(f"{source}: entries {previous!r} and {entry.name[:80]!r} overlap")
            where = "before the first entry" if previous is None else f"between entries ({previous!r})"
            raise CheckpointError(f"{source}: {entry.header - expected:,} bytes {where} that no entry accounts for")
        if entry.header + _LOCAL.size > directory or bytes(view[entry.header : entry.header + 4]) != b"PK\x03\x04":
            raise CheckpointError(f"{source}: entry {entry.name[:80]!r} has no local header where the directory says")
        _, _, flags, method, _, _, crc, stored, size, name_length, extra_length = _LOCAL.unpack_from(view, entry.header)
        name_end = entry.header + _LOCAL.size + name_length
        data_start = name_end + extra_length
        data_end = data_start + entry.size
        sizes_here = (crc, stored, size)
        stated = (entry.crc, entry.size, entry.size)
        deferred = entry.flags & 0x08 and sizes_here in ((0, 0, 0), stated)
        if (
            flags != entry.flags
            or method != 0
            or bytes(view[entry.header + _LOCAL.size : name_end]) != entry.name_bytes
            or not (deferred or sizes_here == stated)
        ):
            raise CheckpointError(f"{source}: the local header of {entry.name[:80]!r} disagrees with the directory")
        _check_extra(view[name_end:data_start], entry.name, source)
        end = data_end
        if entry.flags & 0x08:
            end += _DESCRIPTOR.size
            if end > directory or _DESCRIPTOR.unpack_from(view, data_end) != (0x08074B50, *stated):
                raise CheckpointError(
                    f"{source}: the data descriptor of {entry.name[:80]!r} disagrees with the directory"
                )
        if end > directory:
            raise CheckpointError(f"{source}: entry {entry.name[:80]!r} runs into the central directory")
        data = view[data_start:data_end]
        if zlib.crc32(data) != entry.crc:
            raise CheckpointError(f"{source}: entry {entry.name[:80]!r} is damaged (its CRC does not match)")
        records[entry.name] = data
        expected = end
        previous = entry.name[:80]
    if expected != directory:
        raise CheckpointError(
            f"{source}: {directory - expected:,} bytes before the central directory that no entry accounts for"
        )
    return records


# --- what the archive may hold -----------------------------------------------------------------------

_ROOT = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # torch.export.save's one top-level folder (the file's stem)
_ENTRY = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/sample_inputs/model\.pt|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+|extra/[A-Za-z0-9_.-]+"
)
_PAYLOAD = {"data/weights/": re.compile(r"weight_\d+"), "data/constants/": re.compile(r"tensor_\d+")}
_NAME = re.compile(r"[A-Za-z0-9_.]*")  # node, input, weight and module names: dotted identifiers (or digits)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # everything but \t and \n
_FREE_TEXT = {  # strings torch keeps as data (metadata, JSON tree specs, string arguments), never as code
    "stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "custom", "from_node",
    "in_spec", "out_spec", "torch_version", "as_string", "as_strings",
}  # fmt: skip
_TARGET = re.compile(  # what a node may call, before torch resolves the name by attribute lookup
    r"torch\.ops\.(?:aten|prims)\.\w+\.\w+|torch\.ops\.higher_order\.\w+|_operator\.\w+|math\.\w+"
    r"|torch\.sym_\w+|torch\._sym_\w+"
)
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
    from torch.export.pt2_archive.constants import ARCHIVE_VERSION_VALUE

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
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    config_name = f"{directory}model_{directory.split('/')[1]}_config.json"
    if config_name not in records:
        raise CheckpointError(f"{source}: the archive lacks {config_name}")
    config = _read_json(records, config_name, source).get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: {config_name} has no config object")
    tensors = []
    for fqn, meta in config.items():
        if not _NAME.fullmatch(fqn) or not isinstance(meta, dict):
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


# --- the graph ------------------------------------------------------------------------------------------

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
            if not _NAME.fullmatch(child_key):
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
        elif key not in _FREE_TEXT and not _NAME.fullmatch(value):
            raise CheckpointError(f"{where}: {value[:80]!r} is not a plain name")


def check_graph(graph: dict[str, Any], source: str) -> None:
    """models/model.json: this torch's export schema, range constraints of symbols and integer bounds, and
    every string inert (check_graph_json)."""
    from torch._export.serde.schema import SCHEMA_VERSION

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
    from torch._export.serde.serialize import _SYM_OPS

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
