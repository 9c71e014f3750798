"""A scalar energy E(x) (or E(x, y)) read off a small U-Net, for energies trained by Equilibrium Matching.

The U-Net maps an image to a field f(x) of the image's shape; the energy is a scalar built from it, so
gradient steps on E are what a served chain runs. Two scalar forms from the Equilibrium Matching paper
(Wang & Du 2025, appendix on explicit energies):
- "dot": E(x) = <x, f(x)>,
- "l2":  E(x) = -||f(x)||^2 / 2.
No time or noise-level input: the landscape is the same at every step of a chain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ENERGY_FORMS = ("dot", "l2")


def with_null_label(labels: torch.Tensor | None, batch: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """Labels [B] with None (all) or -1 entries replaced by the null label `num_classes`."""
    if labels is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    labels = labels.to(device=device, dtype=torch.long)
    return torch.where(labels < 0, torch.full_like(labels, num_classes), labels)


def checked_energy_form(form: str) -> str:
    if form not in ENERGY_FORMS:
        raise ValueError(f"energy_form must be one of {', '.join(ENERGY_FORMS)}, got {form!r}")
    return form


def scalar_energy(x: torch.Tensor, field: torch.Tensor, form: str) -> torch.Tensor:
    """E [B] from the field f [B, *shape]: <x, f(x)> ("dot") or -||f(x)||^2 / 2 ("l2"), in float32."""
    x, field = x.float().flatten(1), field.float().flatten(1)
    if form == "dot":
        return (x * field).sum(1)
    return -0.5 * field.pow(2).sum(1)


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 where the channels allow it, fewer for tiny test widths."""
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a skip; the label embedding enters as a per-channel shift (DDPM-style)."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.shift = nn.Linear(embedding_dim, out_channels) if embedding_dim else None
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.shift is not None and embedding is not None:
            h = h + self.shift(embedding)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNetEnergy(nn.Module):
    """Scalar energy from a two-level U-Net (28 -> 14 -> 7 on MNIST, 32 -> 16 -> 8 on 32x32 colour images; any
    side works: upsampling returns to each skip's own size), channels width x (1, 2, 4).

    `num_classes` > 0 makes a class-conditional energy E(x, y) with a learned embedding per class and one
    extra "null" label (index `num_classes`), used when no label is given (classifier-free training).
    """

    def __init__(
        self,
        channels: int = 1,
        width: int = 16,
        energy_form: str = "dot",
        num_classes: int = 0,
        embedding_dim: int = 64,
        embed_without_classes: bool = False,  # blocks take an embedding even when unconditional (a CNF's time)
    ) -> None:
        super().__init__()
        self.energy_form = checked_energy_form(energy_form)
        self.num_classes = num_classes
        embed = embedding_dim if num_classes > 0 or embed_without_classes else 0
        self.label_embedding = nn.Embedding(num_classes + 1, embed) if num_classes > 0 else None
        c1, c2, c3 = width, 2 * width, 4 * width
        self.stem = nn.Conv2d(channels, c1, 3, padding=1)
        self.down1 = ResidualBlock(c1, c1, embed)  # 28
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)  # 28 -> 14
        self.down2 = ResidualBlock(c1, c2, embed)  # 14
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)  # 14 -> 7
        self.middle = ResidualBlock(c2, c3, embed)  # 7
        self.up2 = ResidualBlock(c3 + c2, c2, embed)  # 14, after upsampling and the skip
        self.up1 = ResidualBlock(c2 + c1, c1, embed)  # 28
        self.head_norm = nn.GroupNorm(_groups(c1), c1)
        self.head = nn.Conv2d(c1, channels, 3, padding=1)

    def embed(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """Label embeddings [B, D]; None labels (or -1 entries) take the null label."""
        if self.label_embedding is None:
            return None
        return self.label_embedding(with_null_label(labels, batch, self.num_classes, device))

    def field(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # [B, C, H, W]
        return self.trunk(x, self.embed(labels, x.shape[0], x.device))

    def trunk(self, x: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:  # [B, C, H, W]
        """The U-Net itself, with the per-block embedding [B, D] (or None) its blocks add as a shift."""
        h1 = self.down1(self.stem(x), embedding)  # [B, c1, 28, 28]
        h2 = self.down2(self.pool1(h1), embedding)  # [B, c2, 14, 14]
        h3 = self.middle(self.pool2(h2), embedding)  # [B, c3, 7, 7]
        up = F.interpolate(h3, size=h2.shape[-2:], mode="nearest")
        u2 = self.up2(torch.cat([up, h2], dim=1), embedding)  # [B, c2, 14, 14]
        up = F.interpolate(u2, size=h1.shape[-2:], mode="nearest")
        u1 = self.up1(torch.cat([up, h1], dim=1), embedding)  # [B, c1, 28, 28]
        return self.head(F.silu(self.head_norm(u1)))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # -> [B]
        return scalar_energy(x, self.field(x, labels), self.energy_form)


class MLPFieldEnergy(nn.Module):
    """The same scalar forms over an MLP field, for 2-D toy densities (tests and quick checks)."""

    def __init__(
        self, dim: int = 2, hidden: int = 128, depth: int = 3, energy_form: str = "dot", num_classes: int = 0
    ) -> None:
        super().__init__()
        self.energy_form = checked_energy_form(energy_form)
        self.num_classes = num_classes
        self.label_embedding = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)

    def field(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # [B, D]
        h = self.inp(x)
        if self.label_embedding is not None:
            h = h + self.label_embedding(with_null_label(labels, x.shape[0], self.num_classes, x.device))
        for layer in self.layers:
            h = layer(F.silu(h))
        return self.out(F.silu(h))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # -> [B]
        return scalar_energy(x, self.field(x, labels), self.energy_form)
