"""How `evaluate --record` names a record measured with a chain setting other than the checkpoint's default,
and how `set-sampler` and `zoo` read that back: the key says it, so the default figures are never overwritten."""

from __future__ import annotations

import argparse
import re

from training.sampling.sampler_config import SamplerConfig

# Chain settings that, away from the checkpoint's default, file a record under a key of its own: a noisier
# (long-run) check or another step size never overwrites the default figures.
NAMED_OVERRIDES = ("step_size", "noise")


def overrides_suffix(args: argparse.Namespace, defaults: SamplerConfig) -> str:
    """`_step_size_X`, `_noise_Y` for each --step-size / --noise given with a value other than the default's."""
    suffix = ""
    for name in NAMED_OVERRIDES:
        value = getattr(args, name)
        if value is not None and value != getattr(defaults, name, None):
            suffix += f"_{name}_{value}"
    return suffix


NUMBER = r"-?[0-9.]+(?:e[-+]?[0-9]+)?"  # as Python prints a float


def named_overrides(key: str) -> dict[str, tuple[str, float]]:
    """The overrides `evaluate --record` named in `key` (`_noise_0.01`): {field: (its suffix, its value)}. An init
    called noise (`evaluate_noise_label_all`) is no override: a value is a number."""
    named = {}
    for name in NAMED_OVERRIDES:
        match = re.search(rf"_{name}_({NUMBER})(?=_|$)", key)
        if match:
            named[name] = (match.group(0), float(match.group(1)))
    return named


def override_words(key: str) -> list[str]:
    """The evaluate flags that measure again the record under `key`: `--noise 0.01` for `_noise_0.01`."""
    named = named_overrides(key).items()
    return [word for name, (_, value) in named for word in (f"--{name.replace('_', '-')}", str(value))]
