"""Training objectives as plain functions of model outputs."""

from __future__ import annotations

import torch


def contrastive_divergence(energy_real: torch.Tensor, energy_fake: torch.Tensor,
                           alpha: float) -> tuple[torch.Tensor, dict[str, float]]:
    """mean E(real) - mean E(fake) + alpha * mean(E(real)^2 + E(fake)^2) (Du & Mordatch 2019, eq. 4).

    The squared-energy term keeps energies near zero so the contrastive term cannot run away.
    """
    divergence = energy_real.mean() - energy_fake.mean()
    regularizer = alpha * (energy_real.pow(2).mean() + energy_fake.pow(2).mean())
    loss = divergence + regularizer
    return loss, {
        "loss": loss.item(),
        "cd": divergence.item(),
        "reg": regularizer.item(),
        "e_real": energy_real.mean().item(),
        "e_fake": energy_fake.mean().item(),
    }
