"""Where a server keeps a buffer group's replay buffer, and how it is read back: one module for the server
(service/catalogue/buffer_store.py) and the CLI (`sample --state-dir`), so both find the same file for every model.

A group's buffer is keyed by its digest: SHA-256 over its members' digests in sorted order, each member's the
SHA-256 of its file (a program's together with its sidecar), so retraining any member retires the buffer. A
single server saves `buffer-GROUP-DIGEST16.safetensors`; the replicas of `--engine ray` save a shard each,
`buffer-GROUP-DIGEST16-SHARD.safetensors`, and whoever reads pools every file of the group and digest,
thinned evenly to the largest capacity among them. A saved file is read only if a server could have written
it (size, dtypes, capacity and values bounded before anything is allocated for it).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.families import family_of
from training.runtime.buffer_names import buffer_file_name, group_digest, model_digest, saved_buffer_paths
from training.runtime.checkpoint import CheckpointError, max_buffer_capacity, read_metadata, read_model_file
from training.runtime.exported import PROGRAM_SUFFIX, SIDECAR_SUFFIX, read_sidecar
from training.runtime.load import read_model_files
from training.runtime.loaded import LoadedModel
from training.sampling.replay_buffer import ReplayBuffer

log = logging.getLogger(__name__)

HEADER_BYTES = 64 * 1024  # a saved buffer's safetensors header and metadata: under 1 KiB as a server writes it
SAVED_KEYS = {"samples", "labels", "capacity", "restart_prob", "next_replace", "data_range"}  # labels optional
SAMPLE_DTYPES = (torch.float16, torch.float32)  # servers save float16; those before saved float32
FILE_DTYPES = {"F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64}
FILE_NAMES = {dtype: name for name, dtype in FILE_DTYPES.items()}
CHUNK_BYTES = 16 * 2**20  # samples copied at a time when a buffer is saved or read
NOT_FINITE = "samples are not all finite: chains started from them would diverge at once"


def max_buffer_file_bytes(shape: tuple[int, ...]) -> int:
    """The largest file a saved buffer of samples `shape` can be: float32 samples (as servers before float16
    buffers wrote them) and int64 labels at the largest capacity a server allocates, and a header."""
    return max_buffer_capacity(shape) * (4 * math.prod(shape) + 8) + HEADER_BYTES


def check_saved_state(state: dict[str, torch.Tensor], shape: tuple[int, ...], values: bool = True) -> None:
    """Refuse (ValueError) a saved buffer a server could not have written, before a buffer is allocated for its
    stated capacity: ReplayBuffer.from_state_dict would otherwise allocate whatever it claims. With
    values=False the samples' values are left to the caller (they are read later, a chunk at a time)."""
    missing, unknown = sorted(SAVED_KEYS - {"labels"} - set(state)), sorted(set(state) - SAVED_KEYS)
    if missing or unknown:
        raise ValueError(f"tensors missing {missing}, unknown {unknown}; a saved buffer has {sorted(SAVED_KEYS)}")
    samples, labels = state["samples"], state.get("labels")
    if samples.dtype not in SAMPLE_DTYPES or tuple(samples.shape[1:]) != shape or samples.dim() != len(shape) + 1:
        needed = ", ".join(str(size) for size in shape)
        raise ValueError(
            f"samples are {samples.dtype} {list(samples.shape)}; the model needs float16 or float32 [n, {needed}]"
        )
    if labels is not None and (labels.dtype != torch.int64 or list(labels.shape) != [len(samples)]):
        raise ValueError(f"labels are {labels.dtype} {list(labels.shape)}; they should be int64 [{len(samples)}]")
    for name in ("capacity", "next_replace"):
        if state[name].dtype != torch.int64 or state[name].dim() != 0:
            raise ValueError(f"{name} is {state[name].dtype} {list(state[name].shape)}, not one int64")
    capacity, most = int(state["capacity"]), max_buffer_capacity(shape)
    if not 1 <= capacity <= most:
        raise ValueError(f"capacity {capacity:,} is not a buffer this server allocates (1 to {most:,} samples)")
    if len(samples) > capacity or not 0 <= int(state["next_replace"]) < capacity:
        raise ValueError(
            f"{len(samples)} samples and next_replace {int(state['next_replace'])} do not fit capacity {capacity}"
        )
    restart_prob, data_range = state["restart_prob"], state["data_range"]
    if not (restart_prob.is_floating_point() and restart_prob.dim() == 0 and 0.0 <= float(restart_prob) <= 1.0):
        raise ValueError(f"restart_prob {restart_prob.tolist()} is not one probability")
    if not (data_range.is_floating_point() and list(data_range.shape) == [2] and bool(data_range.isfinite().all())):
        raise ValueError(f"data_range {data_range.tolist()} is not [low, high]")
    if not data_range[0] < data_range[1]:
        raise ValueError(f"data_range {data_range.tolist()} is empty; low must be below high")
    if values and not bool(samples.isfinite().all()):
        raise ValueError(NOT_FINITE)


