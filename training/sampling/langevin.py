"""Langevin dynamics on an energy (the replay buffer chains restart from is in replay_buffer.py).

`langevin_step` is the only Langevin update in the project: training draws its negative samples
with it and the server advances its batched chains with it. Step size, noise, temperature and momentum
may be per-chain tensors, so chains with different settings share one batch and each moves exactly as
it would alone.
"""

from __future__ import annotations

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
    energy: torch.Tensor  # [B] where the gradient was taken: the noised state (with nesterov, its look-ahead)
    velocity: torch.Tensor | None  # [B, *shape]; feed it back as `velocity` for the chain's next step (None: at rest)


def _per_chain(value: Setting, x: torch.Tensor) -> Setting:
    """Broadcast a scalar or a [B] tensor of settings against x [B, ...]."""
    if isinstance(value, torch.Tensor):
        return value.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return value


def draws_noise(noise: Setting, x: torch.Tensor) -> bool:
    """Whether a step at `noise` needs its noise drawn: False (pass eps None) when every chain's noise is 0 and x
    [B, *shape] holds no -0.0, where x + 0 * eps is x bit for bit (0 * eps is +0.0 or -0.0 with eps's sign, and
    only -0.0 + +0.0 comes out other than it went in). Equilibrium Matching samples at noise 0; at 64 MNIST
    chains the counter-based draw costs more than a small energy's whole step."""
    if bool(noise.any()) if isinstance(noise, torch.Tensor) else noise != 0:
        return True
    width = _SAME_WIDTH.get(x.dtype)
    if width is None or x.numel() == 0:
        return bool(((x == 0) & x.signbit()).any())
    # -0.0 is the sign bit alone: read as an integer of its width it is that integer's minimum, and no other value
    # is (one reduction, where the comparisons and their `and` cost several operators a step).
    return int(x.view(width).min()) == torch.iinfo(width).min


_SAME_WIDTH = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def langevin_step(
    energy_fn: EnergyFn,
    x: torch.Tensor,  # [B, *shape]
    eps: torch.Tensor | None,  # [B, *shape] standard normal; None: a noise-free step (see `draws_noise`)
    step_size: Setting,
    noise: Setting,
    grad_clip: float | None = 0.03,
    temperature: Setting = 1.0,
    data_range: tuple[float, float] = (-1.0, 1.0),
    momentum: Setting = 0.0,
    velocity: torch.Tensor | None = None,  # [B, *shape] from the previous step; None: at rest
    clamp: bool = True,
    nesterov: bool = False,
) -> LangevinStep:
    """x' = clamp(x + noise * eps); v <- momentum * v - step * clip(grad E(x') / T); x <- clamp(x' + v).

    The order (noise, gradient, clamp) follows Du & Mordatch 2019 and the UvA tutorial; momentum 0 is
    their plain step, and noise 0 is plain gradient descent. The gradient is taken with
    `torch.autograd.grad` w.r.t. the input only, so no parameter gradients are touched. With
    `clamp=False` chains may leave the data range (the caller clamps what it returns). With `nesterov` the
    gradient is taken at the look-ahead x' + momentum * v instead of x' (Nesterov 1983, in the form of Sutskever
    et al. 2013; Equilibrium Matching samples with it); at rest, or at momentum 0, it is the plain step.

    Settings a step does not use cost it nothing, with the same bits out: no noise term when `eps` is None (the
    caller checked `draws_noise`), no division at temperature 1, and at momentum 0 from rest no velocity is kept
    (`velocity` comes back None: the chain is at rest again) and x' - push is x' + (-push) to the bit.
    """
    low, high = data_range
    if eps is None:  # x + 0 * eps is x, bit for bit, where x holds no -0.0 (draws_noise)
        noised = x.clamp(low, high) if clamp else x
    else:
        noised = x + _per_chain(noise, x) * eps
        if clamp:
            noised = noised.clamp_(low, high)
    noised = noised.detach()
    probe = noised if not nesterov or velocity is None else noised + _per_chain(momentum, x) * velocity
    probe = probe.detach().requires_grad_(True)  # a leaf of its own: `noised` stays out of the graph
    with torch.enable_grad():
        energy = energy_fn(probe)  # [B]
        # The backward pass outside autocast: a checkpoint's ops recorded under it keep the dtypes they ran in
        # (its bfloat16 samples are the same bit for bit), while an exported program, run in its traced float32,
        # is differentiated in float32 too (autocast re-casts the matrix products of a backward run inside it:
        # an exported dcgan_mnist's DDLS samples were 0.03 from its checkpoint's float32 ones at 20 steps).
        if torch.is_autocast_enabled(probe.device.type):
            with torch.autocast(probe.device.type, enabled=False):
                (grad,) = torch.autograd.grad(energy.sum(), probe)
        else:  # nothing to turn off (float32 steps): autocast's context costs more than a small step's gradient
            (grad,) = torch.autograd.grad(energy.sum(), probe)
    if isinstance(temperature, torch.Tensor) or temperature != 1.0:
        grad = grad / _per_chain(temperature, x)
    if grad_clip is not None:
        grad = grad.clamp(-grad_clip, grad_clip)
    push = _per_chain(step_size, x) * grad
    if velocity is None:
        moved = noised - push  # noised + (-push): IEEE subtraction is the addition of the negation
        velocity = None if isinstance(momentum, float | int) and momentum == 0 else -push
    else:
        velocity = _per_chain(momentum, x) * velocity - push
        moved = noised + velocity
    if clamp:
        moved = moved.clamp_(low, high)
    return LangevinStep(moved, energy.detach().to(x.dtype), velocity)  # under autocast the energy may be bfloat16


