"""Hostile torch.export archives, built byte by byte in the tests that use them: a tiny real program to
start from, a zip writer that lays entries out exactly as told (so two zip readers can be shown different
archives), and a pickle payload whose only effect is to create a marker file."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

TINY_SHAPE = (1, 2, 2)
TINY_SIDECAR = {
    "family": "ebm",
    "data": {"shape": list(TINY_SHAPE), "range": [-1.0, 1.0]},
    "sampler": {"steps": 2, "step_size": 0.05, "noise": 0.01},
}


class TinyEnergy(nn.Module):
    """A four-pixel energy: one linear layer over a quadratic well, so every load is quick."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, 2, 2] -> [B]
        return self.linear(x.flatten(1)).squeeze(1) + 0.5 * x.flatten(1).pow(2).sum(1)


def tiny_program(path: Path) -> Path:
    """A real program as a user writes one (dynamic batch, torch.export.save) and its sidecar."""
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    program = torch.export.export(TinyEnergy().eval(), (torch.zeros(2, *TINY_SHAPE),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, path)
    path.with_suffix(".json").write_text(json.dumps(TINY_SIDECAR))
    return path


class Marker:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def pickled_marker(marker: Path) -> bytes:
    """What `torch.load(weights_only=False)` runs: a torch.save archive holding a Marker."""
    buffer = io.BytesIO()
    torch.save((Marker(marker),), buffer)
    return buffer.getvalue()


@dataclass
class Entry:
    """One zip entry as it lies in the file: `data` as stored (deflated when method is 8), with the CRC and
    size of the uncompressed bytes (computed from `data` when it is stored)."""

    name: str
    data: bytes
    method: int = 0
    crc: int | None = None
    size: int | None = None
    comment: bytes = b""  # the central directory entry's comment


def records(path: Path) -> list[Entry]:
    """The archive's entries in file order, with their full names (the root folder included)."""
    with zipfile.ZipFile(path) as archive:
        return [Entry(info.filename, archive.read(info)) for info in archive.infolist()]


def replaced(entries: list[Entry], changes: dict[str, bytes | Entry]) -> list[Entry]:
    """A copy of entries with some, named without the root folder, replaced (an Entry keeps its own name)."""
    root = entries[0].name.split("/")[0]
    result = []
    for entry in entries:
        change = changes.get(entry.name.split("/", 1)[1])
        if isinstance(change, Entry):
            result.append(Entry(entry.name, change.data, change.method, change.crc, change.size))
        else:
            result.append(entry if change is None else Entry(entry.name, change))
    known = {entry.name.split("/", 1)[1] for entry in entries}
    result += [
        Entry(f"{root}/{name}", data) for name, data in changes.items() if name not in known and isinstance(data, bytes)
    ]
    return result


def local_entries(entries: list[Entry], start: int, stated_start: int | None = None) -> tuple[bytes, bytes]:
    """(local headers with data, central directory) for entries laid out from file offset `start`; the
    directory states each header at its offset minus (start - stated_start)."""
    stated_start = start if stated_start is None else stated_start
    body, directory = io.BytesIO(), io.BytesIO()
    for entry in entries:
        name = entry.name.encode()
        crc = zlib.crc32(entry.data) if entry.crc is None else entry.crc
        size = len(entry.data) if entry.size is None else entry.size
        fields = (20, 0, entry.method, 0, 0, crc, len(entry.data), size, len(name))
        offset = stated_start + body.tell()
        body.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + name + entry.data)
        directory.write(
            struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, *fields, 0, len(entry.comment), 0, 0, 0, offset)
            + name
            + entry.comment
        )
    return body.getvalue(), directory.getvalue()


def end_record(count: int, directory_size: int, directory_offset: int) -> bytes:
    return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, directory_size, directory_offset, 0)


def zip_archive(entries: list[Entry]) -> bytes:
    """A plain zip of the entries, in their order."""
    body, directory = local_entries(entries, 0)
    return body + directory + end_record(len(entries), len(directory), len(body))


def two_views(plain: Path, marker: Path) -> bytes:
    """One file, two archives. torch's miniz reader follows the end record's stated directory offset and
    finds the program with its schema's major version set to 99, which `load_pt2` refuses; Python's
    zipfile places the directory at the end record's position minus its size and finds the pre-2.8
    format, whose serialized_constants.pt `torch.export.load` then unpickles with weights_only=False."""
    program = records(plain)
    root = program[0].name.split("/")[0]
    graph = json.loads(next(entry.data for entry in program if entry.name == f"{root}/models/model.json"))
    future = {**graph, "schema_version": {"major": 99, "minor": 0}}
    miniz_view = replaced(program, {"models/model.json": json.dumps(future).encode()})
    legacy_view = [
        Entry("version", b"8.20"),
        Entry("serialized_exported_program.json", json.dumps(graph).encode()),
        Entry("serialized_state_dict.pt", b""),
        Entry("serialized_constants.pt", pickled_marker(marker)),
        Entry("serialized_example_inputs.pt", b""),
    ]
    miniz_body, miniz_directory = local_entries(miniz_view, 0)
    _, short_directory = local_entries(legacy_view, 0)
    legacy_view[-1].comment = b" " * max(0, len(miniz_directory) - len(short_directory))  # miniz reads this much
    stated = len(miniz_body)  # where the end record says the directory is: the miniz view's
    legacy_start = stated + len(miniz_directory)
    legacy_size = sum(30 + len(entry.name) + len(entry.data) for entry in legacy_view)
    shift = legacy_start + legacy_size - stated  # zipfile adds this to every offset the legacy directory states
    legacy_body, legacy_directory = local_entries(legacy_view, legacy_start, legacy_start - shift)
    assert legacy_start - shift >= 0, "the miniz view must be the larger"
    return (
        miniz_body
        + miniz_directory
        + legacy_body
        + legacy_directory
        + end_record(len(miniz_view), len(legacy_directory), stated)
    )


def deflate_bomb(data: bytes, inflated_size: int) -> Entry:
    """`data` padded with zeros to inflated_size bytes and deflated: about a thousandth of its inflated size.
    Built from one deflated block of zeros repeated (full flushes make the blocks identical), so a 1 GiB
    record costs a second to make."""
    chunk = 1 << 20
    if (inflated_size - len(data)) % chunk:
        raise ValueError("the zero padding must be a whole number of MiB")
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = head.compress(data) + head.flush(zlib.Z_FULL_FLUSH)
    zeros = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = zeros.compress(bytes(chunk)) + zeros.flush(zlib.Z_FULL_FLUSH)
    repeats = (inflated_size - len(data)) // chunk
    crc = zlib.crc32(data)
    zero_chunk = bytes(chunk)
    for _ in range(repeats):
        crc = zlib.crc32(zero_chunk, crc)
    stream += block * repeats + b"\x03\x00"  # an empty final block
    return Entry("", stream, method=8, crc=crc, size=inflated_size)