@dataclass
class SavedBuffer:
    """One saved buffer file, its header and small tensors read and checked; its samples still on disk."""

    path: Path
    small: dict[str, torch.Tensor]  # labels, capacity, restart_prob, next_replace, data_range
    rows: int  # samples saved
    dtype: torch.dtype  # float16, or float32 as servers before float16 buffers saved them
    offset: int  # where the samples' bytes begin in the file

    @property
    def capacity(self) -> int:
        return int(self.small["capacity"])

    def labels(self) -> torch.Tensor:
        return self.small.get("labels", torch.full((self.rows,), -1))


def _header(handle: io.BufferedReader, size: int) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) checked against the file's size, and
    where its data begins. Read by hand so that samples can be read a chunk at a time (no copy of the file)."""
    (length,) = struct.unpack("<Q", handle.read(8).ljust(8, b"\0"))
    if not 2 <= length <= min(HEADER_BYTES, size - 8):
        raise ValueError(f"a safetensors header of {length:,} bytes; a saved buffer's is under {HEADER_BYTES:,}")
    header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data = size - 8 - length
    for name, entry in header.items():
        entry = entry if isinstance(entry, dict) else {}
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (
            entry.get("dtype") in FILE_DTYPES
            and isinstance(shape, list)
            and all(isinstance(n, int) and 0 <= n < 2**40 for n in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(n, int) for n in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data
        ):
            raise ValueError(f"tensor {str(name)[:40]!r} has an unreadable entry in the safetensors header")
        if offsets[1] - offsets[0] != math.prod(shape) * FILE_DTYPES[entry["dtype"]].itemsize:
            raise ValueError(f"tensor {str(name)[:40]!r}: its byte range does not fit its shape and dtype")
    return header, 8 + length


def _read_tensor(
    handle: io.BufferedReader,
    entry: dict[str, Any],
    data_start: int,
    rows: slice | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A tensor of the file (with `rows`: those rows of it) read straight into memory (`out`'s first rows when
    given, else fresh), no other copy made."""
    dtype, shape = FILE_DTYPES[entry["dtype"]], list(entry["shape"])
    start = entry["data_offsets"][0]
    if rows is not None:
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        start += rows.start * row_bytes
        shape[0] = rows.stop - rows.start
    tensor = torch.empty(shape, dtype=dtype) if out is None else out[: shape[0]]
    handle.seek(data_start + start)
    view = tensor.view(-1).view(torch.uint8).numpy().data if tensor.numel() else memoryview(bytearray())
    if handle.readinto(view) != len(view):
        raise ValueError("the file ends before its tensors do")
    return tensor


def open_saved_buffer(path: Path, shape: tuple[int, ...]) -> SavedBuffer:
    """A saved buffer's header and small tensors, checked (check_saved_state) before anything of its stated
    capacity is allocated; ValueError (or OSError) saying why it cannot be used."""
    size, largest = path.stat().st_size, max_buffer_file_bytes(shape)
    if size > largest:
        raise ValueError(f"{size:,} bytes; no buffer of samples {list(shape)} takes over {largest:,}")
    with path.open("rb") as handle:
        header, data_start = _header(handle, size)
        if "samples" not in header:
            raise ValueError(f"tensors missing ['samples']; a saved buffer has {sorted(SAVED_KEYS)}")
        samples = header["samples"]
        rows = samples["shape"][0] if samples["shape"] else 0
        small = {}
        for name, entry in header.items():
            if name == "samples":
                continue
            if name not in SAVED_KEYS or math.prod(entry["shape"]) > max(rows, 2):
                raise ValueError(f"tensor {str(name)[:40]!r} {entry['shape']} is not one a saved buffer has")
            small[name] = _read_tensor(handle, entry, data_start)
    dtype = FILE_DTYPES[samples["dtype"]]
    check_saved_state({**small, "samples": torch.empty(samples["shape"], dtype=dtype, device="meta")}, shape, False)
    return SavedBuffer(path, small, rows, dtype, data_start + samples["data_offsets"][0])


