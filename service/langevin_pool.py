"""The chains of one buffer group (an EBM or an ensemble), advanced together one Langevin step at a time."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from service.messages import ChainDiverged, SampleOrder
from service.metrics import Metrics
from service.pools import SamplerPool, state_of
from service.registry import BufferGroup
from service.scheduler import Job
from training.langevin import LangevinStep, ReplayBuffer, conditioned_energy, langevin_step
from training.noise import chain_gaussian, chain_seeds, chain_start
from training.sampler_config import EBMSampler
from training.sampling import chain_labels

log = logging.getLogger(__name__)


class LangevinPool(SamplerPool):
    """Continuous batching of Langevin chains; every chain keeps its own settings, seed and velocity."""

    buffer_dirty = False  # written back since the last save

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

    def step(self) -> None:
        """Schedule, execute one Langevin step for every running chain, and hand out what finished."""
        plan = self.scheduler.schedule()
        self._admit(plan.admitted, plan.dropped)
        for job in plan.admitted:
            self._start(job)
        if not plan.running:
            return
        by_module: dict[int, list[Job]] = {}
        for job in plan.running:
            members = state_of(job).member_indices
            by_module.setdefault(members[job.done_steps % len(members)], []).append(job)
        stepped: list[Job] = []
        for module_index, jobs in by_module.items():
            stepped.extend(self._execute(module_index, jobs))
        self._record_step(len(stepped), sum(job.n for job in stepped))
        for job in self.scheduler.update_from_output(stepped):
            self._finish(job)

    def _execute(self, module_index: int, jobs: list[Job]) -> list[Job]:
        """One Langevin step for these jobs' chains in one batch; returns the jobs that stepped.

        Requests are isolated from their neighbours in the batch: when the batch raises, each job is
        stepped alone, so only a request that fails by itself is answered with the failure; a job whose
        chains left the finite numbers ends alone with ChainDiverged (a 422).
        """
        try:
            moved = self._advance(module_index, jobs)
        except Exception as error:  # one failed batch must not take the worker down
            if len(jobs) > 1:
                log.warning("Langevin batch of %d requests failed on %s; stepping each alone", len(jobs), self.name)
                return [job for one in jobs for job in self._execute(module_index, [one])]
            log.exception("Langevin batch of 1 request failed on %s", self.name)
            self.fail(jobs, error)
            return []
        return self._commit(jobs, moved)

    def _advance(self, module_index: int, jobs: list[Job]) -> LangevinStep:
        """The batched step itself; changes no job's state, so a failed batch can be retried job by job."""
        states = [state_of(job) for job in jobs]
        x = torch.cat([state.x for state in states if state.x is not None])  # [B, *shape]
        seeds = torch.cat([state.seeds for state in states if state.seeds is not None])  # [B]
        steps = torch.cat([torch.full((job.n,), job.done_steps, dtype=torch.int64) for job in jobs]).to(self.device)

        def per_chain(value: Callable[[SampleOrder], float]) -> torch.Tensor:
            return torch.cat([torch.full((state.order.n,), value(state.order)) for state in states])

        sizes = [job.n for job in jobs]
        velocity = None  # [B, *shape] once any chain here uses momentum (zeros: a chain at rest)
        if any(state.order.momentum for state in states):
            parts_at_rest = zip(states, x.split(sizes), strict=True)
            velocity = torch.cat(
                [torch.zeros_like(part) if s.velocity is None else s.velocity for s, part in parts_at_rest]
            )
        labels = torch.cat([state.labels for state in states if state.labels is not None])  # [B]; -1: null label
        moved = langevin_step(
            conditioned_energy(
                self.modules[module_index], labels, per_chain(lambda order: order.guidance)
            ),  # served modules are frozen, in eval mode
            x,
            chain_gaussian(seeds, steps, self.shape).to(self.device),
            step_size=per_chain(lambda order: order.step_size),
            noise=per_chain(lambda order: order.noise),
            grad_clip=self.sampler.grad_clip,
            temperature=per_chain(lambda order: order.temperature),
            data_range=self.data_range,
            momentum=per_chain(lambda order: order.momentum),
            velocity=velocity,
            clamp=self.sampler.clamp,
        )
        return moved

    def _commit(self, jobs: list[Job], moved: LangevinStep) -> list[Job]:
        """Hand each job its part of the batched step; end the jobs whose chains went non-finite."""
        sizes = [job.n for job in jobs]
        finite = torch.isfinite(moved.x.flatten(1)).all(1) & torch.isfinite(moved.velocity.flatten(1)).all(1)  # [B]
        job_finite = [bool(part.all()) for part in finite.cpu().split(sizes)]  # one device sync per batch
        parts = zip(jobs, moved.x.split(sizes), moved.energy.split(sizes), moved.velocity.split(sizes), strict=True)
        stepped, diverged = [], []
        for (job, x_part, energy_part, velocity_part), ok in zip(parts, job_finite, strict=True):
            state = state_of(job)
            if not ok:
                diverged.append(job)
                continue
            stepped.append(job)
            if state.free is not None and state.known is not None:
                x_part = torch.where(state.free, x_part, state.known)  # inpainting: known pixels stay
            state.x, state.energy = x_part, energy_part
            state.velocity = velocity_part if state.order.momentum else None
            every = state.order.trajectory_every
            step = job.done_steps + 1
            if every and (step % every == 0 or step == job.steps):
                state.keep_frame(step, job.steps, x_part.clamp(*self.data_range), energy_part)
        for job in diverged:
            self.end([job], self._diverged(job))
        return stepped

    def _diverged(self, job: Job) -> ChainDiverged:
        order, sampler = state_of(job).order, self.sampler
        return ChainDiverged(
            f"the chains diverged at step {job.done_steps + 1} of {job.steps}: their states are no longer finite "
            f"under step_size {order.step_size:g}, noise {order.noise:g}, temperature {order.temperature:g}, "
            f"momentum {order.momentum:g}; try values nearer {self.name}'s defaults (step_size "
            f"{sampler.step_size:g}, noise {sampler.noise:g}, temperature {sampler.temperature:g})"
        )

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
        return order.init == "buffer" or (order.init == "noise" and order.steps >= sampler.steps)

    def _finish(self, job: Job) -> None:
        state = state_of(job)
        assert state.x is not None and state.slots is not None
        samples = state.x.detach().clamp(*self.data_range).cpu()
        if self._worth_keeping(state.order):
            classes = None if state.labels is None else state.labels.cpu()
            self.buffer.write_back(state.slots, samples, classes)
            self.buffer_dirty = True
        else:
            self.buffer.release(state.slots)
        energy = None if state.energy is None else state.energy.cpu()
        self._deliver(job, samples, job.done_steps, energy=energy)
