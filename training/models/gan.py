"""Generators and critics for images (DCGAN-style; sides that are multiples of 4) and for 2-D toy densities."""

from __future__ import annotations

import torch
from torch import nn


class ConvGenerator(nn.Module):
    """Latent [B, latent_dim] -> image [B, C, S, S] in [-1, 1]: a linear map to S/4 x S/4 (7x7 for MNIST), then
    two upsampling convs that double the side each; so S must be a multiple of 4."""

    def __init__(self, latent_dim: int = 128, width: int = 64, channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        if image_size % 4 or image_size < 4:
            raise ValueError(
                f"the DCGAN generator makes images whose side is a multiple of 4 (28, 32, 64, ...), not {image_size}: "
                f"train on such a size (--image-size {max(4, round(image_size / 4) * 4)})"
            )
        self.latent_dim = latent_dim
        self.base = image_size // 4
        self.project = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * self.base**2), nn.BatchNorm1d(2 * width * self.base**2), nn.ReLU()
        )
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),  # S/4 -> S/2 (7 -> 14 on MNIST)
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1),
            nn.Tanh(),  # S/2 -> S
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, latent] -> [B, C, H, W]
        hidden = self.project(z)
        return self.upsample(hidden.view(z.shape[0], -1, self.base, self.base))


class ResizeGenerator(nn.Module):
    """Latent -> image like ConvGenerator, but each doubling is a nearest-neighbour resize then a 3x3 conv (no
    transposed-conv checkerboards; Odena et al. 2016), and a last 3x3 conv at full size makes the pixels."""

    def __init__(self, latent_dim: int = 128, width: int = 32, channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        if image_size % 4 or image_size < 4:
            raise ValueError(f"the generator makes images whose side is a multiple of 4, not {image_size}")
        self.latent_dim = latent_dim
        self.base = image_size // 4
        self.project = nn.Sequential(
            nn.Linear(latent_dim, 4 * width * self.base**2), nn.BatchNorm1d(4 * width * self.base**2), nn.ReLU()
        )

        def doubling(inputs: int, outputs: int) -> list[nn.Module]:
            return [nn.Upsample(scale_factor=2), nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs)]

        self.upsample = nn.Sequential(
            *doubling(4 * width, 2 * width),
            nn.ReLU(),  # S/4 -> S/2
            *doubling(2 * width, width),
            nn.ReLU(),  # S/2 -> S
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, latent] -> [B, C, H, W]
        hidden = self.project(z)
        return self.upsample(hidden.view(z.shape[0], -1, self.base, self.base))


CRITIC_NORMS = ("none", "batch", "layer")


def _norm(kind: str, channels: int) -> nn.Module:
    """batch: statistics over the batch (couples its images); layer: over each image's channels and positions
    alone (GroupNorm with one group, a scale and shift per channel); none: nothing."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class ConvCritic(nn.Module):
    """Image -> one score (a logit for DCGAN, a Wasserstein critic value for WGAN).

    No normalization by default: WGAN-GP's penalty is per sample, and batch norm couples the samples.
    `norm` normalizes the second convolution (and the third too with `deep_norm`); `batch_norm=True` is how
    files from before `norm` say "batch". `features` exposes the penultimate layer for feature matching
    (Salimans et al. 2016).
    """

    def __init__(
        self,
        width: int = 64,
        channels: int = 1,
        image_size: int = 28,
        batch_norm: bool = False,
        depth: int = 2,
        norm: str | None = None,
        deep_norm: bool = False,
    ) -> None:
        super().__init__()
        if depth not in (2, 3):
            raise ValueError(f"a conv critic has 2 or 3 convolutions, not {depth}")
        kind = norm if norm is not None else "batch" if batch_norm else "none"
        if kind not in CRITIC_NORMS:
            raise ValueError(f"a conv critic's norm is one of {', '.join(CRITIC_NORMS)}, not {kind!r}")
        if deep_norm and (kind == "none" or depth != 3):
            raise ValueError("deep_norm normalizes the third convolution too: it needs a norm and depth 3")
        # depth 3 adds a 3x3 conv at S/4 (after the two strided ones, so earlier checkpoints keep their keys);
        # deep_norm normalizes it too, so its units stay centred on their ReLU's bend whatever clipping does.
        third: list[nn.Module] = []
        if depth == 3:
            deep = [_norm(kind, 4 * width)] if deep_norm else []
            third = [nn.Conv2d(2 * width, 4 * width, 3, padding=1), *deep, nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),  # S -> S/2 (28 -> 14 on MNIST)
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            _norm(kind, 2 * width),
            nn.LeakyReLU(0.2),  # S/2 -> S/4
            *third,
            nn.Flatten(),
        )
        self.head = nn.Linear((2 if depth == 2 else 4) * width * (image_size // 4) ** 2, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, F]
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B]
        return self.head(self.body(x)).squeeze(1)


class MLPGenerator(nn.Module):
    def __init__(self, latent_dim: int = 8, dim: int = 2, hidden: int = 128) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class MLPCritic(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2)
        )
        self.head = nn.Linear(hidden, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).squeeze(1)
