"""One-shot samplers, GAN generators and the inverses of exact-inverse flows: requests for one model that
arrive within the scheduler's batching window run as one batch. Latents come from counter-based noise
(training/noise.py), so a seeded request gets the same images whatever shares its batch, and the same as the
CLI's. A CNF is no one-shot sampler: its ODE chains step in service/engine/pools/ode.py."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from service.catalogue.registry import ServedModel
from service.engine.messages import ChainDiverged, SampleOrder
from service.engine.pools.base import SamplerPool, evenly_spaced, state_of
from service.engine.scheduler import Job
from service.metrics import Metrics
from training.sampling.noise import chain_seeds

log = logging.getLogger(__name__)


class GeneratorPool(SamplerPool):
    def __init__(
        self,
        model: ServedModel,
        chain_budget: int,
        window_s: float,
        device: torch.device,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(model.name, chain_budget, device, metrics, clock, window_s)
        self.module = model.members[0].module
        self.data_range = model.members[0].data_range
        self.member, self.family = model.members[0], model.kind  # how its family draws in one pass

    def job_steps(self, order: SampleOrder) -> int:
        return 1  # one pass of the generator or the flow's inverse

    def _decode(
        self, seeds: torch.Tensor, scale: torch.Tensor, keep_states: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """Images [B, *shape] (unclamped) from seeds [B] at temperatures [B, 1], the inverse's intermediate
        states if asked for (flows), and bits/dim (flows, from the same inverse pass)."""
        return self.family.one_pass(self.member, self.module, seeds, scale, self.device, keep_states)

    def step(self) -> None:
        """Run every admitted request through the generator in one batch.

        Requests that want a trajectory decode apart, so an iterative inverse (i-ResNet) keeps its
        iterates for those samples only.
        """
        plan = self.scheduler.schedule()
        self._admit(plan.admitted, plan.dropped)
        stepped = []
        for wants_frames in (False, True):
            jobs = [job for job in plan.running if bool(state_of(job).order.trajectory_every) == wants_frames]
            if not jobs:
                continue
            stepped += self._run_isolated(jobs, wants_frames)
        self.scheduler.update_from_output(stepped)

    def _run_isolated(self, jobs: list[Job], keep_states: bool) -> list[Job]:
        """Run one batch; when it raises, run each request alone, so only one that fails by itself is
        answered with the failure (as the Langevin pool isolates its chains). Returns the jobs answered
        with their samples."""
        try:
            return self._run_batch(jobs, keep_states)
        except Exception as error:  # one failed batch must not take the worker down
            if len(jobs) > 1:
                log.warning("generator batch of %d requests failed on %s; running each alone", len(jobs), self.name)
                return [job for one in jobs for job in self._run_isolated([one], keep_states)]
            log.exception("generator batch of 1 request failed on %s", self.name)
            self.fail(jobs, error)
            return []

    def _run_batch(self, jobs: list[Job], keep_states: bool) -> list[Job]:
        """Decode one batch and answer its requests; returns those answered with their samples.

        A request whose images (or, streamed, any state of its inverse) are not all finite ends alone with
        ChainDiverged, a 422, as diverged Langevin chains do: clamped, NaN would be sent as black pixels
        and inf as white ones, an image of nothing.
        """
        orders = [state_of(job).order for job in jobs]
        seeds = torch.cat([chain_seeds(order.seed, order.n) for order in orders])
        scale = torch.cat([torch.full((order.n, 1), order.temperature) for order in orders])
        with torch.no_grad():
            images, states, bits = self._decode(seeds, scale, keep_states)
        self._record_step(len(jobs), len(seeds))
        low, high = self.data_range
        sizes = [order.n for order in orders]
        bit_parts = bits.cpu().split(sizes) if bits is not None else [None] * len(sizes)
        trajectory = (states or [images]) if keep_states else []
        finite = torch.stack([torch.isfinite(x.flatten(1)).all(1) for x in [images, *trajectory]]).all(0)  # [B]
        job_finite = [bool(part.all()) for part in finite.cpu().split(sizes)]  # one device sync per batch
        offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
        parts = zip(jobs, images.clamp(low, high).cpu().split(sizes), bit_parts, job_finite, strict=True)
        answered = []
        for index, (job, samples, part_bits, ok) in enumerate(parts):
            state = state_of(job)
            if not ok:
                self.end([job], self._not_finite(state.order))
                continue
            for frame, states_of_all in evenly_spaced(trajectory, state.order.max_frames):
                mine = states_of_all[offsets[index] : offsets[index + 1]].clamp(low, high)
                state.keep_frame(frame, len(trajectory), mine, None)
            # A flow's trajectory "steps" are the states of its inverse; otherwise one pass.
            self._deliver(job, samples, len(trajectory) or 1, bits_per_dim=part_bits)
            answered.append(job)
        return answered

    def _not_finite(self, order: SampleOrder) -> ChainDiverged:
        kind = self.family.one_pass_name
        log.warning("%s made non-finite images at temperature %g; answered 422", self.name, order.temperature)
        return ChainDiverged(
            f"{self.name}'s {kind} made images that are not finite (NaN or inf) at temperature "
            f"{order.temperature:g}: there is no image to send; a lower temperature may help, and if every "
            f"temperature fails the checkpoint's weights are broken"
        )
