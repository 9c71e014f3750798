"""A GAN's latent chains (DDLS): Langevin steps on E(z) = ||z||^2 / 2 - d(G(z)), batched like image chains.

Every running chain of the GAN takes one step per round, requests join and leave at step boundaries, and a
seeded chain's noise is counter-based, so its path is the one it takes alone and in `python -m training
sample`. Frames and samples are the images G(z); `energy` is E(z). Requests for 0 steps never come here:
the GAN's one-pass pool (service/engine/pools/generator.py) answers those.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from service.catalogue.registry import ServedModel
from service.engine.messages import SampleOrder
from service.engine.pools.base import state_of
from service.engine.pools.chain import ChainPool, probed_step_bytes
from service.engine.scheduler import Job
from service.metrics import Metrics
from training.runtime.draw import latent_energy
from training.sampling.ddls import latent_step, start_latents
from training.sampling.langevin import LangevinStep
from training.sampling.noise import chain_seeds
from training.sampling.sampler_config import GANSampler

LATENT_POOL_SUFFIX = ":ddls"  # a GAN's latent chains run in the pool named after it with this suffix


def latent_pool_name(model: ServedModel) -> str:
    return model.pool + LATENT_POOL_SUFFIX


def pool_name(model: ServedModel, kind: str) -> str:
    """The name of the pool of `kind` (its family's pool kinds) that runs `model`'s requests: a GAN's latent
    chains ("ddls") run in a pool of their own, every other kind in the pool named after the model (an energy's:
    after its buffer group)."""
    return latent_pool_name(model) if kind == "ddls" else model.pool


class LatentPool(ChainPool):
    sampler: GANSampler

    def __init__(
        self,
        model: ServedModel,
        chain_budget: int,
        device: torch.device,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(latent_pool_name(model), chain_budget, device, metrics, clock)
        member = model.members[0]
        self.energy = latent_energy(member)
        self.sampler = member.sampler_as(GANSampler)
        self.data_range = member.data_range
        self.state_values, self.image_values = self.sampler.latent_dim, math.prod(member.shape)
        latent = (self.sampler.latent_dim,)  # a step differentiates d(G(z)) through the generator and the critic
        self.probe_step_bytes(lambda: probed_step_bytes(self.energy, latent, device))

    def _start(self, job: Job) -> None:
        state, order = state_of(job), state_of(job).order
        seeds = chain_seeds(order.seed, order.n)
        state.x = start_latents(seeds, self.sampler.latent_dim, order.temperature).to(self.device)
        state.seeds = seeds.to(self.device)
        if order.trajectory_every:
            state.keep_frame(0, job.steps, self._image(state.x), None)

    def _advance(self, module_index: int, jobs: list[Job]) -> LangevinStep:
        states = [state_of(job) for job in jobs]
        z = torch.cat([state.running(state.x) for state in states if state.x is not None])  # [B, latent]
        seeds = torch.cat([state.running(state.seeds) for state in states if state.seeds is not None])  # [B]
        sizes = [state.stepping for state in states]  # a job's chains this step: a slice of them within the budget
        counts = [torch.full((size,), job.done_steps, dtype=torch.int64) for job, size in zip(jobs, sizes, strict=True)]
        done = torch.cat(counts)  # [B] each chain's step, counted once all of its request's chains took it

        def per_chain(value: Callable[[SampleOrder], float]) -> torch.Tensor:
            return torch.cat([torch.full((size,), value(s.order)) for s, size in zip(states, sizes, strict=True)])

        return latent_step(
            self.energy,
            z,
            seeds,
            done.to(self.device),
            step_size=per_chain(lambda order: order.step_size),
            noise=per_chain(lambda order: order.noise),
            temperature=per_chain(lambda order: order.temperature),
        )

    @torch.no_grad()
    def _image(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy.generator(x).clamp(*self.data_range)

    def _finish(self, job: Job) -> None:
        state = state_of(job)
        assert state.x is not None
        samples = self._image(state.x).cpu()
        energy = None if state.energy is None else state.energy.cpu()
        self._deliver(job, samples, job.done_steps, energy=energy)
