"""What every pool shares: the per-job state, one failure path, one way to hand out a result.

A pool owns the chains of one buffer group (Langevin, service/engine/pools/langevin.py), of one GAN's latents (DDLS,
service/engine/pools/latent.py) or of one CNF (service/engine/pools/ode.py), or one one-shot sampler
(service/engine/pools/generator.py). The worker thread calls `has_work`, `step` and `fail_all`; the scheduler
decides what each step runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service.engine.messages import (
    CancelledByClient,
    DeadlinePassed,
    Deliver,
    Frame,
    FrameSink,
    Handle,
    Order,
    SampleOrder,
    SampleResult,
    WorkerFailure,
)
from service.engine.scheduler import ChainScheduler, Job
from service.metrics import Metrics
from training.runtime.images import to_uint8

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ChainState:
    """A job's order, where its answer goes, and its tensors while its chains run."""

    order: SampleOrder
    deliver: Deliver
    on_frame: FrameSink | None = None  # streaming: called from the worker thread at every kept frame
    member_indices: list[int] = field(default_factory=lambda: [0])  # modules the chains move under, in turn
    x: torch.Tensor | None = None  # [n, *shape] on the device
    velocity: torch.Tensor | None = None  # [n, *shape] heavy-ball velocity (momentum > 0)
    seeds: torch.Tensor | None = None  # [n] int64 chain seeds
    labels: torch.Tensor | None = None  # [n] class per chain of a conditional energy or CNF (-1: its null label)
    slots: torch.Tensor | None = None  # [n] replay-buffer slots (-1: not from the buffer)
    energy: torch.Tensor | None = None  # [n]
    frames: list[torch.Tensor] = field(default_factory=list)  # kept, not streamed: [n, H, W, C] uint8 pixels
    frame_steps: list[int] = field(default_factory=list)
    known: torch.Tensor | None = None  # [1, *shape] pixels held fixed (inpainting)
    free: torch.Tensor | None = None  # [1, *shape] bool, True where chains move
    prior: torch.Tensor | None = None  # [n, *shape] a CNF chain's x(0): its known pixels' straight path starts there
    moving: torch.Tensor | None = None  # [R] indices of the chains still stepping, on the device; None: all n
    rows: torch.Tensor | None = (
        None  # [S] the chains this step advances (`moving` within the job's window); None: all n
    )
    chain_steps: torch.Tensor | None = None  # [n] int64 on the CPU: steps each chain ran; None: the job's done steps
    stepping: int = 0  # how many chains this step advances (choose_rows)

    def choose_rows(self, window: tuple[int, int] | None) -> int:
        """Set `rows` for a step of the chains in `window` (None: every running chain), and `stepping`: how many
        chains step."""
        assert self.x is not None
        if window is None:
            self.rows = self.moving
        else:
            low, high = window
            within = torch.arange(low, high, device=self.x.device)
            moving = self.moving
            self.rows = within if moving is None else moving[(moving >= low) & (moving < high)]
        self.stepping = self.x.shape[0] if self.rows is None else self.rows.shape[0]  # len(tensor) costs 5 times more
        return self.stepping

    def running(self, values: torch.Tensor) -> torch.Tensor:
        """The rows [S, ...] of per-chain values [n, ...] that this step advances."""
        return values if self.rows is None else values[self.rows]

    def stopped_chains(self) -> list[int]:
        """Indices of the chains that arrived before their last step, in order."""
        if self.moving is None or self.x is None:
            return []
        still = set(self.moving.cpu().tolist())
        return [index for index in range(len(self.x)) if index not in still]

    def steps_ran(self, done_steps: int) -> torch.Tensor:
        """[n] int64: the steps each chain ran, its job having taken `done_steps` (they are counted chain by chain
        only once a step leaves some chains out: until then every chain took every step)."""
        assert self.x is not None
        return self.chain_steps if self.chain_steps is not None else torch.full((len(self.x),), done_steps)

    def keep_frame(self, step: int, steps: int, x: torch.Tensor, energy: torch.Tensor | None) -> None:
        """Images x [n, *shape] in the data range at `step`: streamed as they are, or kept for the answer as the
        8-bit pixels [n, H, W, C] every body renders them from (a quarter of float32's bytes)."""
        if self.on_frame is not None:
            energy_cpu = None if energy is None else energy.detach().cpu()
            self.on_frame(Frame(step, steps, x.detach().cpu(), energy_cpu, self.stopped_chains()))
        else:
            self.frames.append(to_uint8(x, self.order.model.members[0].data_range))
            self.frame_steps.append(step)


