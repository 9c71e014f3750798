"""Which chains advance next: iteration-level (continuous) batching of Langevin chains, and the batching
window of one-shot samplers.

As vLLM schedules tokens, this schedules Langevin steps: every step, all running chains of one pool
advance together; waiting requests join at the next step while the pool's chain budget allows; a
request leaves as soon as its own step count is done. A one-shot sampler (GAN generator, flow inverse)
takes one step per request; its scheduler has a window: waiting requests run together once the oldest
has waited that long or they fill the budget. Cancelled and expired requests are dropped at the next
step. No torch here: the pools (service/pools.py) run what this decides, and tests drive it with a
fake clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.messages import Handle


@dataclass(eq=False)
class Job:
    """One request's chains, as the scheduler sees them; `state` belongs to the executor."""

    n: int  # chains
    steps: int  # Langevin steps each chain must take
    handle: Handle  # the deadline, and the cancel flag the HTTP side sets from its thread
    arrived: float
    done_steps: int = 0
    admitted_at: float = 0.0  # set when the job starts running
    state: Any = None

    @property
    def finished(self) -> bool:
        return self.done_steps >= self.steps


@dataclass
class StepPlan:
    admitted: list[Job] = field(default_factory=list)  # start these chains before stepping
    running: list[Job] = field(default_factory=list)  # advance these by one step (admitted included)
    dropped: list[tuple[Job, str]] = field(default_factory=list)  # cancelled or past their deadline


IDLE_SECONDS = 0.25  # how long a pool with nothing to do lets the worker sleep


class ChainScheduler:
    def __init__(
        self, chain_budget: int, clock: Callable[[], float] = time.monotonic, window_s: float | None = None
    ) -> None:
        self.chain_budget = chain_budget
        self.clock = clock
        self.window_s = window_s  # None: continuous batching; seconds: a one-shot sampler's batching window
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []

    @property
    def running_chains(self) -> int:
        return sum(job.n for job in self.running)

    def has_work(self) -> bool:
        """Chains to step; for a windowed scheduler, a batch that is due (window over, or budget full)."""
        if self.window_s is None or self.running:
            return bool(self.waiting or self.running)
        if not self.waiting:
            return False
        full = sum(job.n for job in self.waiting) >= self.chain_budget
        return full or self.clock() - self.waiting[0].arrived >= self.window_s

    def seconds_until_due(self) -> float:
        """How long the worker may sleep before this scheduler has work without a new submission."""
        if self.window_s is None or not self.waiting:
            return IDLE_SECONDS
        return max(0.0, self.window_s - (self.clock() - self.waiting[0].arrived))

    def take_all(self) -> list[Job]:
        """Remove and return every waiting and running job (failing a pool, shutting down)."""
        jobs = [*self.waiting, *self.running]
        self.waiting, self.running = deque(), []
        return jobs

    def add(self, job: Job) -> None:
        if job.n > self.chain_budget:
            raise ValueError(f"a request of {job.n} chains can never fit the chain budget of {self.chain_budget}")
        self.waiting.append(job)

    def _drop_reason(self, job: Job, now: float) -> str | None:
        if job.handle.cancelled:
            return "cancelled"
        if now > job.handle.deadline:
            return "deadline"
        return None

    def schedule(self) -> StepPlan:
        """Drop what is cancelled or late, admit waiting jobs first come first served, run the rest."""
        now = self.clock()
        plan = StepPlan()
        kept: list[list[Job]] = []
        for queue in (self.waiting, self.running):
            kept.append([])
            for job in queue:
                reason = self._drop_reason(job, now)
                if reason:
                    plan.dropped.append((job, reason))
                else:
                    kept[-1].append(job)
        # Swapped in whole, so another thread reading len(waiting) never sees a half-filtered queue.
        self.waiting, self.running = deque(kept[0]), kept[1]
        used = self.running_chains
        while self.waiting and used + self.waiting[0].n <= self.chain_budget:
            job = self.waiting.popleft()
            job.admitted_at = now
            used += job.n
            self.running.append(job)
            plan.admitted.append(job)
        plan.running = list(self.running)
        return plan

    def update_from_output(self, stepped: list[Job]) -> list[Job]:
        """Count the step each job took; return (and stop running) the jobs that are now done."""
        done = []
        for job in stepped:
            job.done_steps += 1
            if job.finished:
                done.append(job)
        self.finish(done)
        return done

    def finish(self, jobs: list[Job]) -> None:
        """Stop running these jobs (done, or failed in the pool)."""
        leaving = set(map(id, jobs))
        self.running = [job for job in self.running if id(job) not in leaving]
