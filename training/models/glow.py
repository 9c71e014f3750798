"""A RealNVP/Glow-style multiscale flow: squeeze, then steps of actnorm -> invertible 1x1 convolution ->
affine coupling, with half the channels factored out after every level but the last.

Kingma & Dhariwal 2018 (Glow), Dinh et al. 2017 (RealNVP). Vectors (toy 2-D data) are treated as
[D, 1, 1] images, where the convolutions become linear maps and no squeeze happens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.models.flows import ActNorm, Flow, FlowLayer, Squeeze, can_squeeze


class InvertibleConv1x1(FlowLayer):
    """Glow's learned channel permutation, LU-parametrized so log|det W| = sum(log|s|) costs nothing."""

    permutation: torch.Tensor  # [C, C] buffer: the fixed P of W = P L U
    sign: torch.Tensor  # [C] buffer: signs of U's diagonal
    lower_mask: torch.Tensor  # [C, C] buffer: strictly lower triangle

    def __init__(self, channels: int) -> None:
        super().__init__()
        rotation = torch.linalg.qr(torch.randn(channels, channels))[0]
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = upper.diagonal()
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign", diagonal.sign())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_diagonal = nn.Parameter(diagonal.abs().log())

    def weight(self) -> torch.Tensor:  # [C, C]
        eye = torch.eye(len(self.sign), device=self.sign.device, dtype=self.lower.dtype)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * self.log_diagonal.exp())
        return self.permutation @ lower @ upper

    def _log_det(self, x: torch.Tensor) -> torch.Tensor:
        return (self.log_diagonal.sum() * math.prod(x.shape[2:])).expand(x.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.einsum("ij,bj...->bi...", self.weight(), x), self._log_det(x)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.einsum("ij,bj...->bi...", torch.linalg.inv(self.weight()), y), -self._log_det(y)


class AffineCoupling(FlowLayer):
    """y_b = (x_b + t(x_a)) * exp(s(x_a)) on a channel split, the scale soft-clamped to exp(+-scale_bound)
    so one coupling can never blow a pixel up (the usual cause of NaNs early in Glow training)."""

    def __init__(self, channels: int, hidden: int, kernel: int = 3, scale_bound: float = 2.0) -> None:
        super().__init__()
        self.kept = channels // 2
        moved = channels - self.kept
        padding = kernel // 2
        first = nn.Conv2d(self.kept, hidden, kernel, padding=padding)
        middle = nn.Conv2d(hidden, hidden, 1)
        last = nn.Conv2d(hidden, 2 * moved, kernel, padding=padding)
        assert last.bias is not None  # built with bias=True (the default)
        nn.init.zeros_(last.weight)  # starts as the identity
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(first, nn.ReLU(), middle, nn.ReLU(), last)
        self.scale_bound = scale_bound

    def _shift_and_log_scale(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw = self.net(kept).chunk(2, dim=1)
        return shift, self.scale_bound * torch.tanh(raw / self.scale_bound)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept, moved = x[:, : self.kept], x[:, self.kept :]
        shift, log_scale = self._shift_and_log_scale(kept)
        return torch.cat([kept, (moved + shift) * log_scale.exp()], 1), log_scale.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept, moved = y[:, : self.kept], y[:, self.kept :]
        shift, log_scale = self._shift_and_log_scale(kept)
        return torch.cat([kept, moved * (-log_scale).exp() - shift], 1), -log_scale.flatten(1).sum(1)


class OnChannels(FlowLayer):
    """Apply a layer to the first `active` channels only: what a multiscale split leaves to later levels.

    The factored-out channels stay in the tensor untouched and go to the base distribution at the end,
    so every layer keeps the full dimension and the trajectory can show all of it.
    """

    def __init__(self, layer: FlowLayer, active: int) -> None:
        super().__init__()
        self.layer = layer
        self.active = active

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, log_det = self.layer(x[:, : self.active])
        return torch.cat([y, x[:, self.active :]], 1), log_det

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_det = self.layer.inverse(y[:, : self.active])
        return torch.cat([x, y[:, self.active :]], 1), log_det


def as_image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """[C, H, W] stays; a vector [D] becomes [D, 1, 1] so convolutional flows serve toy data too."""
    if len(shape) == 3:
        return (int(shape[0]), int(shape[1]), int(shape[2]))
    if len(shape) == 1:
        return (int(shape[0]), 1, 1)
    raise ValueError(f"flows take [C, H, W] images or [D] vectors, not shape {list(shape)}")


class Glow(Flow):
    """`levels` levels of (squeeze, `steps` x [actnorm, 1x1 conv, affine coupling]), splitting off half the
    channels between levels. MNIST with 2 levels: 4x14x14 (all active), then 16x7x7 (8 active). Where no
    further squeeze fits (vectors, odd sizes) a level adds steps without a split."""

    def __init__(
        self,
        shape: tuple[int, ...] | list[int] = (1, 28, 28),
        levels: int = 2,
        steps: int = 8,
        hidden: int = 128,
        scale_bound: float = 2.0,
        base: str = "gaussian",
    ) -> None:
        layer_shape = as_image_shape(tuple(shape))
        channels, height, width = layer_shape
        active = channels
        layers: list[FlowLayer] = []
        for level in range(levels):
            if can_squeeze((channels, height, width)):
                layers.append(Squeeze())
                channels, height, width, active = 4 * channels, height // 2, width // 2, 4 * active
            if active < 2:
                raise ValueError(
                    f"glow: shape {list(shape)} has too few channels for {levels} levels (a coupling needs 2 or "
                    "more, and only even sides squeeze into more): train on an even side (--image-size) or colour"
                )
            kernel = 3 if height > 1 else 1
            for _ in range(steps):
                for layer in (
                    ActNorm(active),
                    InvertibleConv1x1(active),
                    AffineCoupling(active, hidden, kernel, scale_bound),
                ):
                    layers.append(layer if active == channels else OnChannels(layer, active))
            if level < levels - 1 and can_squeeze((channels, height, width)):
                active //= 2  # the multiscale split: the other half goes straight to the base
        super().__init__(layers, tuple(shape), base, layer_shape)