def evenly_spaced(frames: list[torch.Tensor], limit: int | None) -> list[tuple[int, torch.Tensor]]:
    """(1-based index, frame) pairs, thinned evenly to at most `limit` and always keeping the last."""
    count = len(frames)
    if limit is None or count <= limit:
        return list(enumerate(frames, start=1))
    picks = sorted({round(position * (count - 1) / (limit - 1)) for position in range(limit)})
    return [(pick + 1, frames[pick]) for pick in picks]


def state_of(job: Job) -> ChainState:
    state: ChainState = job.state
    return state


class SamplerPool:
    """The bookkeeping every family's pool shares; subclasses say how a job starts, steps and finishes."""

    def __init__(
        self,
        name: str,
        chain_budget: int,
        device: torch.device,
        metrics: Metrics,
        clock: Callable[[], float],
        window_s: float | None = None,
    ) -> None:
        self.name = name
        self.device = device
        self.metrics = metrics
        self.clock = clock
        self.scheduler = ChainScheduler(chain_budget, clock, window_s)
        self.stats = {"steps": 0, "chain_steps": 0, "max_jobs_in_step": 0, "max_chains_in_step": 0}
        self.tally = metrics.steps.tally(name)  # what its steps show in /metrics

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def seconds_until_due(self) -> float:
        return self.scheduler.seconds_until_due()

    def make_job(self, order: Order, deliver: Deliver, handle: Handle, on_frame: FrameSink | None) -> Job:
        """The scheduler's view of an order; its tensors live in the job's ChainState."""
        assert isinstance(order, SampleOrder)  # a ScoreOrder goes to a score pool (service/engine/pools/score.py)
        state = ChainState(order, deliver, on_frame, self.member_indices(order))
        return Job(n=order.n, steps=self.job_steps(order), handle=handle, arrived=self.clock(), state=state)

    def job_steps(self, order: SampleOrder) -> int:
        """Steps the scheduler runs the order for: its chains' steps (Langevin or ODE solver) by default."""
        return order.steps

    def member_indices(self, order: SampleOrder) -> list[int]:
        """Which of the pool's modules the order's chains move under, in turn (one, but for ensembles)."""
        return [0]

    def step(self) -> None:
        """Schedule, execute, and hand out what finished."""
        raise NotImplementedError

    def _release(self, job: Job) -> None:
        """Give back what a job holds (buffer slots); nothing by default."""

    def _admit(self, admitted: list[Job], dropped: list[tuple[Job, str]]) -> None:
        for job, reason in dropped:
            self._release(job)
            state_of(job).deliver(DeadlinePassed(reason) if reason == "deadline" else CancelledByClient(reason))
        for job in admitted:
            self.metrics.queue_seconds.labels(self.name).observe(job.admitted_at - job.arrived)

    def fail(self, jobs: list[Job], error: BaseException | str) -> None:
        """The one failure path: stop the jobs, give back what they hold, answer each with WorkerFailure."""
        reason = error if isinstance(error, str) else f"sampling failed on the device: {type(error).__name__}"
        self.end(jobs, WorkerFailure(reason))

    def end(self, jobs: list[Job], outcome: BaseException) -> None:
        """Stop jobs before their last step, give back what they hold, and answer each with `outcome`."""
        self.scheduler.finish(jobs)
        for job in jobs:
            self._release(job)
            state_of(job).deliver(outcome)

    def fail_all(self, error: BaseException | str) -> None:
        """Answer every waiting and running job with an error (a failed pool, or shutting down)."""
        self.fail(self.scheduler.take_all(), error)

    def _deliver(
        self,
        job: Job,
        samples: torch.Tensor,
        steps: int,
        energy: torch.Tensor | None = None,
        bits_per_dim: torch.Tensor | None = None,
        chain_steps: torch.Tensor | None = None,
    ) -> None:
        """Answer a finished job: the one place a SampleResult is assembled (and each chain's steps counted)."""
        state = state_of(job)
        if chain_steps is not None:
            self.metrics.observe_chain_steps(self.name, chain_steps.tolist())
        state.deliver(
            SampleResult(
                samples=samples,
                steps=steps,
                queue_seconds=job.admitted_at - job.arrived,
                run_seconds=self.clock() - job.admitted_at,
                energy=energy,
                bits_per_dim=bits_per_dim,
                frames=state.frames,
                frame_steps=state.frame_steps,
                chain_steps=None if chain_steps is None else chain_steps.tolist(),
            )
        )

    def _record_step(self, jobs: int, chains: int) -> None:
        self.stats["steps"] += 1
        self.stats["chain_steps"] += chains
        self.stats["max_jobs_in_step"] = max(self.stats["max_jobs_in_step"], jobs)
        self.stats["max_chains_in_step"] = max(self.stats["max_chains_in_step"], chains)
        self.tally.step(chains)
