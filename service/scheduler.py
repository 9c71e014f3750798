"""Which chains advance next: iteration-level (continuous) batching of Langevin chains.

As vLLM schedules tokens, this schedules Langevin steps: every step, all running chains of one pool
advance together; waiting requests join at the next step while the pool's chain budget allows; a
request leaves as soon as its own step count is done. Cancelled and expired requests are dropped at
the next step. No torch here: the executor (service/worker.py) runs what this decides, and tests drive
it with a fake clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Job:
    """One request's chains, as the scheduler sees them; `state` belongs to the executor."""

    n: int  # chains
    steps: int  # Langevin steps each chain must take
    deadline: float  # clock time after which the job is dropped
    arrived: float
    done_steps: int = 0
    admitted_at: float | None = None
    cancelled: bool = False  # set from any thread (client went away); read at the next step
    state: Any = None

    @property
    def finished(self) -> bool:
        return self.done_steps >= self.steps


@dataclass
class StepPlan:
    admitted: list[Job] = field(default_factory=list)  # start these chains before stepping
    running: list[Job] = field(default_factory=list)  # advance these by one step (admitted included)
    dropped: list[tuple[Job, str]] = field(default_factory=list)  # cancelled or past their deadline


class ChainScheduler:
    def __init__(self, chain_budget: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.chain_budget = chain_budget
        self.clock = clock
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []

    @property
    def running_chains(self) -> int:
        return sum(job.n for job in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, job: Job) -> None:
        if job.n > self.chain_budget:
            raise ValueError(f"a request of {job.n} chains can never fit the chain budget of {self.chain_budget}")
        self.waiting.append(job)

    def _drop_reason(self, job: Job, now: float) -> str | None:
        if job.cancelled:
            return "cancelled"
        if now > job.deadline:
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
        """Stop running these jobs (done, or failed in the executor)."""
        leaving = set(map(id, jobs))
        self.running = [job for job in self.running if id(job) not in leaving]
