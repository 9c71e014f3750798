"""A model ready to sample: its module in eval mode with frozen weights, its config and typed sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from training.runtime.checkpoint import ModelConfig
from training.sampling.sampler_config import Config, SamplerConfig


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    module: nn.Module
    sampler: SamplerConfig  # the checkpoint's typed sampling defaults
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    critic: nn.Module | None = None  # a GAN's saved critic (for DDLS), frozen, in eval mode; None: none saved

    def sampler_as(self, kind: type[Config]) -> Config:
        """The sampler config, typed for the family the caller handles."""
        if not isinstance(self.sampler, kind):
            raise ValueError(f"{self.name} is a {self.config.family} model; it has no {kind.__name__}")
        return self.sampler

    @property
    def exported(self) -> bool:
        """Whether it is a torch.export program served with its sidecar (training/runtime/exported.py), not a
        checkpoint: it has no EMA or raw weights to choose, and its critic, if any, is a program beside it."""
        return "exported" in self.config.training

    @property
    def data_range(self) -> tuple[float, float]:
        low, high = self.config.data.get("range", [-1.0, 1.0])
        return float(low), float(high)

    @property
    def levels(self) -> int:
        """The quantization levels its data state (its bits/dim count bins of (high - low) / levels); 256 unstated."""
        return int(self.config.data.get("levels") or 256)

    @property
    def dequantized(self) -> bool:
        """Whether its density is over uniformly dequantized data (real data are scored at level + u, u ~ U[0, 1)),
        as unless its data say dequantization "none"."""
        return self.config.data.get("dequantization") != "none"

    @property
    def variational(self) -> bool:
        """Whether its density is over variationally dequantized data (Ho et al. 2019): real data are scored by the
        bound E_q[log p(x + u) - log q(u | x)] with u from its dequantizer (training/sampling/dequantization.py)."""
        return self.config.data.get("dequantization") == "variational"

    @property
    def dequantization_samples(self) -> int:
        """K, the draws of u ~ q(u | x) each score averages the variational bound over (the sidecar's; 1 unstated)."""
        return int(self.config.data.get("dequantization_samples") or 1)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.config.data["shape"])

    @property
    def has_replay_buffer(self) -> bool:
        """Whether it was trained with a replay buffer (contrastive divergence; EqM energies are not)."""
        return "replay_buffer" in self.extras

    @property
    def classes(self) -> list[str] | None:
        """Class names a conditional model draws by index (`label`); None for an unconditional model."""
        classes = self.config.data.get("classes")
        return list(classes) if classes and getattr(self.module, "num_classes", 0) > 0 else None

    def check_labels(self, labels: torch.Tensor | None) -> None:
        """ValueError naming the valid range when labels [B] do not index this model's classes."""
        if labels is None:
            return
        if self.classes is None:
            raise ValueError(f"{self.name} is not class-conditional; it takes no label")
        bad = labels[(labels < 0) | (labels >= len(self.classes))]
        if len(bad):
            raise ValueError(
                f"label {int(bad[0])} is out of range for {self.name}: 0..{len(self.classes) - 1} "
                f"({', '.join(self.classes)})"
            )
