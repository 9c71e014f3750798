"""Normalizing flows: invertible layers that return (output, log_det) both ways, and models built from them.

Every layer maps `forward(x) -> (y, log_det)` (data towards the base) and `inverse(y) -> (x, log_det)`,
with `log_det` of shape [batch] on the input's device; the two log-dets of a round trip cancel.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FlowLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


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
        nn.init.zeros_(self.coupling[-1].weight)  # starts as the identity
        nn.init.zeros_(self.coupling[-1].bias)

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


class StandardGaussian:
    @staticmethod
    def log_prob(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)

    @staticmethod
    def sample(shape: tuple[int, ...], temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
        return temperature * torch.randn(shape, generator=generator)


BASES = {"logistic": StandardLogistic, "gaussian": StandardGaussian}


class Flow(nn.Module):
    """A stack of flow layers over flattened data of `shape`, with a base distribution.

    `log_prob(x)` is exact; `sample(n, temperature)` inverts base samples; `inverse_states(z)` returns
    the state after each layer of the inverse pass (a trajectory from noise to data).
    """

    def __init__(self, layers: list[FlowLayer], shape: tuple[int, ...], base: str = "logistic") -> None:
        super().__init__()
        if base not in BASES:
            raise ValueError(f"unknown base distribution {base!r}; expected one of {', '.join(BASES)}")
        self.layers = nn.ModuleList(layers)
        self.shape = tuple(shape)
        self.base_name = base
        self.base = BASES[base]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, *shape] -> [B, D], [B]
        z = x.reshape(x.shape[0], -1)
        log_det = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for layer in self.layers:
            z, step = layer(z)
            log_det = log_det + step
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, D] -> [B, *shape], [B]
        states, log_det = self._inverse(z)
        return states[-1], log_det

    def _inverse(self, z: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        log_det = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        states = []
        for layer in reversed(self.layers):
            z, step = layer.inverse(z)
            log_det = log_det + step
            states.append(z.reshape(z.shape[0], *self.shape))
        return states, log_det

    def inverse_states(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The data-space view after each inverse layer: the frames of a flow's trajectory."""
        return self._inverse(z)[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:  # [B, *shape] -> [B]
        z, log_det = self(x)
        return self.base.log_prob(z) + log_det

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
        scaling: DiagonalScaling = self.layers[-1]
        before = z * (-scaling.log_scale).exp()
        scaling.initialize(before, target_std=math.pi / math.sqrt(3) if self.base_name == "logistic" else 1.0)

    def __init__(self, shape: tuple[int, ...] | list[int] = (1, 28, 28), couplings: int = 4, hidden: int = 1000,
                 depth: int = 5, base: str = "logistic") -> None:
        dim = math.prod(shape)
        layers: list[FlowLayer] = [AdditiveCoupling(dim, hidden, depth, parity=index % 2) for index in range(couplings)]
        layers.append(DiagonalScaling(dim))
        super().__init__(layers, tuple(shape), base)
