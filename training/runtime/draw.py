"""Drawing samples from a loaded model, one function per way of sampling; each family (training/families/) draws
through one of them, and the server's pools step the same Langevin, DDLS and ODE updates in batches."""

from __future__ import annotations

import torch
from torch import nn

from training.models.cnf import guided_velocity
from training.models.flows import Flow
from training.runtime.device import chain_precision
from training.runtime.loaded import LoadedModel
from training.sampling.ddls import LatentCallback, LatentEnergy, refine_latents, start_latents
from training.sampling.langevin import StepCallback, ensemble_energy, sample_langevin
from training.sampling.noise import chain_classes, chain_gaussian, chain_gaussian_start, chain_start
from training.sampling.ode import OdeCallback, integrate
from training.sampling.replay_buffer import ReplayBuffer
from training.sampling.sampler_config import EBMSampler, FlowSampler, GANSampler


def latent_energy(model: LoadedModel) -> LatentEnergy:
    """The DDLS energy of a GAN's latent; ValueError saying why when its checkpoint saved no critic."""
    if model.critic is None:
        where = (
            f"put its critic program {model.name}.critic.pt2 beside it"
            if model.exported
            else "serve a checkpoint `python -m training gan` wrote (it keeps the critic)"
        )
        raise ValueError(
            f"{model.name} has no critic served with it, so its latents cannot be refined by DDLS "
            f"(Langevin steps on ||z||^2/2 - d(G(z))); ask for steps 0, or {where}"
        )
    return LatentEnergy(model.module, model.critic)


def default_latent_steps(model: LoadedModel) -> int:
    """The DDLS steps a GAN takes when none are asked for: its sampler's, or 0 (the plain pass) when no critic
    came with it (an exported program keeps the sampler of a checkpoint that had one)."""
    return model.sampler_as(GANSampler).steps if model.critic is not None else 0


