"""Normalizing flows: invertible layers that return (output, log_det) both ways, and models built from them.

Every layer maps `forward(x) -> (y, log_det)` (data towards the base) and `inverse(y) -> (x, log_det)`,
with `log_det` of shape [batch] on the input's device; the two log-dets of a round trip cancel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from training.sampling.noise import latent_gaussian, latent_logistic

# --- Flows: exact likelihood on dequantized 8-bit data ------------------------------------------------

BIN_WIDTH = 2.0 / 256  # one 8-bit level in the [-1, 1] data space


def dequantize(x: torch.Tensor) -> torch.Tensor:
    """Uniform dequantization: pixels p / 127.5 - 1 (how datasets load) -> (p + u) / 128 - 1, u ~ U[0, 1)."""
    levels = ((x + 1) * 127.5).round().clamp(0, 255)
    return (levels + torch.rand_like(levels)) * BIN_WIDTH - 1


def bits_per_dim(
    log_prob: torch.Tensor, dim: int, data_range: tuple[float, float] = (-1.0, 1.0), levels: int = 256
) -> torch.Tensor:
    """-log2 P(discrete image) / D from log p (nats) of the continuous density of its dequantized version over the
    data space: level k of a pixel is the bin [low + k w, low + (k + 1) w) of width w = (high - low) / levels, so
    P(k) = p(x) w^D for a density constant over the bin and bits/dim = -(log p(x) + D log w) / (D log 2)
    (docs/exporting.md, "Units"). The defaults are 8-bit images in [-1, 1]: w = 2 / 256."""
    width = (data_range[1] - data_range[0]) / levels
    return -(log_prob + dim * math.log(width)) / (dim * math.log(2))


def quantize(x: torch.Tensor, data_range: tuple[float, float], levels: int) -> torch.Tensor:
    """Samples of a uniformly dequantized model back on its levels: the level k whose bin [low + k w,
    low + (k + 1) w) holds each value (w = (high - low) / levels, the ends clamped), as the value of level k,
    low + k (high - low) / (levels - 1), where datasets load it (8-bit pixels p / 127.5 - 1 in [-1, 1])."""
    low, high = data_range
    level = torch.floor((x - low) / (high - low) * levels).clamp(0, levels - 1)
    return low + level * ((high - low) / (levels - 1))


class FlowLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse_with_states(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The inverse plus the states worth showing on the way (iterative inverses show each iterate)."""
        x, log_det = self.inverse(y)
        return x, log_det, [x]

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one output for one input of `shape` (only reshaping layers change it)."""
        return shape


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], channel-major: channels c < k land in the first 4k."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


def can_squeeze(shape: tuple[int, ...]) -> bool:
    """A [C, H, W] state with even, non-trivial sides (a vector seen as [D, 1, 1] is never squeezed)."""
    _, height, width = shape
    return height > 1 and height % 2 == 0 and width % 2 == 0


class Squeeze(FlowLayer):
    """Trade space for channels (RealNVP): each 2x2 patch becomes 4 channels; volume-preserving."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return squeeze2d(x), torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return unsqueeze2d(y), torch.zeros(y.shape[0], device=y.device, dtype=y.dtype)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        c, h, w = shape
        return (4 * c, h // 2, w // 2)


class LogitTransform(FlowLayer):
    """RealNVP's preprocessing as a layer: x in [-1, 1] -> logit(alpha + (1 - 2 alpha) (x + 1) / 2).

    Pixels at the ends of the range (most of an MNIST digit) are spread out instead of piled against a
    wall, which a flow whose layers contract by a bounded factor (the i-ResNet) cannot otherwise fit.
    """

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        self.alpha = alpha

    def _squash(self) -> float:
        return (1 - 2 * self.alpha) / 2

    def _log_det(self, p: torch.Tensor) -> torch.Tensor:
        """log |dy/dx| summed per sample, at p = alpha + squash * (x + 1)."""
        return (math.log(self._squash()) - p.log() - (-p).log1p()).flatten(1).sum(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.alpha + self._squash() * (x + 1)
        return p.log() - (-p).log1p(), self._log_det(p)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.sigmoid(y)
        return (p - self.alpha) / self._squash() - 1, -self._log_det(p)


class ActNorm(FlowLayer):
    """Glow's per-channel affine y = (x + b) * exp(s), started from the first batch it sees so that
    every channel has zero mean and unit variance there (data-dependent initialization)."""

    initialized: torch.Tensor  # bool scalar buffer: set once the first batch has been seen

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(1, -1, *([1] * (like.dim() - 2)))

    def _pixels(self, x: torch.Tensor) -> int:
        return math.prod(x.shape[2:])

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.bias.copy_(-per_channel.mean(1))
        self.log_scale.copy_(-per_channel.std(1, correction=0).clamp(min=1e-3).log())
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A trained flow's is set; torch.export cannot trace the data-dependent test, and exports trained flows only.
        if not torch.compiler.is_exporting() and not self.initialized:
            self.initialize(x)
        y = (x + self._view(self.bias, x)) * self._view(self.log_scale, x).exp()
        return y, (self.log_scale.sum() * self._pixels(x)).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = y * self._view(-self.log_scale, y).exp() - self._view(self.bias, y)
        return x, (-self.log_scale.sum() * self._pixels(y)).expand(y.shape[0])


def _mlp(inputs: int, outputs: int, hidden: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    size = inputs
    for _ in range(depth):
        layers += [nn.Linear(size, hidden), nn.ReLU()]
        size = hidden
    layers.append(nn.Linear(size, outputs))
    return nn.Sequential(*layers)


class AdditiveCoupling(FlowLayer):
    """NICE's coupling (Dinh et al. 2014): y_b = x_b + m(x_a) on an even/odd split; volume-preserving.

    `parity` picks which half is transformed, so stacked layers alternate between the two halves.
    """

    def __init__(self, dim: int, hidden: int = 1000, depth: int = 5, parity: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.parity = parity
        kept = (dim + 1 - parity) // 2  # size of the conditioning half
        self.coupling = _mlp(kept, dim - kept, hidden, depth)
        output = cast(nn.Linear, self.coupling[-1])  # _mlp always ends in a Linear
        nn.init.zeros_(output.weight)  # starts as the identity
        nn.init.zeros_(output.bias)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.parity :: 2], x[:, 1 - self.parity :: 2]  # conditioning half, transformed half

    def _merge(self, kept: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        out = torch.empty(kept.shape[0], self.dim, device=kept.device, dtype=kept.dtype)
        out[:, self.parity :: 2] = kept
        out[:, 1 - self.parity :: 2] = moved
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept, moved = self._split(x)
        zero = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        return self._merge(kept, moved + self.coupling(kept)), zero

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept, moved = self._split(y)
        zero = torch.zeros(y.shape[0], device=y.device, dtype=y.dtype)
        return self._merge(kept, moved - self.coupling(kept)), zero


class DiagonalScaling(FlowLayer):
    """y = x * exp(s): NICE's last layer, the only one that changes volume."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y * (-self.log_scale).exp(), (-self.log_scale.sum()).expand(y.shape[0])

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, target_std: float = 1.0, min_std: float = 0.05) -> None:
        """Data-dependent start (as Glow's actnorm): scale each dimension of x [B, D] to target_std.

        Background pixels of dequantized images vary over one 8-bit bin only; without this their scale
        must climb at the optimizer's pace, which takes NICE thousands of steps. `min_std` keeps a pixel
        that happened to be blank in the batch from getting a scale no digit stroke there could survive.
        """
        self.log_scale.copy_((target_std / x.std(0).clamp(min=min_std)).log())


class StandardLogistic:
    """The logistic base distribution NICE uses: heavier tails than a Gaussian."""

    @staticmethod
    def log_prob(z: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B]
        return -(nn.functional.softplus(z) + nn.functional.softplus(-z)).sum(1)

    @staticmethod
    def sample(shape: tuple[int, ...], temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
        uniform = torch.rand(shape, generator=generator).clamp(1e-6, 1 - 1e-6)
        return temperature * (uniform.log() - (-uniform).log1p())

    @staticmethod
    def seeded(seeds: torch.Tensor, dim: int) -> torch.Tensor:  # [B] -> [B, dim], counter-based
        return latent_logistic(seeds, dim)


class StandardGaussian:
    @staticmethod
    def log_prob(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)

    @staticmethod
    def sample(shape: tuple[int, ...], temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
        return temperature * torch.randn(shape, generator=generator)

    @staticmethod
    def seeded(seeds: torch.Tensor, dim: int) -> torch.Tensor:  # [B] -> [B, dim], counter-based
        return latent_gaussian(seeds, dim)


BASES: dict[str, type[StandardLogistic] | type[StandardGaussian]] = {
    "logistic": StandardLogistic,
    "gaussian": StandardGaussian,
}


class Flow(nn.Module):
    """A stack of flow layers over data of `shape`, with a base distribution over the flattened output.

    Layers see the data as `layer_shape` (flat for NICE, [C, H, W] for convolutional flows).
    `log_prob(x)` is exact (or, for the i-ResNet, an unbiased estimate of a truncated series);
    `sample(n, temperature)` inverts base samples; `inverse_states(z)` returns the states of the inverse
    pass viewed in data space (a trajectory from noise to data).
    """

    def __init__(
        self,
        layers: list[FlowLayer],
        shape: tuple[int, ...],
        base: str = "logistic",
        layer_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if base not in BASES:
            raise ValueError(f"unknown base distribution {base!r}; expected one of {', '.join(BASES)}")
        self.layers = nn.ModuleList(layers)
        self.shape = tuple(shape)
        self.layer_shape = tuple(layer_shape) if layer_shape else (math.prod(shape),)
        self.latent_shape = self.layer_shape
        for layer in layers:
            self.latent_shape = layer.output_shape(self.latent_shape)
        self.base_name = base
        self.base = BASES[base]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, *shape] -> [B, D], [B]
        z = x.reshape(x.shape[0], *self.layer_shape)
        log_det = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for layer in self.layers:
            z, step = layer(z)
            log_det = log_det + step
        return z.reshape(x.shape[0], -1), log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, D] -> [B, *shape], [B]
        x, log_det, _ = self._inverse(z, keep_states=False)
        return x, log_det

    def inverse_states(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The data-space view after each inverse layer (and each fixed-point iterate): a flow's trajectory."""
        return self._inverse(z, keep_states=True)[2]

    def decode(
        self, z: torch.Tensor, keep_states: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Samples from base points z [B, D], their log-density under the model (from the same inverse pass:
        log p(x) = log p_base(z) - log|det dx/dz|), and the trajectory when asked for."""
        x, log_det, states = self._inverse(z, keep_states)
        return x, self.base.log_prob(z) - log_det, states

    def _inverse(self, z: torch.Tensor, keep_states: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        state = z.reshape(z.shape[0], *self.latent_shape)
        log_det = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        frames: list[torch.Tensor] = []
        layers = cast(Sequence[FlowLayer], self.layers)  # __init__ fills the ModuleList with FlowLayers only
        for layer in reversed(layers):
            if keep_states:
                state, step, states = layer.inverse_with_states(state)
                frames += [self._data_view(each) for each in states]
            else:
                state, step = layer.inverse(state)
            log_det = log_det + step
        return state.reshape(z.shape[0], *self.shape), log_det, frames

    def _data_view(self, state: torch.Tensor) -> torch.Tensor:
        """Undo the squeezes (a pure rearrangement) so any intermediate state can be drawn as an image."""
        while tuple(state.shape[1:]) != self.layer_shape:
            state = unsqueeze2d(state)
        return state.reshape(state.shape[0], *self.shape)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:  # [B, *shape] -> [B]
        z, log_det = self(x)
        return self.base.log_prob(z) + log_det

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent start: one pass over a batch lets every ActNorm set itself from what reaches it."""
        self(x)

    def base_sample(self, seeds: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
        """Base points z [B, D] for seeded samples, scaled by the temperature (a scalar or [B, 1]): counter-based
        noise, so a seed gives the same z in the CLI and in the server whatever else is in the batch."""
        return self.base.seeded(seeds, math.prod(self.shape)) * temperature

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.parameters()).device
        z = self.base.sample((n, math.prod(self.shape)), temperature, generator).to(device)
        return self.inverse(z)[0]


class NICE(Flow):
    """Dinh et al. 2014: additive couplings on alternating even/odd halves, then a diagonal scaling.

    The paper's MNIST model: 4 couplings of 5 hidden layers x 1000 ReLU units, logistic prior.
    """

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the scaling from a batch of (dequantized) data, so training starts near the data's scale."""
        z, _ = self(x)  # through the couplings (and the current scaling)
        scaling = cast(DiagonalScaling, self.layers[-1])  # __init__ appends it after the couplings
        before = z * (-scaling.log_scale).exp()
        scaling.initialize(before, target_std=math.pi / math.sqrt(3) if self.base_name == "logistic" else 1.0)

    def __init__(
        self,
        shape: tuple[int, ...] | list[int] = (1, 28, 28),
        couplings: int = 4,
        hidden: int = 1000,
        depth: int = 5,
        base: str = "logistic",
    ) -> None:
        dim = math.prod(shape)
        layers: list[FlowLayer] = [AdditiveCoupling(dim, hidden, depth, parity=index % 2) for index in range(couplings)]
        layers.append(DiagonalScaling(dim))
        super().__init__(layers, tuple(shape), base)
