"""Invertible residual networks (Behrmann et al. 2019): y = x + g(x) with Lip(g) < 1.

The residual branch is spectrally normalized to a Lipschitz coefficient below 1 (power iteration on the
convolution operator itself, not on its reshaped kernel), so the block is invertible by fixed-point
iteration, and log|det(I + J_g)| = sum_k (-1)^(k+1) tr(J_g^k) / k is estimated with Hutchinson's trace
estimator for training; small inputs take the exact determinant instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from training.models.flows import ActNorm, Flow, FlowLayer, LogitTransform, Squeeze, can_squeeze
from training.models.glow import as_image_shape

EXACT_LOG_DET_MAX_DIM = 16  # "auto" computes the full Jacobian up to this many dimensions


def _unit(tensor: torch.Tensor) -> torch.Tensor:
    return tensor / tensor.norm().clamp(min=1e-12)


class LipschitzConv(nn.Module):
    """A convolution rescaled so its operator norm on `spatial`-sized inputs is at most `coefficient`.

    Power iteration runs on the operator (conv, then its adjoint conv_transpose) and advances one step per
    training forward only; the norm is always ||W u|| for the current weights, so an inverse, an
    evaluation and a float16 checkpoint all use the same map for fixed `u`.
    """

    u: torch.Tensor  # [1, inputs, *spatial] buffer: the power iteration's current right-singular vector

    def __init__(
        self,
        inputs: int,
        outputs: int,
        kernel: int,
        spatial: tuple[int, int],
        coefficient: float,
        power_iterations: int = 1,
    ) -> None:
        super().__init__()
        self.padding = kernel // 2
        self.coefficient = coefficient
        self.power_iterations = power_iterations
        conv = nn.Conv2d(inputs, outputs, kernel, padding=self.padding)
        assert conv.bias is not None  # built with bias=True (the default)
        self.weight = nn.Parameter(conv.weight.detach())
        self.bias = nn.Parameter(conv.bias.detach())
        self.register_buffer("u", _unit(torch.randn(1, inputs, *spatial)))
        self.refresh(iterations=50)

    @torch.no_grad()
    def refresh(self, iterations: int) -> None:
        """Advance power iteration: `u` tends to the top right-singular vector of the operator."""
        u = self.u
        for _ in range(iterations):
            v = _unit(functional.conv2d(u, self.weight, padding=self.padding))
            u = _unit(functional.conv_transpose2d(v, self.weight, padding=self.padding))
        self.u.copy_(u)

    def sigma(self) -> torch.Tensor:
        """||W u||: the operator norm estimated from the current weights (differentiable in them)."""
        return functional.conv2d(self.u.clone(), self.weight, padding=self.padding).norm()

    def forward(self, x: torch.Tensor, update: bool = False) -> torch.Tensor:
        if update:
            self.refresh(self.power_iterations)
        scale = torch.clamp(self.coefficient / self.sigma(), max=1.0)
        return functional.conv2d(x, self.weight * scale, self.bias, padding=self.padding)


class ResidualBlock(FlowLayer):
    """x -> x + g(x), g = conv -> ELU -> conv(1x1) -> ELU -> conv, each conv Lipschitz <= `coefficient`.

    `log_det`: "exact" (full Jacobian, small dims), "series" (`series_terms` terms of the power series,
    one Hutchinson probe) or "auto" (exact up to EXACT_LOG_DET_MAX_DIM dimensions).
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        hidden: int,
        coefficient: float = 0.9,
        series_terms: int = 5,
        log_det: str = "auto",
        tolerance: float = 1e-5,
        max_iterations: int = 100,
    ) -> None:
        super().__init__()
        if not 0 < coefficient < 1:
            raise ValueError(f"the Lipschitz coefficient must lie in (0, 1) for invertibility, got {coefficient}")
        if log_det not in ("auto", "exact", "series"):
            raise ValueError(f"log_det must be 'auto', 'exact' or 'series', not {log_det!r}")
        channels, height, width = shape
        kernel = 3 if height > 1 else 1
        spatial = (height, width)
        self.convs = nn.ModuleList(
            [
                LipschitzConv(channels, hidden, kernel, spatial, coefficient),
                LipschitzConv(hidden, hidden, 1, spatial, coefficient),
                LipschitzConv(hidden, channels, kernel, spatial, coefficient),
            ]
        )
        self.dim = math.prod(shape)
        self.series_terms = series_terms
        self.exact = log_det == "exact" or (log_det == "auto" and self.dim <= EXACT_LOG_DET_MAX_DIM)
        self.tolerance = tolerance
        self.max_iterations = max_iterations
        self.last_iterations = torch.zeros(0, dtype=torch.long)  # per sample, from the latest inverse

    def residual(self, x: torch.Tensor, update: bool = False) -> torch.Tensor:
        first, middle, last = self.convs
        return last(functional.elu(middle(functional.elu(first(x, update)), update)), update)

    def _log_det(self, x: torch.Tensor, gx: torch.Tensor, keep_graph: bool) -> torch.Tensor:
        """log|det(I + dg/dx)| per sample; x must require grad and gx = g(x) be built from it."""
        batch = x.shape[0]
        if self.exact:
            rows = [
                torch.autograd.grad(gx.flatten(1)[:, index].sum(), x, retain_graph=True, create_graph=keep_graph)[
                    0
                ].flatten(1)
                for index in range(self.dim)
            ]
            jacobian = torch.stack(rows, 1)  # [B, D, D]
            eye = torch.eye(self.dim, device=x.device, dtype=x.dtype)
            return torch.linalg.slogdet(eye + jacobian)[1]
        probe = torch.randn_like(x)
        power = probe
        total = torch.zeros(batch, device=x.device, dtype=x.dtype)
        for term in range(1, self.series_terms + 1):
            power = torch.autograd.grad(gx, x, power, retain_graph=True, create_graph=keep_graph)[0]  # v^T J^k
            total = total + (-1) ** (term + 1) / term * (power * probe).flatten(1).sum(1)
        return total

    def _forward_and_log_det(self, x: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not (keep_graph and x.requires_grad):
                x = x.detach().requires_grad_(True)
            gx = self.residual(x, update)
            log_det = self._log_det(x, gx, keep_graph)
            y = x + gx
        if not keep_graph:
            return y.detach(), log_det.detach()
        return y, log_det

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward_and_log_det(x, update=self.training)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_det, _ = self._fixed_point(y, keep_states=False)
        return x, log_det

    def inverse_with_states(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        return self._fixed_point(y, keep_states=True)

    def _fixed_point(self, y: torch.Tensor, keep_states: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Fixed point of x = y - g(x) (a contraction). A sample stops once its largest change is under
        `tolerance` relative to its scale; all stop at `max_iterations`. States: every iterate, if kept."""
        with torch.no_grad():
            x = y.clone()
            active = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
            iterations = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
            states = []
            for _ in range(self.max_iterations):
                index = active.nonzero().squeeze(1)
                if len(index) == 0:
                    break
                updated = y[index] - self.residual(x[index])
                change = (updated - x[index]).flatten(1).abs().amax(1)
                scale = 1 + updated.flatten(1).abs().amax(1)
                x[index] = updated
                iterations[index] += 1
                active[index[change <= self.tolerance * scale]] = False
                if keep_states:
                    states.append(x.clone())
            self.last_iterations = iterations.cpu()
        _, log_det = self._forward_and_log_det(x, update=False)
        return x, -log_det, states or [x]


class IResNet(Flow):
    """Logit preprocessing (unless `logit_alpha` is 0), squeeze (even-sized images), then `blocks` x
    [actnorm, invertible residual block]."""

    def __init__(
        self,
        shape: tuple[int, ...] | list[int] = (1, 28, 28),
        blocks: int = 8,
        hidden: int = 64,
        coefficient: float = 0.9,
        series_terms: int = 5,
        log_det: str = "auto",
        tolerance: float = 1e-5,
        max_iterations: int = 100,
        base: str = "gaussian",
        logit_alpha: float = 0.0,
    ) -> None:
        layer_shape = as_image_shape(tuple(shape))
        layers: list[FlowLayer] = [LogitTransform(logit_alpha)] if logit_alpha > 0 else []
        state_shape = layer_shape
        if can_squeeze(layer_shape):
            squeeze = Squeeze()
            layers.append(squeeze)
            state_shape = squeeze.output_shape(layer_shape)
        for _ in range(blocks):
            layers.append(ActNorm(state_shape[0]))
            layers.append(
                ResidualBlock(state_shape, hidden, coefficient, series_terms, log_det, tolerance, max_iterations)
            )
        super().__init__(layers, tuple(shape), base, layer_shape)

    def refresh_spectral_norms(self, iterations: int = 50) -> None:
        for module in self.modules():
            if isinstance(module, LipschitzConv):
                module.refresh(iterations)
