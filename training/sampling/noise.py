"""Counter-based noise: every random number a seeded chain uses is a pure function of (seed, counter, element).

So a seeded chain follows the same path whatever other chains share its batch, at any batch size,
without one torch.Generator per chain; the CLI and the server draw the same numbers for the same seed.
Counters: Langevin step s uses counter 2s (Box-Muller takes two uniforms per value); chain starts use
counters no step reaches (`START`).
"""

from __future__ import annotations

import math

import torch

from training.sampling.sampler_config import EBMSampler

_MASK32 = 0xFFFFFFFF
START = -1  # the step counter of a chain's starting point: no Langevin step uses it
CLASS = -3  # the counter of a chain's randomly drawn class (odd: no Gaussian counter, not START)


def chain_seeds(seed: int, n: int) -> torch.Tensor:
    """Distinct 32-bit seeds [n] for a request's n chains, fixed by the request's seed alone."""
    return (torch.arange(n, dtype=torch.int64) + seed * 1_000_003) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK32
    x = ((x ^ (x >> 16)) * 0x297A2D39) & _MASK32
    return x ^ (x >> 16)


def _uniform_from_counter(seeds: torch.Tensor, counters: torch.Tensor, count: int) -> torch.Tensor:
    """Uniform (0, 1) floats [B, count] (float64) from per-chain seeds [B] and counters [B]."""
    element = torch.arange(count, device=seeds.device, dtype=torch.int64)  # [count]
    key = _mix32((seeds & _MASK32) ^ _mix32(((counters & _MASK32) + 0x9E3779B9) & _MASK32))  # [B]
    bits = _mix32(key.unsqueeze(1) ^ _mix32(element + 0x632BE5AB).unsqueeze(0))  # [B, count]
    return (bits.to(torch.float64) + 0.5) / 4294967296.0


def chain_gaussian(seeds: torch.Tensor, steps: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise [B, *shape] for chains with seeds [B] at step counters [B] (Box-Muller)."""
    count = math.prod(shape)
    uniform = _uniform_from_counter(seeds, steps * 2, 2 * count)  # [B, 2 * count]
    radius = torch.sqrt(-2.0 * torch.log(uniform[:, :count]))
    angle = (2.0 * torch.pi) * uniform[:, count:]
    return (radius * torch.cos(angle)).to(torch.float32).reshape(-1, *shape)


def chain_uniform(seeds: torch.Tensor, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    """Uniform starting points [B, *shape] in [low, high] for seeded chains (the odd counter 2**32 - 1)."""
    uniform = _uniform_from_counter(seeds, torch.full_like(seeds, START), math.prod(shape))
    return (low + (high - low) * uniform).to(torch.float32).reshape(-1, *shape)


def chain_classes(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """A class index [B] in 0..count-1 per seeded chain, uniform, for conditional energies asked for no label."""
    uniform = _uniform_from_counter(seeds, torch.full_like(seeds, CLASS), 1)[:, 0]  # [B]
    return (uniform * count).long().clamp_(max=count - 1)


def chain_gaussian_start(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal starting points [B, *shape] for seeded chains (the even counter 2**32 - 2)."""
    return chain_gaussian(seeds, torch.full_like(seeds, START), shape)


def chain_start(
    seeds: torch.Tensor, shape: tuple[int, ...], sampler: EBMSampler, data_range: tuple[float, float]
) -> torch.Tensor:
    """Where noise-started chains begin, by the sampler's prior: 'uniform' over the data range or
    'gaussian' N(0, prior_std^2 I)."""
    if sampler.prior == "uniform":
        return chain_uniform(seeds, shape, *data_range)
    return chain_gaussian_start(seeds, shape) * sampler.prior_std  # EBMSampler admits no other prior


def latent_gaussian(seeds: torch.Tensor, dim: int) -> torch.Tensor:
    """N(0, I) latents [B, dim] for one-shot samplers (GAN generators, Gaussian flow bases)."""
    return chain_gaussian(seeds, torch.zeros_like(seeds), (dim,))


def latent_logistic(seeds: torch.Tensor, dim: int) -> torch.Tensor:
    """Standard logistic latents [B, dim] (NICE's base), by the inverse CDF of counter-based uniforms."""
    uniform = chain_uniform(seeds, (dim,), 0.0, 1.0).clamp(1e-6, 1 - 1e-6)
    return uniform.log() - (-uniform).log1p()
