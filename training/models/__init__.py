"""Architectures by name: a checkpoint's `arch` {"name", "kwargs"} rebuilds its module here."""

from __future__ import annotations

from typing import Any

from torch import nn

from training.models.classifier import DigitClassifier
from training.models.ebm import ConvEnergy, MLPEnergy

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "conv_energy": ConvEnergy,
    "mlp_energy": MLPEnergy,
    "digit_classifier": DigitClassifier,
}


def build_model(arch: dict[str, Any]) -> nn.Module:
    name = arch.get("name")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name](**arch.get("kwargs", {}))
