"""Architectures by name: a checkpoint's `arch` {"name", "kwargs"} rebuilds its module here."""

from __future__ import annotations

from typing import Any

from torch import nn

from training.models.classifier import DigitClassifier
from training.models.cnf import MLPVelocity, UNetVelocity
from training.models.ebm import ConvEnergy, MLPEnergy
from training.models.energy_unet import MLPFieldEnergy, UNetEnergy
from training.models.flows import NICE
from training.models.gan import ConvCritic, ConvGenerator, MLPCritic, MLPGenerator
from training.models.glow import Glow
from training.models.iresnet import IResNet

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "conv_energy": ConvEnergy,
    "mlp_energy": MLPEnergy,
    "unet_energy": UNetEnergy,
    "mlp_field_energy": MLPFieldEnergy,
    "digit_classifier": DigitClassifier,
    "conv_generator": ConvGenerator,
    "conv_critic": ConvCritic,
    "mlp_generator": MLPGenerator,
    "mlp_critic": MLPCritic,
    "nice": NICE,
    "glow": Glow,
    "iresnet": IResNet,
    "unet_velocity": UNetVelocity,
    "mlp_velocity": MLPVelocity,
}


def build_model(arch: dict[str, Any]) -> nn.Module:
    name = arch.get("name")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name](**arch.get("kwargs", {}))