def read_saved_buffers(
    saved: list[SavedBuffer], shape: tuple[int, ...], capacity: int | None = None, dtype: torch.dtype = torch.float32
) -> ReplayBuffer:
    """Saved buffers of one group as one buffer in `dtype`: their slots in order, thinned evenly to `capacity`
    (default: the largest saved one, so pooling at every restart never grows the buffer), classes kept with
    their slots. Samples are read CHUNK_BYTES at a time straight into the buffer: the load's peak is the
    buffer and one chunk. A file whose samples are not all finite raises UnreadableBuffer naming it."""
    capacity = max(each.capacity for each in saved) if capacity is None else capacity
    first = saved[0].small
    low, high = first["data_range"].tolist()
    buffer = ReplayBuffer(shape, capacity, float(first["restart_prob"]), (low, high), dtype)
    total = sum(each.rows for each in saved)
    keep = ReplayBuffer.kept_rows(total, capacity)  # [kept] rows of all files in order
    row_bytes = math.prod(shape) * max(each.dtype.itemsize for each in saved)
    chunk_rows = max(1, CHUNK_BYTES // row_bytes)
    filled, first_row = 0, 0
    chunks = {each.dtype: torch.empty(chunk_rows, *shape, dtype=each.dtype) for each in saved}  # reused per chunk
    for each in saved:
        mine = keep[(keep >= first_row) & (keep < first_row + each.rows)] - first_row  # [k] rows of this file
        labels = each.labels()
        try:
            with each.path.open("rb") as handle:
                for start in range(0, each.rows, chunk_rows):
                    stop = min(start + chunk_rows, each.rows)
                    wanted = mine[(mine >= start) & (mine < stop)]
                    if not len(wanted):
                        continue
                    entry = {"dtype": FILE_NAMES[each.dtype], "shape": [each.rows, *shape], "data_offsets": [0, 0]}
                    chunk = _read_tensor(handle, entry, each.offset, slice(start, stop), chunks[each.dtype])
                    if not bool(chunk.isfinite().all()):
                        raise ValueError(NOT_FINITE)
                    whole = len(wanted) == stop - start
                    buffer.samples[filled : filled + len(wanted)] = chunk if whole else chunk[wanted - start]
                    buffer.labels[filled : filled + len(wanted)] = labels[wanted]
                    filled += len(wanted)
        except (ValueError, OSError) as error:
            raise UnreadableBuffer(each.path, error) from error
        first_row += each.rows
    buffer.size = filled
    if len(saved) == 1 and filled == saved[0].rows and capacity:
        buffer.next_replace = int(first["next_replace"]) % capacity
    elif capacity:
        buffer.next_replace = filled % capacity
    return buffer


class UnreadableBuffer(ValueError):
    """A saved buffer file whose samples could not be read (its path, and why)."""

    def __init__(self, path: Path, error: Exception) -> None:
        super().__init__(f"{path}: {error}")
        self.path = path
        self.error = error


def read_saved_state(path: Path, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """One saved buffer's whole state, checked; ValueError (or OSError) saying why it cannot be used."""
    saved = open_saved_buffer(path, shape)
    buffer = read_saved_buffers([saved], shape, saved.capacity, saved.dtype)
    return {**saved.small, "samples": buffer.samples[: len(buffer)], "labels": buffer.labels[: len(buffer)]}


def buffer_file_chunks(buffer: ReplayBuffer, group: str) -> Iterator[bytes | memoryview]:
    """The buffer as a safetensors file, a chunk at a time: samples in the buffer's dtype copied out
    CHUNK_BYTES at a time (`ReplayBuffer.rows`, each row whole), so a save on another thread holds one chunk
    more than the buffer, and steps wait at most for one chunk's copy. Slots written while the save runs are
    saved old or new, never torn. Each chunk yielded must be written before the next is asked for."""
    size, capacity, next_replace = len(buffer), buffer.capacity, buffer.next_replace
    dtype, shape = buffer.dtype, buffer.shape
    small = {
        "capacity": torch.tensor(capacity),
        "restart_prob": torch.tensor(buffer.restart_prob, dtype=torch.float64),
        "next_replace": torch.tensor(next_replace),
        "data_range": torch.tensor(buffer.data_range, dtype=torch.float64),
    }
    sample_bytes = size * math.prod(shape) * dtype.itemsize
    entries: dict[str, Any] = {
        "__metadata__": {"group": group},
        "samples": {"dtype": FILE_NAMES[dtype], "shape": [size, *shape], "data_offsets": [0, sample_bytes]},
        "labels": {"dtype": "I64", "shape": [size], "data_offsets": [sample_bytes, sample_bytes + 8 * size]},
    }
    offset = sample_bytes + 8 * size
    for name, tensor in small.items():
        entries[name] = {
            "dtype": FILE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
    yield struct.pack("<Q", len(header)) + header
    chunk_rows = max(1, min(size, CHUNK_BYTES // (math.prod(shape) * dtype.itemsize)))
    chunk = torch.empty(chunk_rows, *shape, dtype=dtype)  # [chunk_rows, *shape], reused: each is written first
    labels = []
    for start in range(0, size, chunk_rows):
        stop = min(start + chunk_rows, size)
        labels.append(buffer.rows(start, stop, chunk))
        yield chunk[: stop - start].view(-1).view(torch.uint8).numpy().data
    yield torch.cat(labels).numpy().tobytes() if labels else b""
    for tensor in small.values():
        yield tensor.numpy().tobytes()


def _payload(path: Path) -> bytes:
    """What a server's digest of a member covers: its bytes and a program's sidecar's, as the loader read them."""
    return read_model_files(path, path.parent).digested


def _ensemble_of(path: Path) -> str | None:
    """The ensemble an EBM file declares (a checkpoint's metadata, a program's sidecar); None otherwise."""
    try:
        if path.suffix == PROGRAM_SUFFIX:
            config = read_sidecar(path.with_suffix(SIDECAR_SUFFIX))
            return config.ensemble  # the sidecar's schema gives an ensemble to energies only
        raw = json.loads(read_metadata(read_model_file(path, path.parent), str(path)).get("config", "{}"))
    except (CheckpointError, json.JSONDecodeError, OSError, ValueError, RecursionError):
        return None  # the server refuses such a file too
    return raw.get("ensemble") if isinstance(raw, dict) and raw.get("family") == "ebm" else None


def buffer_group_files(checkpoints: list[Path], ensemble: str | None) -> list[Path]:
    """The model files whose EBMs a server, serving the first one's directory, samples over one replay buffer:
    the files given and, for an ensemble, every EBM checkpoint or program beside them in the same ensemble."""
    files = {Path(path).resolve() for path in checkpoints}
    if ensemble:
        folder = Path(checkpoints[0]).parent
        for sibling in [*folder.glob("*.safetensors"), *folder.glob(f"*{PROGRAM_SUFFIX}")]:
            if _ensemble_of(sibling) == ensemble:
                files.add(sibling.resolve())
    return sorted(files)


def load_server_buffer(
    state_dir: str | Path, checkpoints: list[Path], members: list[LoadedModel]
) -> tuple[ReplayBuffer, list[Path]]:
    """The replay buffer a server saved in its --state-dir for these EBMs (one, or members of an ensemble),
    read as the server reads it (every shard pooled) without changing anything there; and the files read."""
    state_dir = Path(state_dir)
    first = members[0]
    if not family_of(first).keeps_buffers:
        raise ValueError(f"--state-dir: {first.name} is a {first.config.family} model; only EBMs have replay buffers")
    if not any(member.has_replay_buffer for member in members):
        raise ValueError(f"--state-dir: {first.name} was trained without a replay buffer; a server keeps none for it")
    if not state_dir.is_dir():
        raise FileNotFoundError(f"--state-dir {state_dir} is not a directory; pass the server's --state-dir")
    group = first.config.ensemble or first.name
    files = buffer_group_files(checkpoints, first.config.ensemble)
    digest = group_digest(model_digest(_payload(path)) for path in files)
    paths = saved_buffer_paths(state_dir, group, digest)
    if not paths:
        others = sorted(other.name for other in state_dir.glob(f"buffer-{glob.escape(group)}-*.safetensors"))
        hint = (
            f"it holds {', '.join(others)}, saved while {group} had other model files than "
            f"{', '.join(file.name for file in files)}"
            if others
            else "a server saves it once chains have run (every --buffer-save-interval-s, and at shutdown)"
        )
        name = buffer_file_name(group, digest)
        raise FileNotFoundError(f"{state_dir} has no replay buffer {name} (or its shards) for {group}: {hint}")
    saved = []
    for path in paths:
        try:
            saved.append(open_saved_buffer(path, first.shape))
        except (ValueError, KeyError, RuntimeError, OSError) as error:
            raise ValueError(f"replay buffer {path} is unreadable ({error}); a server moves it aside on start") from (
                error
            )
    try:
        return read_saved_buffers(saved, first.shape), paths
    except UnreadableBuffer as error:
        raise ValueError(
            f"replay buffer {error.path} is unreadable ({error.error}); a server moves it aside on start"
        ) from error
