"""Counter-based noise: every random number a seeded chain uses is a pure function of (seed, counter, element).

So a seeded chain follows the same path whatever other chains share its batch, at any batch size,
without one torch.Generator per chain; the CLI and the server draw the same numbers for the same seed.
Counters: Langevin step s uses counter 2s (Box-Muller takes two uniforms per value); chain starts use
counters no step reaches (`START`).
"""

from __future__ import annotations

import functools
import math

import torch

from training.sampling.sampler_config import EBMSampler

_MASK32 = 0xFFFFFFFF
START = -1  # the step counter of a chain's starting point: no Langevin step uses it
CLASS = -3  # the counter of a chain's randomly drawn class (odd: no Gaussian counter, not START)


def chain_seeds(seed: int, n: int) -> torch.Tensor:
    """Distinct 32-bit seeds [n] for a request's n chains, fixed by the request's seed alone."""
    return (torch.arange(n, dtype=torch.int64) + seed * 1_000_003) & _MASK32


CHUNK_VALUES = 1 << 16  # values hashed at a time: the temporaries stay in cache, whatever the state's size


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK32
    x = ((x ^ (x >> 16)) * 0x297A2D39) & _MASK32
    return x ^ (x >> 16)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values < 2**32 as int32 with the same 32 bits (two's complement)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _mix32_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """_mix32 in place on the 32 bits of x (int32; `scratch` a tensor of its size): int32 multiplies wrap
    modulo 2**32 as the masked int64 ones did, and each right shift is made logical by a mask, so the bits are
    _mix32's, at half the memory and with the CPU's 32-bit vector multiply."""
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x2C1B3C6D), (16, 0x297A2D39)):
        torch.bitwise_right_shift(x, shift, out=scratch).bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(scratch).mul_(multiplier)
    torch.bitwise_right_shift(x, 16, out=scratch).bitwise_and_(0xFFFF)
    return x.bitwise_xor_(scratch)


@functools.lru_cache(maxsize=8)
def _element_keys(count: int, device: torch.device) -> torch.Tensor:
    """Each element's hash [count] (int32 bits), the same for every chain and step: computed once per size."""
    return _as_int32(_mix32(torch.arange(count, device=device, dtype=torch.int64) + 0x632BE5AB))


def _chain_keys(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Each chain's key [B] (int64 < 2**32) for its counter."""
    return _mix32((seeds & _MASK32) ^ _mix32(((counters & _MASK32) + 0x9E3779B9) & _MASK32))


class _Uniforms:
    """Uniform (0, 1) floats of elements [start, stop) for chains with keys [B], a chunk at a time, in float64
    scratch reused from chunk to chunk: element e of chain b is (mix32(key_b ^ mix32(e + c)) + 0.5) / 2**32, the
    same numbers whole tensors of the state's size gave, without int64 and float64 tensors of that size."""

    def __init__(self, keys: torch.Tensor, count: int, width: int) -> None:
        self.keys = _as_int32(keys).unsqueeze(1)  # [B, 1]
        self.elements = _element_keys(count, keys.device)  # [count]
        self.bits = torch.empty(len(keys), width, dtype=torch.int32, device=keys.device)  # [B, width]
        self.scratch = torch.empty_like(self.bits)

    def chunk(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """out [B, stop - start] (float64) filled with the uniforms of elements [start, stop)."""
        bits, scratch = self.bits[:, : stop - start], self.scratch[:, : stop - start]
        torch.bitwise_xor(self.keys, self.elements[start:stop], out=bits)
        _mix32_(bits, scratch).bitwise_xor_(-(2**31))  # unsigned u as the signed u - 2**31: exact in float64
        return out.copy_(bits).add_(2147483648.5).div_(4294967296.0)  # (u + 0.5) / 2**32, as before


def _uniform_from_counter(seeds: torch.Tensor, counters: torch.Tensor, count: int) -> torch.Tensor:
    """Uniform (0, 1) floats [B, count] (float64) from per-chain seeds [B] and counters [B] (small counts:
    classes; states go through _Uniforms a chunk at a time)."""
    uniforms = _Uniforms(_chain_keys(seeds, counters), count, count)
    return uniforms.chunk(0, count, torch.empty(len(seeds), count, dtype=torch.float64, device=seeds.device))


def _chunk_width(batch: int, count: int) -> int:
    return max(1, min(count, CHUNK_VALUES // max(batch, 1)))


def chain_gaussian(seeds: torch.Tensor, steps: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise [B, *shape] for chains with seeds [B] at step counters [B] (Box-Muller: value e
    from the uniforms of elements e and count + e, in float64, rounded once to float32)."""
    count, batch = math.prod(shape), len(seeds)
    width = _chunk_width(batch, count)
    uniforms = _Uniforms(_chain_keys(seeds, steps * 2), 2 * count, width)
    radius = torch.empty(batch, width, dtype=torch.float64, device=seeds.device)  # [B, width]
    angle = torch.empty_like(radius)
    noise = torch.empty(batch, count, dtype=torch.float32, device=seeds.device)  # [B, count]
    for start in range(0, count, width):
        stop = min(start + width, count)
        r = uniforms.chunk(start, stop, radius[:, : stop - start]).log_().mul_(-2.0).sqrt_()
        a = uniforms.chunk(count + start, count + stop, angle[:, : stop - start]).mul_(2.0 * torch.pi).cos_()
        noise[:, start:stop] = r.mul_(a)
    return noise.reshape(-1, *shape)


def chain_uniform(seeds: torch.Tensor, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    """Uniform starting points [B, *shape] in [low, high] for seeded chains (the odd counter 2**32 - 1)."""
    count, batch = math.prod(shape), len(seeds)
    width = _chunk_width(batch, count)
    uniforms = _Uniforms(_chain_keys(seeds, torch.full_like(seeds, START)), count, width)
    scratch = torch.empty(batch, width, dtype=torch.float64, device=seeds.device)  # [B, width]
    points = torch.empty(batch, count, dtype=torch.float32, device=seeds.device)  # [B, count]
    for start in range(0, count, width):
        stop = min(start + width, count)
        points[:, start:stop] = uniforms.chunk(start, stop, scratch[:, : stop - start]).mul_(high - low).add_(low)
    return points.reshape(-1, *shape)


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
