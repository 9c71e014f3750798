"""Counter-based noise computed a chunk at a time gives the very numbers whole tensors gave, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from training.sampling import noise
from training.sampling.noise import START, chain_classes, chain_gaussian, chain_seeds, chain_uniform

MASK32 = 0xFFFFFFFF


# The implementation before chunking, kept verbatim as the reference: seeded chains must follow the same paths.
def reference_mix32(x: torch.Tensor) -> torch.Tensor:
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & MASK32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & MASK32
    x = ((x ^ (x >> 16)) * 0x297A2D39) & MASK32
    return x ^ (x >> 16)


def reference_uniform(seeds: torch.Tensor, counters: torch.Tensor, count: int) -> torch.Tensor:
    element = torch.arange(count, device=seeds.device, dtype=torch.int64)
    key = reference_mix32((seeds & MASK32) ^ reference_mix32(((counters & MASK32) + 0x9E3779B9) & MASK32))
    bits = reference_mix32(key.unsqueeze(1) ^ reference_mix32(element + 0x632BE5AB).unsqueeze(0))
    return (bits.to(torch.float64) + 0.5) / 4294967296.0


def reference_gaussian(seeds: torch.Tensor, steps: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape)
    uniform = reference_uniform(seeds, steps * 2, 2 * count)
    radius = torch.sqrt(-2.0 * torch.log(uniform[:, :count]))
    angle = (2.0 * torch.pi) * uniform[:, count:]
    return (radius * torch.cos(angle)).to(torch.float32).reshape(-1, *shape)


def reference_uniform_start(seeds: torch.Tensor, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    uniform = reference_uniform(seeds, torch.full_like(seeds, START), math.prod(shape))
    return (low + (high - low) * uniform).to(torch.float32).reshape(-1, *shape)


SHAPES = [(2,), (1, 28, 28), (3, 32, 32), (4, 17, 9)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_gaussian_noise_is_bit_for_bit_what_it_was(shape: tuple[int, ...], batch: int, monkeypatch) -> None:
    monkeypatch.setattr(noise, "CHUNK_VALUES", 4096)  # many chunks, ragged last one, even on small states
    seeds = chain_seeds(12345, batch)
    steps = torch.arange(batch) * 37 + 1
    assert torch.equal(chain_gaussian(seeds, steps, shape), reference_gaussian(seeds, steps, shape))
    starts = torch.full_like(seeds, START)  # the starting points' counter, near 2**32
    assert torch.equal(chain_gaussian(seeds, starts, shape), reference_gaussian(seeds, starts, shape))
    assert torch.equal(chain_uniform(seeds, shape, -1.0, 1.0), reference_uniform_start(seeds, shape, -1.0, 1.0))


def test_noise_at_the_default_chunk_and_the_largest_seeds_is_unchanged() -> None:
    seeds = torch.tensor([0, 1, MASK32, 2**31, 987654321], dtype=torch.int64)
    steps = torch.tensor([0, 2**31 - 1, 5, 2**20, 7])
    shape = (3, 64, 64)  # wider than one chunk per chain
    assert torch.equal(chain_gaussian(seeds, steps, shape), reference_gaussian(seeds, steps, shape))
    classes = (reference_uniform(seeds, torch.full_like(seeds, noise.CLASS), 1)[:, 0] * 10).long().clamp_(max=9)
    assert torch.equal(chain_classes(seeds, 10), classes)
