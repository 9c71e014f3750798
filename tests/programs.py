"""Models written as a user outside this project would: a torch.export program of their own module and its
JSON sidecar, for the exported-model tests."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import nn

SHAPE = (1, 8, 8)
DATA = {"shape": list(SHAPE), "range": [-1.0, 1.0]}


class WellEnergy(nn.Module):
    """A user's own energy, known to no module of this project: a small MLP over a quadratic well."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.SiLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, 8, 8] -> [B]
        return self.net(x).squeeze(1) + 0.5 * x.flatten(1).pow(2).sum(1)


class TinyGenerator(nn.Module):
    """A user's generator: z [B, 4] -> x [B, 1, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Unflatten(1, SHAPE))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, 4] -> [B, 1, 8, 8]
        return self.net(z)


class TinyCritic(nn.Module):
    """A user's discriminator: x [B, 1, 8, 8] -> its logit [B] (or, `probability`, the sigmoid of it)."""

    def __init__(self, probability: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)  # a logit critic and a probability critic of the same weights
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.probability = probability

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, 8, 8] -> [B]
        logit = 3.0 * self.net(x).squeeze(1)
        return torch.sigmoid(logit) if self.probability else logit


GAN_SIDECAR = {"family": "gan", "data": DATA, "sampler": {"latent_dim": 4, "steps": 5, "step_size": 0.05, "noise": 0.1}}


def save_program(module: nn.Module, example: tuple, path: Path, sidecar: dict | str | None, dynamic=True) -> Path:
    """What a user does: torch.export with a dynamic batch dimension, torch.export.save, a JSON sidecar."""
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    first = next(iter(inspect.signature(module.forward).parameters))  # x, or a generator's z
    shapes = {first: {0: batch}} if dynamic else None
    torch.export.save(torch.export.export(module.eval(), example, dynamic_shapes=shapes), path)
    if sidecar is not None:
        path.with_suffix(".json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    return path


def well_sidecar(**sampler) -> dict:
    return {"family": "ebm", "data": DATA, "sampler": {"steps": 6, "step_size": 0.05, "noise": 0.01, **sampler}}
