"""Time-conditioned vector fields v(x, t) (or v(x, t, y)) for continuous normalizing flows.

A CNF moves prior samples x(0) ~ N(0, T^2 I) to data x(1) along dx/dt = v(x, t) (Chen et al. 2018);
trained by flow matching (Lipman et al. 2023) it is a regression, not a simulation (training/train/losses.py).
The image field is the EqM energies' U-Net (training/models/energy_unet.py) read as a field, its blocks
shifted by a time embedding plus the label embedding; a small MLP field serves 2-D toy data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from training.models.energy_unet import UNetEnergy, with_null_label

VelocityField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, *shape], t [B]) -> v [B, *shape]


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sines and cosines of t [B] in [0, 1] at dim / 2 geometric frequencies (Vaswani et al. 2017; DDPM's
    time embedding with t scaled to 1000 steps) -> [B, dim]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * frequencies[None, :]  # [B, half]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TimeEmbedding(nn.Module):
    """t [B] -> [B, dim]: the sinusoidal features through a small MLP (what every block's shift reads)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim))


def _times(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Per-sample times [B] from a scalar or a [B] tensor."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    return t.expand(batch) if t.dim() == 0 else t


class UNetVelocity(nn.Module):
    """v(x, t) (or v(x, t, y)) of the image's shape from the EqM energies' two-level U-Net, read as a field.

    The time embedding is added to the label embedding every residual block already takes; a conditional
    field keeps the null label (index `num_classes`) for classifier-free guidance (Ho & Salimans 2022).
    """

    def __init__(self, channels: int = 1, width: int = 32, num_classes: int = 0, embedding_dim: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.unet = UNetEnergy(channels, width, "dot", num_classes, embedding_dim, embed_without_classes=True)
        self.time_embedding = TimeEmbedding(embedding_dim)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, labels: torch.Tensor | None = None
    ) -> torch.Tensor:  # [B, C, H, W]
        embedding = self.time_embedding(_times(t, x.shape[0], x.device))  # [B, D]
        label_embedding = self.unet.embed(labels, x.shape[0], x.device)
        if label_embedding is not None:
            embedding = embedding + label_embedding
        return self.unet.trunk(x, embedding)


class MLPVelocity(nn.Module):
    """v(x, t) (or v(x, t, y)) for 2-D toy densities: an MLP whose first layer adds time and label embeddings."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, num_classes: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label_embedding = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.time_embedding = TimeEmbedding(hidden)
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp(x) + self.time_embedding(_times(t, x.shape[0], x.device))  # [B, hidden]
        if self.label_embedding is not None:
            h = h + self.label_embedding(with_null_label(labels, x.shape[0], self.num_classes, x.device))
        for layer in self.layers:
            h = layer(F.silu(h))
        return self.out(F.silu(h))  # [B, D]


def guided_velocity(
    model: nn.Module, labels: torch.Tensor | None, guidance: float | torch.Tensor = 1.0
) -> VelocityField:
    """The field an ODE solver integrates: v(x, t, y), or with guidance w != 1 on labelled chains
    v(x, t) + w (v(x, t, y) - v(x, t)) (classifier-free guidance, Ho & Salimans 2022). w is one for all or each
    chain's own [B] (the server's batches); label -1 (or None) is the null label, and those chains, like those
    at w = 1, are unguided. Only the guided chains add an unconditional row to the one batched evaluation,
    chosen once here (not at every step)."""
    if labels is None or getattr(model, "num_classes", 0) == 0:
        return lambda x, t: model(x, t, labels)
    weights = guidance if isinstance(guidance, torch.Tensor) else torch.full(labels.shape, float(guidance))
    guided = ((labels >= 0) & (weights.to(labels.device) != 1.0)).nonzero().squeeze(1)  # [G] rows
    device = next(model.parameters()).device
    labels = labels.to(device)
    if guided.numel() == 0:
        return lambda x, t: model(x, t, labels)
    weight = weights.to(guided.device)[guided].to(device)  # [G]
    guided = guided.to(device)
    null = torch.full_like(guided, -1)

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = model(torch.cat([x, x[guided]]), torch.cat([t, t[guided]]), torch.cat([labels, null]))
        conditional, unconditional = both[: len(x)], both[len(x) :]  # [B, *shape], [G, *shape]
        mixed = unconditional + weight.reshape(-1, *([1] * (x.dim() - 1))) * (conditional[guided] - unconditional)
        return conditional.index_copy(0, guided, mixed.to(conditional.dtype))

    return field
