"""Architectures by name: a checkpoint's `arch` {"name", "kwargs"} rebuilds its module here.

A config is data from a file, so every build is first rehearsed on the meta device (shapes, no memory)
while global registration hooks count the modules, parameter and buffer values it registers and a torch
function mode counts the torch calls it makes; past a limit the rehearsal stops and the architecture is
refused. Each number of a config is capped on its own (training/runtime/checkpoint.py); their product is bounded
here, for every architecture, before anything is allocated.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode

from training.models.classifier import DigitClassifier, StridedClassifier
from training.models.cnf import MLPVelocity, UNetVelocity
from training.models.ebm import ConvEnergy, MLPEnergy
from training.models.energy_unet import MLPFieldEnergy, UNetEnergy
from training.models.flows import NICE
from training.models.gan import ConvCritic, ConvGenerator, MLPCritic, MLPGenerator, ResizeGenerator
from training.models.glow import Glow
from training.models.iresnet import IResNet

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "conv_energy": ConvEnergy,
    "mlp_energy": MLPEnergy,
    "unet_energy": UNetEnergy,
    "mlp_field_energy": MLPFieldEnergy,
    "digit_classifier": DigitClassifier,
    "strided_classifier": StridedClassifier,
    "conv_generator": ConvGenerator,
    "resize_generator": ResizeGenerator,
    "conv_critic": ConvCritic,
    "mlp_generator": MLPGenerator,
    "mlp_critic": MLPCritic,
    "nice": NICE,
    "glow": Glow,
    "iresnet": IResNet,
    "unet_velocity": UNetVelocity,
    "mlp_velocity": MLPVelocity,
}


# Far past every model of this project, far short of what would stall a machine.
MAX_MODULES = 10_000  # modules registered while building; glow_mnist, the most, has 172
MAX_VALUES = 2**28  # parameter and buffer values (1 GiB of float32); nice_mnist, the most, has 2.0 M
MAX_BUILD_CALLS = 50_000  # torch calls while building; iresnet_mnist's power iterations make 20,480


class ArchitectureTooLarge(ValueError):
    """An architecture whose build passes one of the limits above."""


class _BuildBudget(TorchFunctionMode):
    """Counts what building one architecture registers and computes, and stops the build past a limit.

    torch's registration hooks are global, so they count only in the thread that builds; the function mode
    is per thread already.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.thread = threading.get_ident()
        self.modules = self.values = self.calls = 0

    def _refuse(self, what: str) -> ArchitectureTooLarge:
        return ArchitectureTooLarge(
            f"arch {self.name!r} would build more than {what}; no model of this project comes near "
            "(the config is corrupt, or not one this project wrote)"
        )

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        self.calls += 1
        if self.calls == MAX_BUILD_CALLS + 1:  # once: the calls that unwind the build (a no_grad's exit) must run
            raise self._refuse(f"{MAX_BUILD_CALLS:,} torch calls")
        return func(*args, **(kwargs or {}))

    def count_module(self, owner: nn.Module, name: str, submodule: nn.Module | None) -> None:
        if threading.get_ident() == self.thread:
            self.modules += 1
            if self.modules > MAX_MODULES:
                raise self._refuse(f"{MAX_MODULES:,} modules")

    def count_values(self, owner: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
        if tensor is not None and threading.get_ident() == self.thread:
            self.values += tensor.numel()
            if self.values > MAX_VALUES:
                raise self._refuse(f"{MAX_VALUES:,} parameter and buffer values")


def _construct(arch: dict[str, Any]) -> nn.Module:
    name = arch.get("name")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name](**arch.get("kwargs", {}))


_WITHIN_LIMITS: set[str] = set()  # archs (as JSON) whose rehearsal passed: built for real without another


def _key(arch: dict[str, Any]) -> str:
    return json.dumps(arch, sort_keys=True, default=repr)


def skeleton(arch: dict[str, Any]) -> nn.Module:
    """The architecture built on the meta device (shapes without memory) under the limits above;
    ArchitectureTooLarge as soon as its build passes one, before anything is allocated."""
    budget = _BuildBudget(str(arch.get("name")))
    registrations: list[Callable[[Callable[..., None]], Any]] = [
        module_hooks.register_module_parameter_registration_hook,
        module_hooks.register_module_buffer_registration_hook,
    ]
    handles = [module_hooks.register_module_module_registration_hook(budget.count_module)]
    handles += [register(budget.count_values) for register in registrations]
    try:
        with torch.device("meta"), budget:
            module = _construct(arch)
    finally:
        for handle in handles:
            handle.remove()
    _WITHIN_LIMITS.add(_key(arch))
    return module


def build_model(arch: dict[str, Any]) -> nn.Module:
    """The architecture's module, once its rehearsal on the meta device (skeleton) stayed within the limits."""
    if _key(arch) not in _WITHIN_LIMITS:
        skeleton(arch)
    return _construct(arch)