def sample_generator(
    model: LoadedModel,
    seeds: torch.Tensor,
    temperature: float | None = None,
    steps: int | None = None,
    callback: LatentCallback | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """GAN samples [B, *shape]: G(z) with z ~ N(0, T^2 I) from counter-based noise (the server's latents),
    after `steps` DDLS steps on z (default: the checkpoint's; 0 is the plain pass) computed in `dtype`
    (`chain_precision`; the pass G(z) is float32, as the server's). T and the DDLS step size and noise default
    to the checkpoint's sampler."""
    sampler = model.sampler_as(GANSampler)
    device = next(model.module.parameters()).device
    scale = sampler.temperature if temperature is None else temperature
    steps = default_latent_steps(model) if steps is None else steps
    z = start_latents(seeds, sampler.latent_dim, scale).to(device)
    if steps > 0:
        with chain_precision(device, dtype):
            z = refine_latents(
                latent_energy(model), z, seeds.to(device), steps, sampler.step_size, sampler.noise, scale, callback
            )
    with torch.no_grad():
        return model.module(z)


def cnf_prior(seeds: torch.Tensor, shape: tuple[int, ...], temperature: float | torch.Tensor) -> torch.Tensor:
    """A CNF's starting points x(0) ~ N(0, T^2 I) [B, *shape] (on the CPU) from counter-based noise of each
    seed [B], T one for all or [B] per chain: where `integrate_cnf` and the server's ODE chains both start."""
    scale = torch.as_tensor(temperature, dtype=torch.float32)
    return chain_gaussian_start(seeds, shape) * scale.reshape(-1, *([1] * len(shape)))


@torch.no_grad()
def integrate_cnf(
    field: nn.Module,
    seeds: torch.Tensor,  # [B] chain seeds
    shape: tuple[int, ...],
    sampler: FlowSampler,
    labels: torch.Tensor | None = None,  # [B], -1 = the null label
    temperature: float | torch.Tensor | None = None,  # one for all, or [B] per chain (the server's batches)
    steps: int | None = None,
    callback: OdeCallback | None = None,
) -> torch.Tensor:
    """A CNF's samples [B, *shape] (unclamped): x(0) ~ N(0, T^2 I) from counter-based noise of each seed, then
    the sampler's fixed-step ODE solver (training/sampling/ode.py) on the (guided) field to t = 1."""
    if sampler.solver is None or sampler.steps is None:
        raise ValueError("this flow's sampler declares no ODE solver and steps; it is not a CNF")
    device = next(field.parameters()).device
    start = cnf_prior(seeds, shape, sampler.temperature if temperature is None else temperature).to(device)
    velocity = guided_velocity(field, None if labels is None else labels.to(device), sampler.guidance)
    return integrate(velocity, start, sampler.steps if steps is None else steps, sampler.solver, callback)


def sample_cnf(
    model: LoadedModel,
    seeds: torch.Tensor,
    temperature: float | None = None,
    steps: int | None = None,
    labels: torch.Tensor | None = None,
    callback: OdeCallback | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A CNF's samples [B, *shape] in the data range: the ODE from its Gaussian prior at temperature T, `steps`
    solver steps (default: the checkpoint's) computed in `dtype`, each chain of its label or seeded class."""
    model.check_labels(labels)
    labels = chain_labels(model, seeds, labels)
    with chain_precision(next(model.module.parameters()).device, dtype):
        x = integrate_cnf(
            model.module, seeds, model.shape, model.sampler_as(FlowSampler), labels, temperature, steps, callback
        )
    return x.clamp(*model.data_range)


def sample_flow(model: LoadedModel, seeds: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """Flow samples [B, *shape] in the data range: the inverse of the module's own base at temperature T, one
    float32 pass, as the server's."""
    flow = model.module
    assert isinstance(flow, Flow)  # a CNF's field is sampled by `sample_cnf`
    device = next(flow.parameters()).device
    scale = model.sampler_as(FlowSampler).temperature if temperature is None else temperature
    with torch.no_grad():
        return flow.inverse(flow.base_sample(seeds, scale).to(device))[0].clamp(*model.data_range)


def buffer_capacity(members: list[LoadedModel]) -> int:
    """The replay-buffer slots an EBM (or ensemble) asks for: its sampler's `buffer_capacity`, else the largest
    buffer its checkpoints saved, or all their samples if more (an exported energy's: its sidecar's, or
    families/energy.py REPLAY_CAPACITY)."""
    wanted = members[0].sampler_as(EBMSampler).buffer_capacity
    states = [member.extras["replay_buffer"] for member in members if member.has_replay_buffer]
    saved = max([int(state["capacity"]) for state in states], default=8192)
    return wanted or max(saved, sum(len(state["samples"]) for state in states))


def pooled_buffer(
    members: list[LoadedModel], capacity: int | None = None, dtype: torch.dtype = torch.float32
) -> ReplayBuffer:
    """The members' saved replay buffers as one (empty when none was saved): an ensemble's shared buffer;
    with `capacity`, thinned evenly to it, held in `dtype`."""
    states = [member.extras["replay_buffer"] for member in members if member.has_replay_buffer]
    restart = members[0].sampler_as(EBMSampler).restart_prob
    return ReplayBuffer.pooled(states, members[0].shape, restart, members[0].data_range, capacity, dtype)


def chain_labels(model: LoadedModel, seeds: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """The class each chain samples [B]: the asked-for labels, or for a conditional energy asked for none
    a class drawn from each chain's seed when its sampler says `unlabelled: random` (else the null label).
    The same for a conditional energy and a conditional CNF."""
    unlabelled = getattr(model.sampler, "unlabelled", "null")  # a GAN's sampler has no such setting
    if labels is not None or model.classes is None or unlabelled != "random":
        return labels
    return chain_classes(seeds, len(model.classes))


def sample_ebm(
    members: list[LoadedModel],
    seeds: torch.Tensor,
    steps: int | None = None,
    init: str | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    labels: torch.Tensor | None = None,
    buffer: ReplayBuffer | None = None,
    chain_steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one chain per seed [B] for `steps` (default: the checkpoint's; with its tolerance, the most each
    chain runs, `chain_steps` [B] filled with what each ran), from the checkpoint's prior
    ('noise') or a replay buffer ('buffer': `buffer`, else the members' pooled ones), with counter-based
    noise: seeded chains follow the path they follow in the server. `labels` [B] condition a
    class-conditional energy."""
    first = members[0]
    first.check_labels(labels)
    sampler = first.sampler_as(EBMSampler)
    device = next(first.module.parameters()).device
    init = init or sampler.init
    if init == "buffer":
        buffer = pooled_buffer(members) if buffer is None else buffer
        if len(buffer) == 0:
            raise ValueError(f"{first.name} has no saved replay buffer; use init='noise'")
        start, _, labels = buffer.start_chains(len(seeds), generator, labels, chain_labels(first, seeds, None))
    elif init == "noise":
        labels = chain_labels(first, seeds, labels)
        start = chain_start(seeds, first.shape, sampler, first.data_range)
    else:
        raise ValueError(f"init must be 'noise' or 'buffer', got {init!r}")

    def noise(step: int, x: torch.Tensor) -> torch.Tensor:
        return chain_gaussian(seeds, torch.full_like(seeds, step), first.shape).to(x.device)

    if labels is not None:
        labels = labels.to(device)
    energy = ensemble_energy([member.module for member in members], labels, sampler.guidance)
    return sample_langevin(energy, start.to(device), sampler, first.data_range, noise, callback, steps, chain_steps)
