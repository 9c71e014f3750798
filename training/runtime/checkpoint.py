"""The one checkpoint format, for every model family.

A checkpoint is a single `.safetensors` file. Tensor names are `<group>/<name>`: the group `weights`
holds the model's state dict; other groups hold extras (`replay_buffer`, `ema`, `critic`, ...). The
safetensors metadata key `config` holds JSON that says how to rebuild and sample the model. Loading
never unpickles anything, and a file with an unknown schema version or a missing field is refused.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from training.runtime.stated import MAX_ARCH_NUMBER as MAX_ARCH_NUMBER
from training.runtime.stated import MAX_SAMPLE_VALUES as MAX_SAMPLE_VALUES
from training.runtime.stated import CheckpointError as CheckpointError
from training.runtime.stated import check_name as check_name
from training.runtime.stated import check_stated as check_stated
from training.runtime.stated import first_line as first_line
from training.runtime.stated import parse_json as parse_json
from training.sampling.sampler_config import SAMPLERS

SCHEMA_VERSION = 1
SAMPLED_FAMILIES = tuple(SAMPLERS)  # ebm, gan, flow: what sample, evaluate, the zoo and the server draw from
FAMILIES = (*SAMPLED_FAMILIES, "classifier")
WEIGHTS_GROUP = "weights"
MAX_MODEL_BYTES = 512 * 1024 * 1024  # the largest model file read (service/settings.py's max_model_bytes default)
# Replay-buffer capacity x values per sample a file may claim: 2 GiB of float16 (IGEBM's 10,000 slots of
# 3 x 128 x 128 are 0.49 G values); what a server allocates is bounded by its --buffer-budget-mb.
MAX_BUFFER_VALUES = 2**30


def max_buffer_capacity(shape: list[int] | tuple[int, ...]) -> int:
    """The most samples of `shape` a replay buffer read from a file may hold (MAX_BUFFER_VALUES in all)."""
    return MAX_BUFFER_VALUES // math.prod(shape)


@dataclass
class ModelConfig:
    """What a checkpoint says about itself; stored as JSON in the safetensors metadata."""

    family: str  # ebm | flow | gan (| classifier, the evaluation network)
    arch: dict[str, Any]  # {"name": ..., "kwargs": {...}}: rebuilds the nn.Module
    data: dict[str, Any]  # {"shape": [1, 28, 28], "range": [-1, 1], "dataset": "mnist"}
    sampler: dict[str, Any] = field(default_factory=dict)  # training.sampling.sampler_config's dict for the family
    training: dict[str, Any] = field(default_factory=dict)  # args, seed, wall time, device
    metrics: dict[str, Any] = field(default_factory=dict)  # evaluate figures, final losses
    ensemble: str | None = None  # EBMs that name one ensemble share one replay buffer when served
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "checkpoint") -> ModelConfig:
        raw = parse_json(text, f"{source}: config metadata")
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: config metadata must be a JSON object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CheckpointError(
                f"{source}: schema_version {version!r} is not supported (this version reads {SCHEMA_VERSION})"
            )
        for required in ("family", "arch", "data", "sampler", "training", "metrics"):
            if required not in raw:
                raise CheckpointError(f"{source}: config lacks the required field {required!r}")
        if raw["family"] not in FAMILIES:
            raise CheckpointError(f"{source}: family {raw['family']!r} is not one of {', '.join(FAMILIES)}")
        if not isinstance(raw["arch"], dict) or "name" not in raw["arch"]:
            raise CheckpointError(f"{source}: arch must be an object with a 'name' and 'kwargs'")
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise CheckpointError(f"{source}: config has unknown fields {sorted(unknown)}")
        check_stated(raw, source)
        return cls(**raw)


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes | Iterable[bytes | memoryview]) -> None:
    """Write, fsync, rename: a crash at any moment leaves the old file or the new one, never a torn one, and a
    reader that opens the path (a server watching its models directory) gets one of the two whole. `payload`
    may come in chunks (a replay buffer's save: never all in memory at once).

    The finished file's mtime is set 1 ns before its ctime, so a watcher that polls can tell it is complete
    at first sight (ctime after mtime: nothing wrote to it since; service/catalogue/model_watch.py): the clock the
    kernel stamps both with is coarse, and a write and its rename often share one tick.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(descriptor, 0o644)  # mkstemp makes 0600; a checkpoint is meant to be shared
        with os.fdopen(descriptor, "wb") as handle:
            for chunk in [payload] if isinstance(payload, bytes) else payload:
                handle.write(chunk)
            handle.flush()
            written = os.fstat(handle.fileno())
            os.utime(handle.fileno(), ns=(written.st_atime_ns, written.st_ctime_ns - 1))  # ctime becomes now
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def encode_checkpoint(checkpoint: Checkpoint, dtype: torch.dtype | None = None) -> bytes:
    """Serialize to safetensors bytes; `dtype` (e.g. float16) shrinks floating tensors for shipping."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()  # safetensors refuses tensors that share memory: copy a repeated one
    groups = {WEIGHTS_GROUP: checkpoint.weights, **checkpoint.extras}
    for group, named in groups.items():
        if "/" in group:
            raise CheckpointError(f"extra group name {group!r} must not contain '/'")
        for name, tensor in named.items():
            tensor = tensor.detach().to("cpu")
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensor = tensor.contiguous()
            if tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[f"{group}/{name}"] = tensor
    return save_safetensors_bytes(tensors, metadata={"config": checkpoint.config.to_json()})


def save_checkpoint(path: str | os.PathLike, checkpoint: Checkpoint, dtype: torch.dtype | None = None) -> None:
    atomic_write_bytes(path, encode_checkpoint(checkpoint, dtype))


def read_metadata(payload: bytes, source: str) -> dict[str, str]:
    """The safetensors header's metadata, read without touching the tensors."""
    if len(payload) < 8:
        raise CheckpointError(f"{source}: file is too short to be safetensors")
    header_size = int.from_bytes(payload[:8], "little")
    if header_size > len(payload) - 8:
        raise CheckpointError(f"{source}: safetensors header is truncated")
    header = parse_json(payload[8 : 8 + header_size], f"{source}: safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: safetensors header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise CheckpointError(f"{source}: safetensors metadata must map names to strings")
    return metadata


def decode_checkpoint(payload: bytes, source: str = "checkpoint") -> Checkpoint:
    metadata = read_metadata(payload, source)
    if "config" not in metadata:
        raise CheckpointError(f"{source}: safetensors metadata has no 'config' key; not a checkpoint of this project")
    config = ModelConfig.from_json(metadata["config"], source)
    try:
        tensors = load_safetensors_bytes(payload)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{source}: tensors could not be read ({error})") from error
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        group, _, name = key.partition("/")
        groups.setdefault(group, {})[name] = tensor
    weights = groups.pop(WEIGHTS_GROUP, None)
    if not weights:
        raise CheckpointError(f"{source}: no '{WEIGHTS_GROUP}/...' tensors found")
    return Checkpoint(config=config, weights=weights, extras=groups)


def load_checkpoint(path: str | os.PathLike, max_bytes: int = MAX_MODEL_BYTES) -> Checkpoint:
    """A checkpoint as a command reads it to change and save it again (set-sampler, evaluate --record, resume):
    through the checked reader, then the checks of what it states."""
    path = Path(path)
    try:
        payload = read_model_file(path, path.parent, max_bytes)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read checkpoint ({error.strerror})") from error
    return decode_checkpoint(payload, str(path))


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path: Path, mode: int) -> CheckpointError:
    kind = next((name for test, name in _KINDS if test(mode)), "a device")
    return CheckpointError(f"{path.name} is not a regular file but {kind}; only regular files are read")


def read_model_file(path: Path, models_dir: Path, max_bytes: int = MAX_MODEL_BYTES) -> bytes:
    """The bytes of a file in the models directory, read only when it is a regular file of at most max_bytes
    that is (or links to) a file inside the directory: so reading never blocks, never fills memory, and a
    refusal never shows what a link out of the folder points at. The one reader of a model file, its sidecar
    and a checkpoint a command opens (its own folder as `models_dir`): each is read once, here, and every
    check and parse works on the bytes it returns."""
    if not os.path.lexists(path):
        raise CheckpointError(f"{path.name} does not exist; check the path and the file's name (cannot read it)")
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling link, or a loop of links
        raise CheckpointError(f"{path.name} is a link that does not resolve to a file") from None
    if not target.is_relative_to(models_dir.resolve()):
        raise CheckpointError(
            f"{path.name} is a link that leads outside the models directory; only files inside it are read "
            "(copy the file in instead)"
        )
    if not stat.S_ISREG(mode := target.stat().st_mode):  # before opening: opening a device may act on it
        raise _not_regular(path, mode)
    descriptor = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)  # a FIFO swapped in: no wait
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise _not_regular(path, status.st_mode)
        if status.st_size > max_bytes:
            raise CheckpointError(
                f"{path.name} is {status.st_size:,} bytes; the server reads files of at most {max_bytes:,} "
                "bytes (max_model_bytes)"
            )
        payload = handle.read(max_bytes + 1)
    if len(payload) > max_bytes:
        raise CheckpointError(f"{path.name} grew past {max_bytes:,} bytes (max_model_bytes) while it was read")
    return payload
