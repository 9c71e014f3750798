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
import re
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from training.sampling.sampler_config import SAMPLERS, sampler_for

SCHEMA_VERSION = 1
SAMPLED_FAMILIES = ("ebm", "gan", "flow")  # what sample, evaluate, export, the zoo and the server draw from
FAMILIES = (*SAMPLED_FAMILIES, "classifier")
WEIGHTS_GROUP = "weights"
# Sizes no model of this project comes near: a config past them is corrupt or hostile, and is refused
# before anything is built from it (a width of 200,000 would ask for terabytes).
MAX_ARCH_NUMBER = 65_536  # any integer of an architecture (width, hidden units, layers, latent size)
MAX_SAMPLE_VALUES = 3 * 1024 * 1024  # values in one sample (data.shape); MNIST has 784
# Replay-buffer capacity x values per sample a file may claim: 2 GiB of float16 (IGEBM's 10,000 slots of
# 3 x 128 x 128 are 0.49 G values); what a server allocates is bounded by its --buffer-budget-mb.
MAX_BUFFER_VALUES = 2**30
# A name read from a file that becomes part of a file name (an ensemble, a model's stem, a buffer group).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
NAME_RULE = "1 to 64 of [A-Za-z0-9_.-], not '.' or '..'"


class CheckpointError(ValueError):
    """A checkpoint could not be read or is not one this version understands."""


def first_line(error: Exception) -> str:
    """An error's first line, at most 300 characters: what a refusal quotes of an exception from torch."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def check_name(name: object, what: str, source: str) -> str:
    """`name` if it may become part of a file name; else CheckpointError naming `what` and the rule.

    Names from files (an ensemble, a model's file stem) end up in the state directory's file names: a
    separator or '..' would write outside it, a null byte makes every path operation raise.
    """
    if isinstance(name, str) and NAME_PATTERN.fullmatch(name) and name not in (".", ".."):
        return name
    shown = repr(name) if len(repr(name)) <= 80 else f"{repr(name)[:77]}..."
    raise CheckpointError(f"{source}: {what} {shown} is not a name this server puts in file names: {NAME_RULE}")


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
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{source}: config metadata is not valid JSON ({error})") from error
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
        if not isinstance(raw["data"], dict) or "shape" not in raw["data"]:
            raise CheckpointError(f"{source}: data must be an object with a 'shape'")
        if raw["family"] in SAMPLERS:
            try:
                sampler_for(raw["family"], raw["sampler"])
            except ValueError as error:
                raise CheckpointError(f"{source}: {error}") from error
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise CheckpointError(f"{source}: config has unknown fields {sorted(unknown)}")
        if raw.get("ensemble") is not None:
            check_name(raw["ensemble"], "ensemble", source)
        check_sizes(raw, source)
        return cls(**raw)


def _integers(value: Any, path: str) -> list[tuple[str, int]]:
    """(dotted path, integer) for every integer inside nested dicts and lists."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [(path, value)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _integers(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in _integers(item, f"{path}[{index}]")]
    return []


def check_sizes(raw: dict[str, Any], source: str) -> None:
    """Refuse sizes no model of this project has, from the config alone: nothing has been allocated yet."""
    shape = raw["data"]["shape"]
    if not (isinstance(shape, list) and shape and all(type(size) is int and size >= 1 for size in shape)):
        raise CheckpointError(f"{source}: data.shape must be a list of positive integers, not {shape!r}")
    if math.prod(shape) > MAX_SAMPLE_VALUES:
        raise CheckpointError(
            f"{source}: data.shape {shape} has {math.prod(shape):,} values per sample; at most {MAX_SAMPLE_VALUES:,}"
        )
    latent = raw["sampler"].get("latent_dim") if isinstance(raw["sampler"], dict) else None
    sizes = _integers(raw["arch"], "arch") + ([("sampler.latent_dim", latent)] if isinstance(latent, int) else [])
    for path, number in sizes:
        if number > MAX_ARCH_NUMBER:
            raise CheckpointError(
                f"{source}: {path} is {number:,}; no architecture size may exceed {MAX_ARCH_NUMBER:,} "
                "(the config is corrupt, or not one this project wrote)"
            )


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
    at first sight (ctime after mtime: nothing wrote to it since; service/model_watch.py): the clock the
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
    try:
        header = json.loads(payload[8 : 8 + header_size])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{source}: safetensors header is not JSON ({error})") from error
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


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    try:
        payload = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read checkpoint ({error.strerror})") from error
    return decode_checkpoint(payload, str(path))
