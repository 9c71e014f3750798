"""Change the sampler defaults a checkpoint declares without retraining: what a request, `sample` or `evaluate`
gets for a field it leaves out. After a DDLS sweep a GAN's `steps`, `step_size` and `noise`; a flow's
`temperature`; an EBM's Langevin settings.

The figures `evaluate --record` stored under the old defaults would describe other sampling once the defaults
change. A record keeps the settings it pins (its key names the EBM's init, explicit noise, a GAN's non-default
steps; a GAN record always says its steps), so it stays when every changed field is pinned and is re-keyed
when a GAN's default steps move; any other is dropped and named, to be measured again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from training.commands.record_key import named_overrides
from training.families import family_named
from training.runtime.checkpoint import load_checkpoint, save_checkpoint
from training.sampling.sampler_config import SAMPLERS, VERSION_KEY, SamplerConfig, sampler_for, to_dict

# Fields a checkpoint's training fixed: the generator's latent size, what the run recorded, the prior an EqM
# energy was trained against.
FIXED_BY_TRAINING = {"latent_dim", "train_steps", "base", "prior", "prior_std"}


def settable_fields(family: str) -> list[str]:
    return [item.name for item in dataclasses.fields(SAMPLERS[family]) if item.name not in FIXED_BY_TRAINING]


def parse_value(text: str, annotation: str) -> Any:
    """`text` as the field's type, read from its annotation ("int", "float | None", "bool", "str")."""
    kinds = {kind.strip() for kind in annotation.split("|")}
    if "None" in kinds and text.lower() in ("none", "null"):
        return None
    try:
        if "bool" in kinds:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if "int" in kinds:
            return int(text)
        if "float" in kinds:
            return float(text)
    except ValueError as error:
        raise ValueError(f"{text!r} is not a value of type {annotation}") from error
    return text


def parse_assignments(family: str, words: list[str]) -> dict[str, Any]:
    """FIELD=VALUE words as typed values; ValueError naming an unknown or fixed field or a bad value."""
    annotations = {item.name: str(item.type) for item in dataclasses.fields(SAMPLERS[family])}
    settable = settable_fields(family)
    listed = ", ".join(settable)
    values: dict[str, Any] = {}
    for word in words:
        name, equals, text = word.partition("=")
        if not equals:
            raise ValueError(f"expected FIELD=VALUE, got {word!r}; the {family} sampler's fields: {listed}")
        if name not in settable:
            why = "fixed by its training" if name in annotations else "not a field of its sampler"
            raise ValueError(f"{name!r} is {why}; the {family} sampler's settable fields: {listed}")
        try:
            values[name] = parse_value(text, annotations[name])
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
    return values


def _pinned(key: str, family: str, record: dict[str, Any], new: SamplerConfig) -> set[str]:
    """The sampler fields a record does not depend on the defaults for, whatever they say, and those it states
    it was measured at with the new default's value."""
    stated = {name for name, value in record.items() if hasattr(new, name) and value == getattr(new, name)}
    return family_named(family).pinned(key, record) | set(named_overrides(key)) | stated


def _unnamed(key: str, new: SamplerConfig) -> str:
    """`key` without the overrides it names that are now the defaults: the record is then of the defaults."""
    for name, (suffix, value) in named_overrides(key).items():
        if getattr(new, name) == value:
            key = key.replace(suffix, "", 1)
    return key


def carry_records(
    metrics: dict[str, Any], family: str, changed: set[str], new: SamplerConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics with evaluate's records kept, re-keyed or dropped for the changed defaults; the dropped records."""
    kept: dict[str, Any] = {}
    dropped: dict[str, Any] = {}
    for key, value in metrics.items():
        if not key.startswith("evaluate") or not isinstance(value, dict):
            kept[key] = value
            continue
        if changed - _pinned(key, family, value, new):
            dropped[key] = value
            continue
        kept[family_named(family).rekeyed(key, value, new, changed)] = value
    # A record whose named noise or step size became the default takes the default's key, unless one is kept there.
    carried: dict[str, Any] = {}
    for key, value in kept.items():
        default_key = _unnamed(key, new) if key.startswith("evaluate") else key
        carried[key if default_key in kept or default_key in carried else default_key] = value
    return carried, dropped


def set_sampler(path: Path, words: list[str]) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any]]:
    """Write the new defaults into the checkpoint at `path` (atomically, its tensors untouched).
    Returns {field: (old, new)} for the fields that changed and the evaluate records dropped."""
    checkpoint = load_checkpoint(path)
    family = checkpoint.config.family
    if family not in SAMPLERS:
        raise ValueError(f"{path} is a {family} checkpoint, which has no sampler")
    old = sampler_for(family, checkpoint.config.sampler)
    new = dataclasses.replace(old, **parse_assignments(family, words))
    old_values, new_values = to_dict(old), to_dict(new)
    changes = {
        name: (old_values[name], new_values[name])
        for name in new_values
        if name != VERSION_KEY and new_values[name] != old_values[name]
    }
    family_named(family).check_new_sampler(new, checkpoint, str(path))
    checkpoint.config.metrics, dropped = carry_records(checkpoint.config.metrics, family, set(changes), new)
    checkpoint.config.sampler = new_values
    save_checkpoint(path, checkpoint)
    return changes, dropped
