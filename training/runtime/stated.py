"""What a model file states about itself, checked by one strict schema before anything is built from it.

A checkpoint's config (training/runtime/checkpoint.py) and an exported program's sidecar
(training/runtime/exported.py) state the same things: the family, what the samples are (`data`), how to
sample (`sampler`), figures (`metrics`), an `ensemble`. Every reader, the server's and every command's, checks
them here, at load: a value outside the schema is one line naming it, never a 500, 503 or traceback later.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training.sampling.sampler_config import SAMPLERS, sampler_for

# Sizes no model of this project comes near: a config past them is corrupt or hostile, and is refused
# before anything is built from it (a width of 200,000 would ask for terabytes).
MAX_ARCH_NUMBER = 65_536  # any integer of an architecture (width, hidden units, layers, latent size)
MAX_SAMPLE_VALUES = 3 * 1024 * 1024  # values in one sample (data.shape); MNIST has 784
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


# --- what a file states: one schema for a checkpoint's config and a program's sidecar -----------------------
MAX_CLASSES = 10_000  # class names a conditional model may list (MNIST: 10, ImageNet: 1,000)
MAX_TEXT_CHARS = 256  # a class name, a dataset name, a metrics key
MAX_METRICS_DEPTH = 8  # evaluate's records nest 2 deep
MAX_METRICS_VALUES = 10_000  # numbers, strings, lists and objects in all of `metrics` (the shipped ones: ~60)
MAX_DIMS = 8
DEQUANTIZATIONS = ("uniform", "variational", "none")  # data.dequantization: how a flow's density meets discrete data
MAX_DEQUANTIZATION_SAMPLES = 64  # data.dequantization_samples: K draws of q(u | x) a score averages


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
    # How a flow's density relates to those levels (docs/exporting.md, "Units"): "uniform", a density over the
    # dequantized data (level k + u, u ~ U[0, 1)), whose samples the server quantizes back to the levels; "none", a
    # density evaluated at the levels' values; "variational" (Ho et al. 2019), a density over level k + u with u drawn
    # from the flow's own dequantizer program q(u | x), scored by the variational bound and quantized as "uniform";
    # unstated, uniform for scores and continuous samples (this project's own flows).
    dequantization: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    # K: draws of q(u | x) each score of a variationally dequantized flow averages the bound over (default 1).
    dequantization_samples: int | None = Field(None, ge=1, le=MAX_DEQUANTIZATION_SAMPLES)

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

    @field_validator("dequantization", mode="before")
    @classmethod
    def known_dequantization(cls, value: object) -> object:
        if value is not None and value not in DEQUANTIZATIONS:
            raise ValueError(
                f"data.dequantization must be one of {', '.join(DEQUANTIZATIONS)}, not {_shown_value(value)}"
            )
        return value

    @model_validator(mode="after")
    def samples_of_a_dequantizer(self) -> StatedData:
        if self.dequantization_samples is not None and self.dequantization != "variational":
            raise ValueError(
                "data.dequantization_samples counts draws of a variational dequantizer; state it only with "
                f'data.dequantization "variational" (not {_shown_value(self.dequantization)})'
            )
        return self

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
