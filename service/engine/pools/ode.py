"""A CNF's chains, advanced one ODE solver step at a time like Langevin chains: continuous batching of flows.

Every chain has its own time t = (steps taken) / (its request's steps) and step dt = 1 / steps, so chains of
requests that arrived at different moments, with different step counts, labels, guidance and prior scales,
share one batched evaluation of the field per step (`ode_step` takes t [B] and dt [B]); requests join and
leave between steps under the scheduler's budgets, and a cancelled request's chains leave at the next step.
Chains start from x(0) ~ N(0, T^2 I) drawn from the counter-based noise `integrate_cnf` draws, and take the
checkpoint's solver, so a seeded chain ends where `python -m training sample` ends it, alone or batched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from service.catalogue.registry import ServedModel
from service.engine.messages import ChainDiverged
from service.engine.pools.base import state_of
from service.engine.pools.chain import ChainPool, probed_step_bytes
from service.engine.scheduler import Job
from service.metrics import Metrics
from training.models.cnf import guided_velocity
from training.runtime.draw import chain_labels, cnf_prior
from training.sampling.noise import chain_seeds
from training.sampling.ode import ode_step
from training.sampling.sampler_config import FlowSampler


@dataclass
class OdeMove:
    """One ODE step's new states; an ODE step evaluates no energy and carries no velocity (a ChainMove)."""

    x: torch.Tensor  # [B, *shape]
    energy: None = None
    velocity: None = None


class OdePool(ChainPool):
    """The chains of one CNF: each takes its request's `steps` solver steps of dx/dt = v(x, t) from t = 0 to 1.

    Inpainting (init "image" with a mask) is the replacement method of diffusion and flow models (Song et al.
    2021, "Score-based generative modeling through SDEs", imputation; RePaint without resampling, Lugmayr et
    al. 2022) on the flow's straight paths: every chain integrates from t = 0, and after each step its known
    pixels are replaced by the state their image would have on the path the field was trained on,
    x_t = (1 - t) x(0) + t image with the chain's own x(0), so at t = 1 they are the image and the free pixels
    were moved by a field that saw them beside it all along.
    """

    sampler: FlowSampler
    exact_steps = True  # a chain stops at t = 1 only; no tolerance applies to an ODE

    def __init__(
        self,
        model: ServedModel,
        chain_budget: int,
        device: torch.device,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(model.name, chain_budget, device, metrics, clock)
        self.loaded = model.members[0]
        self.field = self.loaded.module  # frozen, in eval mode
        self.shape = self.loaded.shape
        self.state_values = self.image_values = math.prod(self.shape)
        self.data_range = self.loaded.data_range
        self.sampler = self.loaded.sampler_as(FlowSampler)
        if self.sampler.solver is None:
            raise ValueError(f"{model.name} is not a CNF: its sampler names no ODE solver")
        self.solver = self.sampler.solver
        self.probe_step_bytes(lambda: probed_step_bytes(self._probed_field, self.shape, device, backward=False))

    def _probed_field(self, x: torch.Tensor) -> torch.Tensor:
        """The field at t = 0 on states x [B, *shape], guided where it can be (its unconditional rows evaluated
        beside the labelled ones: the most a step's batch evaluates): what a step's bytes are probed with."""
        labels = None if self.loaded.classes is None else torch.zeros(len(x), dtype=torch.int64)
        guidance = torch.full((len(x),), 2.0)
        return guided_velocity(self.field, labels, guidance)(x, torch.zeros(len(x), device=x.device))

    def _start(self, job: Job) -> None:
        state, order = state_of(job), state_of(job).order
        seeds = chain_seeds(order.seed, order.n)
        asked = None if order.label is None else torch.full((order.n,), order.label)
        labels = chain_labels(self.loaded, seeds, asked)
        state.labels = torch.full((order.n,), -1) if labels is None else labels  # on the CPU: see _advance
        state.x = cnf_prior(seeds, self.shape, order.temperature).to(self.device)  # [n, *shape] at t = 0
        if order.start_image is not None and order.free_mask is not None:  # inpainting; at t = 0, x_t = x(0)
            state.prior = state.x
            state.free = order.free_mask.unsqueeze(0).to(self.device)
            state.known = order.start_image.unsqueeze(0).to(self.device)
        state.seeds = seeds.to(self.device)
        if order.trajectory_every:
            state.keep_frame(0, job.steps, self._image(state.x), None)

    @torch.no_grad()
    def _advance(self, module_index: int, jobs: list[Job]) -> OdeMove:
        states = [state_of(job) for job in jobs]
        x = torch.cat([state.running(state.x) for state in states if state.x is not None])  # [B, *shape]
        sizes = [state.stepping for state in states]

        def per_chain(value: Callable[[Job], float]) -> torch.Tensor:
            return torch.cat([torch.full((size,), value(job)) for job, size in zip(jobs, sizes, strict=True)])

        # What `integrate` computes for a chain at its step k of K: t = k / K and dt = 1 / K, in float32.
        t = per_chain(lambda job: job.done_steps / job.steps).to(self.device)  # [B]
        dt = per_chain(lambda job: 1.0 / job.steps).to(self.device)  # [B]
        labels = torch.cat([state.running(state.labels) for state in states if state.labels is not None])  # [B]
        guidance = per_chain(lambda job: state_of(job).order.guidance)  # [B] on the CPU
        conditional = self.loaded.classes is not None
        velocity = guided_velocity(self.field, labels if conditional else None, guidance)
        return OdeMove(ode_step(velocity, x, t, dt, self.solver))

    def _hold_known(self, job: Job, x: torch.Tensor) -> torch.Tensor:
        """The known pixels at the straight path's state for this step's new time (see the class docstring)."""
        state = state_of(job)
        assert state.free is not None and state.known is not None and state.prior is not None
        t = (job.done_steps + 1) / job.steps
        return torch.where(state.free, x, (1 - t) * state.running(state.prior) + t * state.known)

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(*self.data_range)

    def _finish(self, job: Job) -> None:
        state = state_of(job)
        assert state.x is not None
        samples = state.x.detach().clamp(*self.data_range).cpu()
        self._deliver(job, samples, job.done_steps, chain_steps=state.steps_ran(job.done_steps))

    def _diverged(self, job: Job) -> ChainDiverged:
        order, sampler = state_of(job).order, self.sampler
        return ChainDiverged(
            f"the chains of {self.name} left the finite numbers by {self.solver} step {job.done_steps + 1} of "
            f"{job.steps} (temperature {order.temperature:g}, guidance {order.guidance:g}); try values nearer its "
            f"defaults (steps {sampler.steps}, temperature {sampler.temperature:g}, guidance {sampler.guidance:g})"
        )
