"""Invertible residual networks (Behrmann et al. 2019): y = x + g(x) with Lip(g) < 1.

The residual branch is spectrally normalized to a Lipschitz coefficient below 1 (power iteration on the
convolution operator itself, not on its reshaped kernel), so the block is invertible by fixed-point
iteration, and log|det(I + J_g)| = sum_k (-1)^(k+1) tr(J_g^k) / k is estimated with Hutchinson's trace
estimator for training; small inputs take the exact determinant instead. The series is truncated at
`series_terms`: Behrmann et al. bound the bias by the tail sum_{k>n} d Lip(g)^k / k, so evaluation may use more
terms than training did (`IResNet.series_terms`). Each inverse records whether its fixed-point iteration met
its tolerance within its cap (`InverseConvergence`), so a sample from a non-converged inverse is never silent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional

from training.models.flows import ActNorm, Flow, FlowLayer, LogitTransform, Squeeze, can_squeeze
from training.models.glow import as_image_shape
from training.sampling.noise import chain_gaussian

EXACT_LOG_DET_MAX_DIM = 16  # "auto" computes the full Jacobian up to this many dimensions
# Series terms `evaluate` uses for test bits/dim unless told otherwise. On the shipped MNIST i-ResNet (||J_g|| up
# to 0.72) the truncation bias, from exact Jacobians, is -0.017 bits/dim at its 4 training terms, -6e-4 at 10 and
# -4e-5 at 16: under the 4 decimals evaluate reports, at 4x the cost of 4 terms.
EVALUATION_SERIES_TERMS = 16


@dataclass(frozen=True)
class InverseConvergence:
    """How the fixed-point inverse x = y - g(x) (Behrmann et al. 2019, Alg. 1) ended for each of N samples.

    `residual` is a sample's last step max|x_k+1 - x_k| relative to its scale 1 + max|x_k+1|, the quantity the
    iteration compares with `tolerance` (a step not yet small says the iterate still moves: in the 2-norm the
    distance to the fixed point is at most Lip/(1 - Lip) times the last step); a non-finite step counts as an
    infinite residual. A sample converged when that step fell to `tolerance` within `max_iterations`; over
    several blocks it converged only if every block did.
    """

    iterations: torch.Tensor  # [N] long: iterations run (over blocks: the most any block ran)
    residual: torch.Tensor  # [N] float64: the final relative step (over blocks: the largest)
    converged: torch.Tensor  # [N] bool
    tolerance: float
    max_iterations: int

    def __len__(self) -> int:
        return len(self.converged)

    def _check_same_settings(self, other: InverseConvergence) -> None:
        if (self.tolerance, self.max_iterations) != (other.tolerance, other.max_iterations):
            raise ValueError(
                f"convergence records of inverses run with tolerance {self.tolerance} and cap {self.max_iterations} "
                f"cannot be merged with tolerance {other.tolerance} and cap {other.max_iterations}"
            )

    def and_then(self, other: InverseConvergence) -> InverseConvergence:
        """The same N samples through a further block: the most iterations, the largest residual, all converged."""
        self._check_same_settings(other)
        if len(self) != len(other):
            raise ValueError(f"a block's record covers {len(other)} samples; the batch so far has {len(self)}")
        return InverseConvergence(
            torch.maximum(self.iterations, other.iterations),
            torch.maximum(self.residual, other.residual),
            self.converged & other.converged,
            self.tolerance,
            self.max_iterations,
        )

    @staticmethod
    def concatenate(parts: Sequence[InverseConvergence]) -> InverseConvergence:
        """Records of consecutive batches as one, in sample order."""
        if not parts:
            raise ValueError("no convergence records to concatenate: invert at least one batch")
        for part in parts[1:]:
            parts[0]._check_same_settings(part)
        return InverseConvergence(
            torch.cat([part.iterations for part in parts]),
            torch.cat([part.residual for part in parts]),
            torch.cat([part.converged for part in parts]),
            parts[0].tolerance,
            parts[0].max_iterations,
        )

    def report(self, listed: int = 20) -> dict[str, Any]:
        """JSON-able summary: how many samples did not converge and the first `listed` of their indices, the
        largest final residual (None if some residual is not finite: see `non_finite`), the iterations run."""
        failed = (~self.converged).nonzero().squeeze(1)
        finite = torch.isfinite(self.residual)
        largest = self.residual.max().item() if len(self) else 0.0
        return {
            "n": len(self),
            "tolerance": self.tolerance,
            "max_iterations": self.max_iterations,
            "not_converged": len(failed),
            "not_converged_samples": failed[:listed].tolist(),
            "max_residual": largest if math.isfinite(largest) else None,
            "non_finite": int((~finite).sum()),
            "mean_iterations": round(self.iterations.double().mean().item(), 2) if len(self) else 0.0,
            "most_iterations": int(self.iterations.max()) if len(self) else 0,
        }


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


def content_seeds(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit seed [B] per sample that is a pure function of its bits (any floating dtype): the same for a sample in
    any batch and on every run (int64 sums wrap, in any order)."""
    bits = x.detach().contiguous().flatten(1).view(torch.int16).to(torch.int64)
    weights = (torch.arange(bits.shape[1], dtype=torch.int64, device=x.device) * 2654435761 + 1) & 0xFFFFFFFF
    return (bits * weights).sum(1) & 0xFFFFFFFF


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
        self.last_convergence: InverseConvergence | None = None  # the latest inverse's, per sample
        # While a flow scores: the seeds of its input images and this block's counter, so that a block's probe does
        # not hang on the last bits of its own input, which the batch's size moves.
        self.probe_seeds: tuple[torch.Tensor, int] | None = None

    @property
    def last_iterations(self) -> torch.Tensor:
        """Iterations per sample of the latest inverse (none before the first)."""
        if self.last_convergence is None:
            return torch.zeros(0, dtype=torch.long)
        return self.last_convergence.iterations

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
        if keep_graph:  # training: a fresh probe each time
            probe = torch.randn_like(x)
        else:  # scoring: counter-based noise seeded by the scored input's bits (a flow's, set by IResNet.forward)
            seeds, counter = self.probe_seeds if self.probe_seeds is not None else (content_seeds(x), 0)
            probe = chain_gaussian(seeds, torch.full_like(seeds, counter), tuple(x.shape[1:])).to(x.dtype)
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

    def solve(self, y: torch.Tensor) -> tuple[torch.Tensor, InverseConvergence]:
        """The inverse without its log-det: x [B, C, H, W] and how the fixed-point iteration ended per sample."""
        x, convergence, _ = self._iterate(y, keep_states=False)
        return x, convergence

    def _fixed_point(self, y: torch.Tensor, keep_states: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x, _, states = self._iterate(y, keep_states)
        _, log_det = self._forward_and_log_det(x, update=False)
        return x, -log_det, states or [x]

    def _iterate(
        self, y: torch.Tensor, keep_states: bool
    ) -> tuple[torch.Tensor, InverseConvergence, list[torch.Tensor]]:
        """Fixed point of x = y - g(x) (a contraction). A sample stops once its largest change is under
        `tolerance` relative to its scale; all stop at `max_iterations`. States: every iterate, if kept."""
        with torch.no_grad():
            x = y.clone()
            active = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
            iterations = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
            residual = torch.full((y.shape[0],), math.inf, dtype=y.dtype, device=y.device)
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
                residual[index] = torch.nan_to_num(change / scale, nan=math.inf)
                active[index[change <= self.tolerance * scale]] = False
                if keep_states:
                    states.append(x.clone())
            convergence = InverseConvergence(
                iterations.cpu(), residual.double().cpu(), (~active).cpu(), self.tolerance, self.max_iterations
            )
        self.last_convergence = convergence
        return x, convergence, states


class IResNet(Flow):
    """Logit preprocessing (unless `logit_alpha` is 0), then `scales` times: squeeze (while the sides are even)
    and an equal share of `blocks` x [actnorm, invertible residual block].

    More scales reach across the image sooner: a block's 3x3 convolutions at 7x7 (MNIST's second scale) see a
    quarter of the digit, where at 14x14 twelve blocks still see patches; that is what turns local blobs into
    strokes. A block on 16 x 7 x 7 costs about what one on 4 x 14 x 14 does.
    """

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
        scales: int = 1,
    ) -> None:
        if not 1 <= scales <= blocks:
            raise ValueError(f"an i-ResNet needs 1 <= scales <= blocks, got {scales} scales of {blocks} blocks")
        layer_shape = as_image_shape(tuple(shape))
        layers: list[FlowLayer] = [LogitTransform(logit_alpha)] if logit_alpha > 0 else []
        state_shape = layer_shape
        for scale in range(scales):
            if can_squeeze(state_shape):
                squeeze = Squeeze()
                layers.append(squeeze)
                state_shape = squeeze.output_shape(state_shape)
            for _ in range(blocks * (scale + 1) // scales - blocks * scale // scales):
                layers.append(ActNorm(state_shape[0]))
                layers.append(
                    ResidualBlock(state_shape, hidden, coefficient, series_terms, log_det, tolerance, max_iterations)
                )
        super().__init__(layers, tuple(shape), base, layer_shape)
        self._series_terms = series_terms

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow's pass; when scoring (no gradient kept), every block's Hutchinson probe is seeded by the input
        image's bits and the block's index, so an image's log-det estimate is the same alone, in any batch, on
        every run (a fresh random probe moved a served bits/dim between two identical requests)."""
        if torch.is_grad_enabled():
            return super().forward(x)
        blocks = [layer for layer in self.layers if isinstance(layer, ResidualBlock)]
        seeds = content_seeds(x)
        for index, block in enumerate(blocks):
            block.probe_seeds = (seeds, 2 * index)
        try:
            return super().forward(x)
        finally:
            for block in blocks:
                block.probe_seeds = None

    @property
    def series_terms(self) -> int:
        """Power-series terms of every block's log-det estimate (blocks small enough for the exact log-det
        ignore it). Setting it changes the estimate from then on: more terms, less truncation bias."""
        return self._series_terms

    @series_terms.setter
    def series_terms(self, terms: int) -> None:
        if terms < 1:
            raise ValueError(f"the log-det power series needs at least 1 term, got {terms}")
        self._series_terms = terms
        for layer in self.layers:
            if isinstance(layer, ResidualBlock):
                layer.series_terms = terms

    def invert(self, z: torch.Tensor) -> tuple[torch.Tensor, InverseConvergence]:
        """Samples x [B, *shape] from base points z [B, D] (as `inverse`, without the log-det) and whether every
        block's fixed-point inverse converged for each sample."""
        state = z.reshape(z.shape[0], *self.latent_shape)
        convergence: InverseConvergence | None = None
        for layer in reversed(cast(Sequence[FlowLayer], self.layers)):  # __init__ fills it with FlowLayers only
            if isinstance(layer, ResidualBlock):
                state, block = layer.solve(state)
                convergence = block if convergence is None else convergence.and_then(block)
            else:
                state, _ = layer.inverse(state)
        if convergence is None:
            raise ValueError(
                "this IResNet was built with 0 blocks: it has no fixed-point inverse whose convergence to check"
            )
        return state.reshape(z.shape[0], *self.shape), convergence

    def refresh_spectral_norms(self, iterations: int = 50) -> None:
        for module in self.modules():
            if isinstance(module, LipschitzConv):
                module.refresh(iterations)
