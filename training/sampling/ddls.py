"""Discriminator Driven Latent Sampling (Che et al. 2020, "Your GAN is Secretly an Energy-based Model").

A GAN's generator G and critic logit d define an energy on the latent, E(z) = ||z||^2 / 2 - d(G(z)): the
Gaussian prior reweighted by what the critic believes of G(z). Langevin dynamics on E moves latents where
the critic sees data; the samples are G(z). The step is the project's one `langevin_step`, on latents
instead of images (no clipping, no clamping), with counter-based noise, so a seeded chain takes the same
path in `python -m training sample` and in the server, alone or batched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from training.sampling.langevin import LangevinStep, Setting, draws_noise, langevin_step
from training.sampling.noise import chain_gaussian, latent_gaussian

LatentCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, z [B, latent], energy [B])


class LatentEnergy(nn.Module):
    """E(z) = ||z||^2 / 2 - d(G(z)), z [B, latent] -> [B]; d is the critic's logit (DCGAN) or value (WGAN)."""

    def __init__(self, generator: nn.Module, critic: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.critic = critic

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 * z.pow(2).sum(1) - self.critic(self.generator(z))


def start_latents(seeds: torch.Tensor, latent_dim: int, temperature: Setting) -> torch.Tensor:
    """Where a seeded chain starts, z ~ N(0, T^2 I) [B, latent]: the latent of the plain generator pass, so 0
    steps gives exactly the plain sample. `temperature` is a scalar or one value per chain [B]."""
    scale = temperature.reshape(-1, 1) if isinstance(temperature, torch.Tensor) else temperature
    return latent_gaussian(seeds, latent_dim) * scale


def latent_step(
    energy: LatentEnergy,
    z: torch.Tensor,  # [B, latent]
    seeds: torch.Tensor,  # [B]
    done_steps: torch.Tensor,  # [B] steps each chain has taken
    step_size: Setting,
    noise: Setting,
    temperature: Setting,
) -> LangevinStep:
    """One DDLS step for chains that may be at different steps with different settings.

    Step s draws its noise at counter s + 1: counter 0 is the one the starting latent was drawn at.
    """
    eps = chain_gaussian(seeds, done_steps + 1, tuple(z.shape[1:])).to(z.device) if draws_noise(noise, z) else None
    return langevin_step(
        energy, z, eps, step_size=step_size, noise=noise, grad_clip=None, temperature=temperature, clamp=False
    )


def refine_latents(
    energy: LatentEnergy,
    z: torch.Tensor,
    seeds: torch.Tensor,
    steps: int,
    step_size: float,
    noise: float,
    temperature: float,
    callback: LatentCallback | None = None,
) -> torch.Tensor:
    """`steps` DDLS steps from z [B, latent]; the refined latents [B, latent]."""
    for step in range(steps):
        done = torch.full_like(seeds, step)
        moved = latent_step(energy, z, seeds, done, step_size, noise, temperature)
        z = moved.x
        if callback is not None:
            callback(step + 1, z, moved.energy)
    return z
