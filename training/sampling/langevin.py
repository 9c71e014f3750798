"""Langevin dynamics on an energy (the replay buffer chains restart from is in replay_buffer.py).

`langevin_step` is the only Langevin update in the project: training draws its negative samples
with it and the server advances its batched chains with it. Step size, noise, temperature and momentum
may be per-chain tensors, so chains with different settings share one batch and each moves exactly as
it would alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from training.sampling.sampler_config import EBMSampler

EnergyFn = Callable[[torch.Tensor], torch.Tensor]  # [B, *shape] -> [B]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, x, energy)
NoiseFn = Callable[[int, torch.Tensor], torch.Tensor]  # (step, x [B, *shape]) -> standard normal [B, *shape]
Setting = float | torch.Tensor  # a scalar for the whole batch, or one value per chain [B]


@dataclass
class LangevinStep:
    """What one step returns: the new states, the energy the step evaluated, and the heavy-ball velocity."""

    x: torch.Tensor  # [B, *shape]
    energy: torch.Tensor  # [B] at the noised state
    velocity: torch.Tensor  # [B, *shape]; feed it back as `velocity` for the chain's next step


def _per_chain(value: Setting, x: torch.Tensor) -> Setting:
    """Broadcast a scalar or a [B] tensor of settings against x [B, ...]."""
    if isinstance(value, torch.Tensor):
        return value.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return value


def langevin_step(
    energy_fn: EnergyFn,
    x: torch.Tensor,  # [B, *shape]
    eps: torch.Tensor,  # [B, *shape] standard normal
    step_size: Setting,
    noise: Setting,
    grad_clip: float | None = 0.03,
    temperature: Setting = 1.0,
    data_range: tuple[float, float] = (-1.0, 1.0),
    momentum: Setting = 0.0,
    velocity: torch.Tensor | None = None,  # [B, *shape] from the previous step; None: at rest
    clamp: bool = True,
) -> LangevinStep:
    """x' = clamp(x + noise * eps); v <- momentum * v - step * clip(grad E(x') / T); x <- clamp(x' + v).

    The order (noise, gradient, clamp) follows Du & Mordatch 2019 and the UvA tutorial; momentum 0 is
    their plain step, and noise 0 is plain gradient descent. The gradient is taken with
    `torch.autograd.grad` w.r.t. the input only, so no parameter gradients are touched. With
    `clamp=False` chains may leave the data range (the caller clamps what it returns).
    """
    low, high = data_range
    noised = x + _per_chain(noise, x) * eps
    if clamp:
        noised = noised.clamp_(low, high)
    noised = noised.detach().requires_grad_(True)
    with torch.enable_grad():
        energy = energy_fn(noised)  # [B]
        (grad,) = torch.autograd.grad(energy.sum(), noised)
    grad = grad / _per_chain(temperature, x)
    if grad_clip is not None:
        grad = grad.clamp(-grad_clip, grad_clip)
    push = _per_chain(step_size, x) * grad
    velocity = -push if velocity is None else _per_chain(momentum, x) * velocity - push
    moved = noised.detach() + velocity
    if clamp:
        moved = moved.clamp_(low, high)
    return LangevinStep(moved, energy.detach(), velocity)


def sample_langevin(
    energy_fn: EnergyFn,
    x: torch.Tensor,
    settings: EBMSampler,
    data_range: tuple[float, float],
    noise: NoiseFn | torch.Generator | None = None,
    callback: StepCallback | None = None,
    steps: int | None = None,
) -> torch.Tensor:
    """Run `steps` (default `settings.steps`) Langevin steps from x; `callback(step, x, energy)` sees each.

    `noise` is a generator for torch.randn (training) or a function of (step, x) (counter-based noise, so
    seeded chains match the server's). Without clamping, the returned states are clamped to the data range.
    """
    x = x.detach()
    velocity = None
    for step in range(settings.steps if steps is None else steps):
        if callable(noise):
            eps = noise(step, x)
        else:
            source_device = noise.device if noise is not None else x.device
            eps = torch.randn(x.shape, generator=noise, device=source_device, dtype=x.dtype).to(x.device)
        moved = langevin_step(
            energy_fn,
            x,
            eps,
            settings.step_size,
            settings.noise,
            settings.grad_clip,
            settings.temperature,
            data_range,
            settings.momentum,
            velocity if settings.momentum else None,
            settings.clamp,
        )
        x, velocity = moved.x, moved.velocity
        if callback is not None:
            callback(step + 1, x, moved.energy)
    return x if settings.clamp else x.clamp(*data_range)


def conditioned_energy(
    model: Callable[..., torch.Tensor], labels: torch.Tensor | None, guidance: Setting = 1.0
) -> EnergyFn:
    """A class-conditional energy (a module with `num_classes` > 0) at `labels` [B] (-1 or None: its null
    label, the unconditional energy); any other energy as it is, labels ignored.

    With `guidance` w != 1 (a scalar or per chain [B]) labelled chains move on the composed energy
    E(x) + w (E(x, y) - E(x)): classifier-free guidance (Ho & Salimans 2022) written as a sum of
    energies, as IGEBM composes them; w > 1 sharpens the class, at one extra forward pass per step.
    """
    if getattr(model, "num_classes", 0) == 0:
        return model
    plain = bool((guidance == 1.0).all()) if isinstance(guidance, torch.Tensor) else guidance == 1.0
    if labels is None or plain:
        return lambda x: model(x, labels)
    weight = guidance.to(labels.device) if isinstance(guidance, torch.Tensor) else torch.full(labels.shape, guidance)

    def guided(x: torch.Tensor) -> torch.Tensor:
        both = model(torch.cat([x, x]), torch.cat([labels, torch.full_like(labels, -1)]))  # [2B]
        labelled, unconditional = both.chunk(2)
        return unconditional + weight.to(x.device, both.dtype) * (labelled - unconditional)

    return guided


def frozen_energy(model: nn.Module, labels: torch.Tensor | None = None, guidance: Setting = 1.0) -> EnergyFn:
    """The model as an energy in eval mode (spectral norm does no power iteration while sampling)."""
    conditioned = conditioned_energy(model, labels, guidance)

    def energy(x: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return conditioned(x)
        finally:
            model.train(was_training)

    return energy


def ensemble_energy(models: list[nn.Module], labels: torch.Tensor | None = None, guidance: Setting = 1.0) -> EnergyFn:
    """IGEBM's ensemble sampling for chains that start together: step t moves under member t mod K.
    (The server applies the same rule per chain, since its chains join a batch at different steps.)"""
    energies = [frozen_energy(model, labels, guidance) for model in models]
    calls = itertools.count()

    def energy(x: torch.Tensor) -> torch.Tensor:
        return energies[next(calls) % len(energies)](x)

    return energy
