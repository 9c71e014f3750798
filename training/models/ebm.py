"""Energy networks: images or 2-D points -> one scalar energy per input (low energy = likely)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class Swish(nn.Module):
    """x * sigmoid(x): smooth, so Langevin gradients w.r.t. the input are smooth too (UvA tutorial)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class ConvEnergy(nn.Module):
    """Strided convolutions with Swish and a linear scalar head, after the UvA MNIST EBM and IGEBM.

    `width` scales every layer; `spectral` wraps each layer in spectral normalization as IGEBM does.
    """

    def __init__(self, channels: int = 1, image_size: int = 28, width: int = 32, spectral: bool = False) -> None:
        super().__init__()
        c1, c2, c3 = width // 2, width, width * 2
        wrap = spectral_norm if spectral else (lambda layer: layer)
        self.features = nn.Sequential(
            wrap(nn.Conv2d(channels, c1, 5, stride=2, padding=4)),
            Swish(),  # 28 -> 16
            wrap(nn.Conv2d(c1, c2, 3, stride=2, padding=1)),
            Swish(),  # 16 -> 8
            wrap(nn.Conv2d(c2, c3, 3, stride=2, padding=1)),
            Swish(),  # 8 -> 4
            wrap(nn.Conv2d(c3, c3, 3, stride=2, padding=1)),
            Swish(),  # 4 -> 2
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, channels, image_size, image_size)).shape[1]
        self.head = nn.Sequential(wrap(nn.Linear(flat, c3)), Swish(), wrap(nn.Linear(c3, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B]
        return self.head(self.features(x)).squeeze(1)


class MLPEnergy(nn.Module):
    """A Swish MLP energy for 2-D toy densities."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, spectral: bool = False) -> None:
        super().__init__()
        wrap = spectral_norm if spectral else (lambda layer: layer)
        layers: list[nn.Module] = []
        size = dim
        for _ in range(depth):
            layers += [wrap(nn.Linear(size, hidden)), Swish()]
            size = hidden
        layers.append(wrap(nn.Linear(size, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B]
        return self.net(x).squeeze(1)
