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
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
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
MAX_MODEL_BYTES = 512 * 1024 * 1024  # the largest model file read (service/settings.py's max_model_bytes default)
MAX_BUFFER_VALUES = 2**28  # replay-buffer capacity x values per sample: 1 GiB of float32 (MNIST's 8192: 6.4 M)
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


# --- what a file states: one schema for a checkpoint's config and a program's sidecar -----------------------
MAX_CLASSES = 10_000  # class names a conditional model may list (MNIST: 10, ImageNet: 1,000)
MAX_TEXT_CHARS = 256  # a class name, a dataset name, a metrics key
MAX_METRICS_DEPTH = 8  # evaluate's records nest 2 deep
MAX_METRICS_VALUES = 10_000  # numbers, strings, lists and objects in all of `metrics` (the shipped ones: ~60)
MAX_DIMS = 8


def parse_json(text: str | bytes, what: str) -> Any:
    """JSON read from a file; CheckpointError naming `what` when it is not JSON or nests past what Python's
    parser can follow (a RecursionError is not a traceback for the user)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{what} is not valid JSON ({error})") from error
    except RecursionError:
        raise CheckpointError(f"{what} nests too deeply to be read") from None


def _shown_value(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


class StatedData(BaseModel):
    """`data`: what the samples are. A range is two finite numbers, low < high (every pixel is mapped through
    it); classes are names (the network's count is checked once it is built: training/runtime/load.py)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    shape: list[int] = Field(min_length=1, max_length=MAX_DIMS)  # [C, H, W]
    range: list[float] = Field(default_factory=lambda: [-1.0, 1.0])  # [low, high] of a sample's values
    classes: list[str] | None = Field(None, min_length=1, max_length=MAX_CLASSES)  # names a `label` indexes
    dataset: str | None = Field(None, max_length=MAX_TEXT_CHARS)  # what it was trained on: mnist, fashion-mnist
    levels: int | None = Field(None, ge=2, le=65_536)  # quantization levels of the data (256 for 8-bit images)

    @field_validator("shape", mode="before")
    @classmethod
    def positive_sizes(cls, shape: object) -> object:
        if not (isinstance(shape, list) and shape and all(type(size) is int and size >= 1 for size in shape)):
            raise ValueError(f"data.shape must be a list of positive integers, not {_shown_value(shape)}")
        if math.prod(shape) > MAX_SAMPLE_VALUES:
            raise ValueError(
                f"data.shape {shape} has {math.prod(shape):,} values per sample; at most {MAX_SAMPLE_VALUES:,}"
            )
        return shape

    @field_validator("range", mode="before")
    @classmethod
    def low_below_high(cls, ends: object) -> object:
        if not (
            isinstance(ends, list)
            and len(ends) == 2
            and all(type(end) in (int, float) and math.isfinite(end) for end in ends)
            and ends[0] < ends[1]
        ):
            raise ValueError(
                f"data.range must be [low, high], two finite numbers with low < high, not {_shown_value(ends)}"
            )
        return ends

    @field_validator("classes", mode="before")
    @classmethod
    def names(cls, classes: object) -> object:
        if classes is not None and not (
            isinstance(classes, list)
            and 0 < len(classes) <= MAX_CLASSES
            and all(isinstance(name, str) and 0 < len(name) <= MAX_TEXT_CHARS for name in classes)
        ):
            raise ValueError(
                f"data.classes must be a non-empty list of at most {MAX_CLASSES:,} class names (strings of 1 to "
                f"{MAX_TEXT_CHARS} characters), not {_shown_value(classes)}"
            )
        return classes


def check_metrics(metrics: object) -> dict[str, Any]:
    """`metrics` if it is an object of at most MAX_METRICS_VALUES values nested at most MAX_METRICS_DEPTH deep,
    walked without recursion (a file nested 5,000 deep must not end in a RecursionError)."""
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be an object, not {_shown_value(metrics)}")
    stack: list[tuple[object, int]] = [(metrics, 1)]
    count = 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_METRICS_VALUES:
            raise ValueError(f"metrics hold more than {MAX_METRICS_VALUES:,} values")
        if depth > MAX_METRICS_DEPTH and isinstance(item, dict | list):
            raise ValueError(f"metrics nest deeper than {MAX_METRICS_DEPTH} levels")
        if isinstance(item, dict):
            if not all(isinstance(key, str) and len(key) <= MAX_TEXT_CHARS for key in item):
                raise ValueError(f"metrics keys must be strings of at most {MAX_TEXT_CHARS} characters")
            stack.extend((value, depth + 1) for value in item.values())
        elif isinstance(item, list):
            stack.extend((value, depth + 1) for value in item)
        elif not (item is None or isinstance(item, bool | int | float | str)):
            kind = type(item).__name__
            raise ValueError(f"metrics values must be JSON numbers, strings, lists or objects, not {kind}")
    return metrics


class StatedConfig(BaseModel):
    """What a model file states about itself and the server trusts: one strict schema, applied at load to a
    checkpoint's config (`ModelConfig.from_json`) and an exported program's sidecar (`exported.read_sidecar`)
    alike, by the server and every command. The architecture is checked by building it (load.py)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    family: str
    data: StatedData
    sampler: Any  # the family's typed sampler (training/sampling/sampler_config.py), checked below
    metrics: dict[str, Any]
    ensemble: str | None = None

    @field_validator("metrics", mode="before")
    @classmethod
    def bounded(cls, metrics: object) -> dict[str, Any]:
        return check_metrics(metrics)

    @model_validator(mode="after")
    def sampler_and_ensemble(self) -> StatedConfig:
        if self.family in SAMPLERS:
            sampler_for(self.family, self.sampler)
        elif not isinstance(self.sampler, dict):
            raise ValueError(f"sampler must be an object, not {_shown_value(self.sampler)}")
        if self.ensemble is not None:
            if self.family != "ebm":
                raise ValueError("ensemble: only energies (family ebm) form ensembles")
            check_name(self.ensemble, "ensemble", "the config")
        return self


def check_stated(raw: dict[str, Any], source: str) -> StatedConfig:
    """`raw` (a config's or a sidecar's fields) checked against StatedConfig and the size limits; CheckpointError
    with one line naming the first value outside them."""
    try:
        stated = StatedConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "value_error":
            reason = str(first["ctx"]["error"]).removeprefix("the config: ")
        else:
            reason = f"{where or 'the config'}: {first['msg'].lower()}, not {_shown_value(first.get('input'))}"
        raise CheckpointError(f"{source}: {reason}") from None
    check_sizes(raw, source)
    return stated


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


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write, fsync, rename: a crash at any moment leaves the old file or the new one, never a torn one, and a
    reader that opens the path (a server watching its models directory) gets one of the two whole.

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
            handle.write(payload)
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
        raise CheckpointError(f"{path.name}: cannot read it: there is no such file")
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
