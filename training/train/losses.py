"""Training objectives as plain functions of model outputs."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def energy_gap(energy_real: torch.Tensor, energy_fake: torch.Tensor) -> torch.Tensor:
    """mean E(real) - mean E(fake): the contrastive-divergence estimate of the log-likelihood gradient's loss."""
    return energy_real.mean() - energy_fake.mean()


def contrastive_divergence(
    energy_real: torch.Tensor, energy_fake: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """mean E(real) - mean E(fake) + alpha * mean(E(real)^2 + E(fake)^2) (Du & Mordatch 2019, eq. 4).

    The squared-energy term keeps energies near zero so the contrastive term cannot run away.
    """
    divergence = energy_gap(energy_real, energy_fake)
    regularizer = alpha * (energy_real.pow(2).mean() + energy_fake.pow(2).mean())
    loss = divergence + regularizer
    return loss, {
        "loss": loss.item(),
        "cd": divergence.item(),
        "reg": regularizer.item(),
        "e_real": energy_real.mean().item(),
        "e_fake": energy_fake.mean().item(),
    }


# --- GANs (Goodfellow et al. 2014; Arjovsky et al. 2017; Gulrajani et al. 2017) -------------------


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """DCGAN discriminator: binary cross-entropy; one-sided label smoothing puts real targets at 1 - s."""
    real_target = torch.full_like(real_logits, 1.0 - label_smoothing)
    return F.binary_cross_entropy_with_logits(real_logits, real_target) + F.binary_cross_entropy_with_logits(
        fake_logits, torch.zeros_like(fake_logits)
    )


def non_saturating_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)) rather than log(1 - D(G(z))): strong gradients while D wins (Goodfellow et al. 2014)."""
    return F.softplus(-fake_logits).mean()


def wasserstein_critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """The critic maximizes E[f(real)] - E[f(fake)], an estimate of the Wasserstein-1 distance."""
    return fake_scores.mean() - real_scores.mean()


def wasserstein_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    return -fake_scores.mean()


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    weight: float = 10.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """weight * E[(||grad f(x_hat)||_2 - 1)^2] on random interpolates x_hat (Gulrajani et al. 2017)."""
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    mix = torch.rand(shape, generator=generator, device=real.device if generator is None else generator.device)
    mix = mix.to(real.device)
    interpolates = (mix * real.detach() + (1 - mix) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(interpolates).sum(), interpolates, create_graph=True)
    return weight * (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def r1_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma / 2 * E[||grad D(x)||^2] on real data only (Mescheder et al. 2018): keeps the discriminator from
    pushing its gradient up on the data, which is what lets non-saturating GANs converge."""
    inputs = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(inputs).sum(), inputs, create_graph=True)
    return 0.5 * gamma * grad.flatten(1).pow(2).sum(1).mean()


def feature_matching_loss(real_features: torch.Tensor, fake_features: torch.Tensor) -> torch.Tensor:
    """||E f(real) - E f(fake)||^2 on critic features (Salimans et al. 2016), added to the generator loss."""
    return (real_features.detach().mean(0) - fake_features.mean(0)).pow(2).sum()


# --- Equilibrium Matching (Wang & Du 2025) ---------------------------------------------------------


def equilibrium_matching(
    energy_fn: Callable[[torch.Tensor], torch.Tensor],
    data: torch.Tensor,  # [B, *shape] in the data range
    noise: torch.Tensor,  # [B, *shape] standard normal
    gamma: torch.Tensor,  # [B] in [0, 1]: 0 = pure noise, 1 = data
    scale: float = 4.0,
    cutoff: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """mean (grad E(x_g) - (noise - data) c(g))^2 at x_g = g data + (1 - g) noise (EqM-E, explicit energy).

    c(g) = scale * min(1, (1 - g) / cutoff): the target gradient points from data to noise with a size that
    falls to zero on the data, so plain gradient descent on E carries noise to data and stops there. The
    gradient w.r.t. the input is kept in the graph (a double backward), so no MCMC is needed in training.
    """
    g = gamma.reshape(-1, *([1] * (data.dim() - 1)))
    mixed = (g * data + (1 - g) * noise).detach().requires_grad_(True)
    energy = energy_fn(mixed)  # [B]
    (grad,) = torch.autograd.grad(energy.sum(), mixed, create_graph=True)
    target = (noise - data) * (scale * torch.clamp((1 - g) / cutoff, max=1.0))
    loss = (grad.float() - target).pow(2).mean()  # per element, so clipping thresholds do not scale with size
    return loss, {"loss": loss.item(), "energy": energy.mean().item()}


# --- Flow matching for continuous normalizing flows (Lipman et al. 2023; Liu et al. 2023) ---------


def flow_matching(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: torch.Tensor,  # [B, *shape] dequantized, x1
    noise: torch.Tensor,  # [B, *shape] prior samples, x0
    t: torch.Tensor,  # [B] in [0, 1]: 0 = prior, 1 = data
) -> tuple[torch.Tensor, dict[str, float]]:
    """mean ||v(x_t, t) - (x1 - x0)||^2 per element at x_t = (1 - t) x0 + t x1: conditional flow matching on
    straight paths (rectified flow). Its minimizer is the marginal field that carries the prior to the data,
    and one backward per update suffices: no ODE is simulated in training."""
    s = t.reshape(-1, *([1] * (data.dim() - 1)))
    mixed = (1 - s) * noise + s * data
    loss = (velocity_fn(mixed, t).float() - (data - noise)).pow(2).mean()
    return loss, {"loss": loss.item()}


def optimal_transport_pairing(noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """The noise [B, *shape] reordered so noise[i] goes to data[i] under the exact squared-distance assignment
    on the batch (minibatch OT flow matching, Tong et al. 2023): straighter paths than independent pairs."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as error:  # scipy is in the train extra, not the core install
        raise SystemExit('--ot-pairing needs scipy: pip install -e ".[train]"') from error

    cost = torch.cdist(noise.flatten(1).double(), data.flatten(1).double()).pow(2)  # [B, B]
    noise_index, data_index = linear_sum_assignment(cost.cpu().numpy())
    order = torch.empty(len(data), dtype=torch.long)
    order[torch.as_tensor(data_index)] = torch.as_tensor(noise_index)
    return noise[order.to(noise.device)]
