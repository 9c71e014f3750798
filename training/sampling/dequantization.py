"""Variational dequantization (Ho et al. 2019, "Flow++", section 3.1): the bound a flow trained on x + u, u ~ q(u | x),
gives the probability of discrete data.

A flow's density p is over the continuous points low + (k + u) w of levels k [B, *shape] (bins w = (high - low) / L
wide, u in [0, 1)^D the offset within each bin). The probability of the levels is P(k) = E_q[p(low + (k + u) w) w^D
/ q(u | k)], and by Jensen's inequality

    log P(k) >= E_{u ~ q(u | k)} [log p(low + (k + u) w) - log q(u | k)] + D log w,

so the bits/dim -(bound + D log w) / (D log 2) are an upper bound on the model's true bits/dim. Uniform
dequantization is the case q = U[0, 1)^D, log q = 0. The expectation is estimated by the mean over K draws (the
sidecar's data.dequantization_samples, 1 by default): each draw's value is itself an unbiased estimate of the bound,
so K changes its variance, not what it estimates. u = the dequantizer's map of eps ~ N(0, I), eps counter-based noise
(training/sampling/noise.py) seeded by the image and draw k: a score is the same alone, in any batch, over HTTP and
on the command line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from training.sampling.noise import chain_gaussian

# (x [B, *shape] the levels' values in the data range, eps [B, *shape]) -> (u [B, *shape] in [0, 1], log q(u | x) [B])
Dequantizer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def dequantizer_noise(seeds: torch.Tensor, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
    """eps [B, *shape] ~ N(0, I) of draw `draw` (0..K-1) for images with seeds [B]."""
    return chain_gaussian(seeds, torch.full_like(seeds, draw), shape)


def level_values(levels: torch.Tensor, data_range: tuple[float, float], count: int) -> torch.Tensor:
    """Levels k [B, *shape] -> their values low + k (high - low) / (L - 1) [B, *shape], where datasets load them."""
    low, high = data_range
    return levels.float() / (count - 1) * (high - low) + low


def variational_log_prob(
    log_prob: Callable[[torch.Tensor], torch.Tensor],  # points [B, *shape] -> log p [B], nats over the data range
    dequantizer: Dequantizer,
    levels: torch.Tensor,  # [B, *shape] integer levels 0..count-1
    seeds: torch.Tensor,  # [B] int64, each image's
    data_range: tuple[float, float],
    count: int = 256,  # L, the data's levels
    draws: int = 1,  # K
    device: torch.device | None = None,
) -> torch.Tensor:
    """The bound [B] (nats, in log p's units): the mean over K draws u ~ q(u | x) of log p(low + (k + u) w) -
    log q(u | x), so that training/models/flows.py `bits_per_dim` of it is the bound's bits/dim."""
    low, high = data_range
    width = (high - low) / count
    shape = tuple(levels.shape[1:])
    values = level_values(levels, data_range, count).to(device)
    bounds = []
    for draw in range(draws):
        u, log_q = dequantizer(values, dequantizer_noise(seeds, draw, shape).to(device))
        points = low + (levels.to(u.device).float() + u) * width  # [B, *shape]
        bounds.append(log_prob(points).float() - log_q.float())
    return torch.stack(bounds).mean(0)
