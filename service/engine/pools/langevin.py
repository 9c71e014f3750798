"""The chains of one buffer group (an EBM or an ensemble), advanced together one Langevin step at a time."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from service.catalogue.registry import BufferGroup
from service.engine.messages import SampleOrder
from service.engine.pools.base import state_of
from service.engine.pools.chain import ChainPool, probed_step_bytes
from service.engine.scheduler import Job
from service.metrics import Metrics
from training.runtime.draw import chain_labels
from training.sampling.langevin import (
    LangevinStep,
    conditioned_energy,
    draws_noise,
    langevin_step,
    scheduled_step_size,
)
from training.sampling.noise import chain_gaussian, chain_seeds, chain_start
from training.sampling.replay_buffer import ReplayBuffer
from training.sampling.sampler_config import EBMSampler

log = logging.getLogger(__name__)


def step_bytes(module: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
    """What one Langevin step needs a chain besides its state (probed_step_bytes): the energy's gradient, with the
    plain energy; a guided step of a class-conditional energy evaluates twice the chains, so it counts twice."""
    guided = 2 if getattr(module, "num_classes", 0) else 1

    def energy(x: torch.Tensor) -> torch.Tensor:  # [B]
        return conditioned_energy(module, torch.full((len(x),), -1, device=device))(x)

    return probed_step_bytes(energy, shape, device, evaluations=guided)


class LangevinPool(ChainPool):
    """Image-space chains under an energy (or an ensemble's, in turn), started from its prior, its replay
    buffer or a client's image; finished chains may go back into the buffer."""

    buffer_dirty = False  # written back since the last save
    buffer_writes = 0  # write-backs ever: the worker publishes the buffers' figures when their sum changes
    buffer_note: str | None = None  # why its buffer holds fewer slots than the model asks for (the buffer budget)
    sampler: EBMSampler

    def __init__(
        self,
        group: BufferGroup,
        buffer: ReplayBuffer,
        chain_budget: int,
        device: torch.device,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(group.name, chain_budget, device, metrics, clock)
        self.group = group
        self.buffer = buffer
        self.modules = [member.module for member in group.members]
        self.names = [member.name for member in group.members]
        self.shape = group.members[0].shape
        self.data_range = group.members[0].data_range
        self.sampler = group.members[0].sampler_as(EBMSampler)
        self.state_values = self.image_values = math.prod(self.shape)
        self.probe_step_bytes(lambda: max(step_bytes(module, self.shape, device) for module in self.modules))

    def member_indices(self, order: SampleOrder) -> list[int]:
        return [self.names.index(member.name) for member in order.model.members]

    def _start(self, job: Job) -> None:
        state, order = state_of(job), state_of(job).order
        state.seeds = chain_seeds(order.seed, order.n)
        asked = None if order.label is None else torch.full((order.n,), order.label)
        if order.init == "buffer":
            generator = torch.Generator().manual_seed(order.seed)
            fallback = chain_labels(self.group.members[0], state.seeds, None)
            x, state.slots, labels = self.buffer.start_chains(order.n, generator, asked, fallback)
        else:
            labels = chain_labels(self.group.members[0], state.seeds, asked)
            x = chain_start(state.seeds, self.shape, self.sampler, self.data_range)
            state.slots = torch.full((order.n,), -1)
        state.labels = (torch.full((order.n,), -1) if labels is None else labels).to(self.device)
        if order.start_image is not None:  # init "image"
            image = order.start_image.unsqueeze(0).expand(order.n, *self.shape)
            if order.free_mask is not None:
                state.free = order.free_mask.unsqueeze(0).to(self.device)
                state.known = order.start_image.unsqueeze(0).to(self.device)
                x = torch.where(order.free_mask.unsqueeze(0), x, image)  # masked part starts from noise
            else:
                x = image.clone()  # denoising: every chain starts from the image itself
        state.x = x.to(self.device)
        state.seeds = state.seeds.to(self.device)
        if order.trajectory_every:
            state.keep_frame(0, job.steps, state.x, None)

    def _release(self, job: Job) -> None:
        slots = state_of(job).slots
        if slots is not None:
            self.buffer.release(slots)

    def _advance(self, module_index: int, jobs: list[Job]) -> LangevinStep:
        states = [state_of(job) for job in jobs]  # only their running chains step (stopped ones left the batch)
        sizes = [state.stepping for state in states]

        def batched(values: list[torch.Tensor]) -> torch.Tensor:
            """Per-chain rows of every job as one batch [B, ...] (one job's as they are: no copy)."""
            return values[0] if len(values) == 1 else torch.cat(values)

        x = batched([state.running(state.x) for state in states if state.x is not None])  # [B, *shape]

        def per_chain(value: Callable[[SampleOrder, int], float]) -> float | torch.Tensor:
            """A setting per chain [B], from its request's order and the steps its chains took; one float when
            every chain's is the same (the step multiplies by a scalar: the same values, fewer and cheaper ops)."""
            if len(jobs) == 1:
                return value(states[0].order, jobs[0].done_steps)
            values = [value(state.order, job.done_steps) for job, state in zip(jobs, states, strict=True)]
            if all(each == values[0] for each in values):
                return values[0]
            return torch.cat([torch.full((size,), each) for each, size in zip(values, sizes, strict=True)])

        momentum = per_chain(lambda order, _: order.momentum)
        velocity = None  # [B, *shape] once any chain here uses momentum (zeros: a chain at rest)
        if any(state.order.momentum for state in states):
            parts_at_rest = zip(states, x.split(sizes), strict=True)
            velocity = torch.cat(
                [torch.zeros_like(part) if s.velocity is None else s.running(s.velocity) for s, part in parts_at_rest]
            )
        decay = self.sampler.step_decay
        labels = batched([state.running(state.labels) for state in states if state.labels is not None])  # [B]
        noise = per_chain(lambda order, _: order.noise)
        eps = None  # [B, *shape] drawn unless every chain's noise is 0 (draws_noise: the same bits without it)
        if draws_noise(noise, x):
            seeds = [state.running(state.seeds) for state in states if state.seeds is not None]  # [S] each job's
            # A running chain has taken exactly its job's done steps, so its noise counter is its own.
            steps = [torch.full_like(part, job.done_steps) for job, part in zip(jobs, seeds, strict=True)]
            eps = chain_gaussian(batched(seeds), batched(steps), self.shape).to(self.device)
        moved = langevin_step(
            conditioned_energy(
                self.modules[module_index], labels, per_chain(lambda order, _: order.guidance)
            ),  # served modules are frozen, in eval mode
            x,
            eps,
            step_size=per_chain(lambda order, done: scheduled_step_size(order.step_size, decay, done)),
            noise=noise,
            grad_clip=self.sampler.grad_clip,
            temperature=per_chain(lambda order, _: order.temperature),
            data_range=self.data_range,
            momentum=momentum,
            velocity=velocity,
            clamp=self.sampler.clamp,
            nesterov=self.sampler.nesterov,
        )
        return moved

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(*self.data_range)

    def _worth_keeping(self, order: SampleOrder) -> bool:
        """Whether finished chains go back into the shared buffer.

        Only chains run with the checkpoint's own sampler settings: a client's odd step size or
        temperature must not poison the buffer every other client starts from. Chains started from a
        client's image never enter it (it is the client's data); noise-started chains only once they
        ran the checkpoint's default number of steps.
        """
        sampler = self.sampler
        if not self.group.has_buffer:
            return False
        defaults = (sampler.step_size, sampler.noise, sampler.temperature, sampler.momentum, sampler.guidance)
        if (order.step_size, order.noise, order.temperature, order.momentum, order.guidance) != defaults:
            return False
        if order.tolerance > sampler.tolerance:  # a looser stop than the checkpoint's leaves chains short of it
            return False
        return order.init == "buffer" or (order.init == "noise" and order.steps >= sampler.steps)

    def _finish(self, job: Job) -> None:
        state = state_of(job)
        assert state.x is not None and state.slots is not None
        samples = state.x.detach().clamp(*self.data_range).cpu()
        if self._worth_keeping(state.order):
            classes = None if state.labels is None else state.labels.cpu()
            self.buffer.write_back(state.slots, samples, classes)
            self.buffer_dirty = True
            self.buffer_writes += 1
        else:
            self.buffer.release(state.slots)
        energy = None if state.energy is None else state.energy.cpu()
        self._deliver(job, samples, job.done_steps, energy=energy, chain_steps=state.steps_ran(job.done_steps))