def scheduled_step_size(step_size: float, step_decay: float, step: int) -> float:
    """The step size of a chain's step `step` (from 0): larger steps first when `step_decay` < 1. Computed in
    Python floats per chain, so the CLI's loop and the server's batch (chains at different steps) agree."""
    return step_size if step_decay == 1.0 else step_size * step_decay**step


def chain_moves(before: torch.Tensor, after: torch.Tensor, free: torch.Tensor | None = None) -> torch.Tensor:
    """Each chain's RMS move in one step [B], sqrt(mean((x_{t+1} - x_t)^2)), between the states the chain holds
    (after clamping); with `free` [1 or B, *shape] (inpainting) the mean is over the free pixels only."""
    squared = (after - before).square()
    if free is None:
        return squared.flatten(1).mean(1).sqrt()
    weight = free.to(squared.dtype).expand_as(squared).flatten(1)
    return ((squared.flatten(1) * weight).sum(1) / weight.sum(1).clamp(min=1)).sqrt()


def arrived(
    before: torch.Tensor, after: torch.Tensor, tolerance: float, free: torch.Tensor | None = None
) -> torch.Tensor:
    """Which chains [B] bool have arrived: their RMS move in this step fell below `tolerance` (0: none ever
    does, so chains run their fixed steps). The one rule for the CLI's loop and the server's pools."""
    if tolerance <= 0:
        return torch.zeros(before.shape[0], dtype=torch.bool, device=before.device)
    return chain_moves(before, after, free) < tolerance


class EnsembleEnergy:
    """The energy of chains that may leave the batch: step t moves under member t mod K (IGEBM's ensemble
    sampling, the server's rule per chain), at the labels of the chains still running."""

    def __init__(self, models: list[nn.Module], labels: torch.Tensor | None = None, guidance: Setting = 1.0) -> None:
        self.models, self.labels, self.guidance = models, labels, guidance

    def at(self, step: int, chains: torch.Tensor | None = None) -> EnergyFn:
        """The energy of the chains at indices `chains` [R] (None: all) for step `step` (0-based)."""
        labels = self.labels if chains is None or self.labels is None else self.labels[chains]
        guidance = self.guidance
        if chains is not None and isinstance(guidance, torch.Tensor):
            guidance = guidance[chains]
        return frozen_energy(self.models[step % len(self.models)], labels, guidance)


def sample_langevin(
    energy_fn: EnergyFn | EnsembleEnergy,
    x: torch.Tensor,
    settings: EBMSampler,
    data_range: tuple[float, float],
    noise: NoiseFn | torch.Generator | None = None,
    callback: StepCallback | None = None,
    steps: int | None = None,
    chain_steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `steps` (default `settings.steps`) Langevin steps from x; `callback(step, x, energy)` sees each.

    `noise` is a generator for torch.randn (training) or a function of (step, x) (counter-based noise, so
    seeded chains match the server's). Without clamping, the returned states are clamped to the data range.
    With `settings.tolerance` > 0 a chain stops once it has `arrived` and `steps` is the most it runs: an
    `EnsembleEnergy` then steps only the running chains (a plain energy is evaluated on all, stopped ones
    kept). `chain_steps` [B] int64, when given, is filled with the steps each chain ran.
    """
    x = x.detach()
    velocity = None
    running: torch.Tensor | None = None  # [R] indices of the chains still moving; None: all of them
    taken = torch.zeros(x.shape[0], dtype=torch.int64)
    energy = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for step in range(settings.steps if steps is None else steps):
        eps: torch.Tensor | None
        if callable(noise):  # counter-based: a noise-free step may skip the draw (a generator's stream may not)
            eps = noise(step, x) if draws_noise(settings.noise, x) else None
        else:
            source_device = noise.device if noise is not None else x.device
            eps = torch.randn(x.shape, generator=noise, device=source_device, dtype=x.dtype).to(x.device)
        subset = running is not None and isinstance(energy_fn, EnsembleEnergy)
        chosen = running if subset else None
        step_energy = energy_fn.at(step, chosen) if isinstance(energy_fn, EnsembleEnergy) else energy_fn
        before = x if chosen is None else x[chosen]
        moved = langevin_step(
            step_energy,
            before,
            eps if chosen is None or eps is None else eps[chosen],
            scheduled_step_size(settings.step_size, settings.step_decay, step),
            settings.noise,
            settings.grad_clip,
            settings.temperature,
            data_range,
            settings.momentum,
            (velocity if chosen is None else velocity[chosen]) if settings.momentum and velocity is not None else None,
            settings.clamp,
            settings.nesterov,
        )
        if running is None:
            previous, x, velocity, energy = x, moved.x, moved.velocity, moved.energy
            taken += 1
        else:
            part = slice(None) if chosen is not None else running  # the running chains' rows of `moved`
            previous = before[part]
            x, energy = x.clone(), energy.clone()
            x[running], energy[running] = moved.x[part], moved.energy[part]
            if velocity is not None and moved.velocity is not None:  # momentum: both carry the chains' velocities
                velocity = velocity.clone()
                velocity[running] = moved.velocity[part]
            taken[running.cpu()] += 1
        if settings.tolerance > 0:
            moving = torch.arange(x.shape[0], device=x.device) if running is None else running
            running = moving[~arrived(previous, x[moving], settings.tolerance)]
        if callback is not None:
            callback(step + 1, x, energy)
        if running is not None and len(running) == 0:
            break
    if chain_steps is not None:
        chain_steps.copy_(taken)
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


def ensemble_energy(
    models: list[nn.Module], labels: torch.Tensor | None = None, guidance: Setting = 1.0
) -> EnsembleEnergy:
    """IGEBM's ensemble sampling for chains that start together: step t moves under member t mod K.
    (The server applies the same rule per chain, since its chains join a batch at different steps.)"""
    return EnsembleEnergy(models, labels, guidance)
