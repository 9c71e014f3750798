"""Models written as a user outside this project would: a torch.export program of their own module and its
JSON sidecar, for the exported-model tests."""

from __future__ import annotations

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


def save_program(module: nn.Module, example: tuple, path: Path, sidecar: dict | str | None, dynamic=True) -> Path:
    """What a user does: torch.export with a dynamic batch dimension, torch.export.save, a JSON sidecar."""
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    shapes = {"x" if isinstance(module, WellEnergy) else "z": {0: batch}} if dynamic else None
    torch.export.save(torch.export.export(module.eval(), example, dynamic_shapes=shapes), path)
    if sidecar is not None:
        path.with_suffix(".json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    return path


def well_sidecar(**sampler) -> dict:
    return {"family": "ebm", "data": DATA, "sampler": {"steps": 6, "step_size": 0.05, "noise": 0.01, **sampler}}
