"""Which chains advance next: iteration-level (continuous) batching of Langevin chains, and the batching
window of one-shot samplers.

As vLLM schedules tokens, this schedules Langevin steps: waiting requests join the running ones at the
next step while the pool's chain budget (the chains it holds) allows, first come first served; a request
leaves as soon as its own step count is done, or all its chains stopped (a stopped chain's place goes to
waiting work at once). Which running requests advance in a step is a separate
choice, under the step's batch (the most chains one step advances: the fewest whose cost per chain, measured
lately, under one load, is within NEAR_LEAST of the least, below the `--step-budget` cap; `_batch`), in priority order:
fewest steps left first, each step a request sits out counting as `aging` steps fewer. On a device whose
step cost grows with its chains (a CPU), a short request stepped beside long ones pays for all their chains
every step; so a request is *urgent* when its steps left are within `urgent_ratio` of the length of the
request nearest its end (or when it has sat out that many steps: so none starves), and a step carries only
as many chains of requests that are not urgent as keep its steps, on average, within `max_slowdown` of what
the urgent chains alone would cost, by the step cost the pool measured (`StepCost`: a table of its timed
steps by chain count; until two of its buckets are measured, as many chains as the urgent ones). On a CPU a
short request then runs at about its solo speed while the long ones take turns beside it every few steps;
on a GPU, whose step costs nearly the same for any batch, every running chain comes along. When every
request is urgent (all of similar length) every one that fits the budget advances together, as in plain
continuous batching. A one-shot sampler
(GAN generator, flow inverse) takes one step per request; its scheduler has a window: waiting requests
run together once the oldest has waited that long or they fill the budget. Cancelled and expired
requests are dropped at the next step. No torch here: the pools (service/engine/pools/base.py) run what this
decides, and tests drive it with a fake clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.catalogue.budgets import DeviceBudget
from service.engine.messages import Handle
from service.engine.step_cost import StepCost, bucket_of


@dataclass(eq=False)
class Job:
    """One request's chains, as the scheduler sees them; `state` belongs to the executor."""

    n: int  # chains
    steps: int  # Langevin steps each chain must take (with a tolerance: the most it may take)
    handle: Handle  # the deadline, and the cancel flag the HTTP side sets from its thread
    arrived: float
    done_steps: int = 0
    admitted_at: float = 0.0  # set when the job starts running
    sat_out: int = 0  # steps this running job has sat out since it last advanced
    stopped: int = 0  # chains that arrived before their last step (the pool says which); they step no more
    held_bytes: int = 0  # what its chains hold on the device between steps (DeviceBudget), from admission to answer
    cursor: int = 0  # sliced (DeviceBudget): the first chain of this step's pass that has not stepped yet
    window: tuple[int, int] | None = None  # the chains [lo, hi) this step advances; None: every running chain
    state: Any = None

    @property
    def running_chains(self) -> int:
        """Chains this job still steps: what it costs a step and holds of the chain budget."""
        return self.n - self.stopped

    @property
    def finished(self) -> bool:
        return self.done_steps >= self.steps or self.stopped >= self.n

    def priority(self, aging: float) -> float:
        """Lower runs first: steps left, less `aging` for every step sat out."""
        return self.steps - self.done_steps - aging * self.sat_out


@dataclass
class StepPlan:
    admitted: list[Job] = field(default_factory=list)  # start these chains before stepping
    running: list[Job] = field(default_factory=list)  # advance these by one step (may leave some running out)
    dropped: list[tuple[Job, str]] = field(default_factory=list)  # cancelled or past their deadline


IDLE_SECONDS = 0.25  # how long a pool with nothing to do lets the worker sleep
URGENT_RATIO = 4.0  # urgent: steps left within this many times the most urgent request's steps
AGING = 16.0  # steps left a running request is credited with for each step it sits out
MAX_SLOWDOWN = 1.25  # a step's cost with the chains that are not urgent, over its cost without them
NEAR_LEAST = 1.1  # a batch within this factor of the least measured cost per chain counts as the least: fewest first
TRUSTED_STEPS = 3  # a bucket beside the chosen batch is measured until its median rests on this many steps
REFRESH_STEPS = 64  # every this many steps, one step measures the bucket below the chosen batch again


class ChainScheduler:
    def __init__(
        self,
        chain_budget: int,
        clock: Callable[[], float] = time.monotonic,
        window_s: float | None = None,
        step_budget: int | None = None,
        urgent_ratio: float = URGENT_RATIO,
        aging: float = AGING,
        max_slowdown: float = MAX_SLOWDOWN,
    ) -> None:
        self.chain_budget = chain_budget  # chains running at once (their state held on the device)
        self.step_budget = step_budget or chain_budget  # the most chains one step advances (--step-budget)
        self.batch = self.step_budget  # what the measured cost chose for the latest step (at most step_budget)
        self.planned = 0  # steps planned: every REFRESH_STEPS-th (and the next) measure the bucket below the batch
        self.probing = False  # the latest batch measures a neighbouring bucket: companions fill it, not past it
        self.urgent_ratio = urgent_ratio
        self.aging = aging
        self.max_slowdown = max_slowdown
        self.cost = StepCost()  # the pool times its steps into it
        self.credit = 0.0  # seconds of slack the urgent chains' steps earned for companions, not yet spent
        self.clock = clock
        self.window_s = window_s  # None: continuous batching; seconds: a one-shot sampler's batching window
        self.device = DeviceBudget(None)  # the worker's, shared by its pools: bytes held and bytes a step may use
        self.step_bytes = 0  # what a step needs a chain besides what it holds (the pool measures it); 0: unbounded
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []

    @property
    def running_chains(self) -> int:
        """Chains still moving: a job's stopped chains give their place to waiting work."""
        return sum(job.running_chains for job in self.running)

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
        for job in self.running:
            self.device.release(id(job))
        self.waiting, self.running = deque(), []
        return jobs

    def add(self, job: Job) -> None:
        if job.n > self.chain_budget:
            raise ValueError(f"a request of {job.n} chains can never fit the chain budget of {self.chain_budget}")
        if not self.device.fits_alone(job.held_bytes, self.step_bytes):
            raise ValueError(
                f"a request of {job.n} chains holds {job.held_bytes / 2**20:.4g} MiB between steps and a step needs "
                f"{self.step_bytes / 2**20:.4g} MiB a chain: more than {self.device.described()} MiB"
            )
        self.waiting.append(job)

    def _drop_reason(self, job: Job, now: float) -> str | None:
        if job.handle.cancelled:
            return "cancelled"
        if now > job.handle.deadline:
            return "deadline"
        return None

    def schedule(self) -> StepPlan:
        """Drop what is cancelled or late, admit waiting jobs first come first served, choose who steps."""
        now = self.clock()
        plan = StepPlan()
        for queue in (self.waiting, self.running):
            for job in queue:
                reason = self._drop_reason(job, now)
                if reason:
                    self.device.release(id(job))
                    plan.dropped.append((job, reason))
        if plan.dropped:  # swapped in whole, so another thread reading len(waiting) never sees a half-filtered queue
            leaving = {id(job) for job, _ in plan.dropped}
            self.waiting = deque(job for job in self.waiting if id(job) not in leaving)
            self.running = [job for job in self.running if id(job) not in leaving]
        used = self.running_chains
        while self.waiting and used + self.waiting[0].n <= self.chain_budget:
            if not self.device.admits(self.waiting[0].held_bytes, self.step_bytes):
                break  # first come first served: it waits until running requests leave room
            job = self.waiting.popleft()
            job.admitted_at = now
            self.device.hold(id(job), job.held_bytes)
            used += job.n
            self.running.append(job)
            plan.admitted.append(job)
        plan.running = self._choose()
        return plan

    def _choose(self) -> list[Job]:
        """The running jobs that advance this step, in running order (see the module docstring)."""
        if not self.running:
            return []
        ranked = sorted(self.running, key=lambda job: job.priority(self.aging))  # stable: ties by admission
        nearest = min(self.running, key=lambda job: job.steps - job.done_steps)
        horizon = self.urgent_ratio * nearest.steps  # aging orders the jobs; it makes none urgent by itself
        urgent: list[Job] = []
        others: list[Job] = []
        used = 0

        def waits(job: Job) -> bool:  # not urgent: long, and has not waited as long as the urgent ones take
            return job.steps - job.done_steps > horizon and job.sat_out <= horizon

        first = next((job for job in ranked if not waits(job)), ranked[0])  # it steps whatever the budget
        room = self.device.step_chains(self.step_bytes)  # the chains the bytes not held allow a step
        self.batch = budget = self._batch(first) if room is None else min(room, self._batch(first))
        for job in ranked:
            if waits(job):
                others.append(job)
            elif not urgent or used + job.running_chains <= budget:  # a smaller one further down may fit
                urgent.append(job)
                used += job.running_chains
            elif room is not None and used < budget:  # its next chains fill the step (`_slice`)
                urgent.append(job)
                used = budget
        ride = budget if self.probing else self._flat_top() if room is None else min(room, self._flat_top())
        picked = urgent + self._companions(used, others, max(budget, ride))
        if room is not None:  # the first may pass the measured batch, as a job never sliced does, not the bytes
            picked = self._slice(picked, max(budget, min(picked[0].running_chains, room)))
        elif any(job.cursor for job in picked):  # a pass begun under a bound that is gone: it ends first
            picked = self._slice(picked, self.chain_budget)
        chosen = set(map(id, picked))
        stepping = []
        for job in self.running:
            if id(job) in chosen:
                job.sat_out = 0
                stepping.append(job)
            else:
                job.sat_out += 1
        return stepping

    @staticmethod
    def _slice(picked: list[Job], room: int) -> list[Job]:
        """The picked jobs cut to `room` chains, best ranked first: a job wider than what is left, or in the middle
        of a pass, steps its next chains only (`window`; its step is counted once all its chains took it), and
        the jobs past the room sit this step out."""
        stepping = []
        for job in picked:
            job.window = None
            if room <= 0:
                continue
            if job.cursor == 0 and job.running_chains <= room:
                room -= job.running_chains
            else:
                job.window = (job.cursor, min(job.n, job.cursor + room))
                room -= job.window[1] - job.cursor
            stepping.append(job)
        return stepping

    def _batch(self, first: Job) -> int:
        """The most chains this step advances, from the measured step cost: every running chain to the cap
        (`step_budget`) until a step is measured; then the fewest chains of the fewest chains' bucket whose cost per
        chain is within NEAR_LEAST of the least measured (a batch grows only while that buys a real fall in the cost
        per chain: on a flat stretch it stays at its bottom, where a step's working memory is least; a request wider
        than what is left is sliced to it), or of the bucket above while it is the largest measured (so a batch
        grows a bucket every few steps while the cost per chain falls: a GPU's, a line's with a large fixed part,
        to the cap). Some steps measure a neighbouring bucket instead: the one below and the one above until each
        one's median rests on TRUSTED_STEPS steps (one step's cost may carry what the steps before it left, a first
        step's allocations), and every REFRESH_STEPS steps the one below again (costs change with load; a step
        there costs less memory, not more; that one step is its figure if its others are stale). A step below is
        taken only if `first`, the job that steps whatever the budget, fits it (else no step could). Only figures
        of one load are compared (`StepCost.fresh`, measured in the table's last STALE_STEPS steps): the bucket
        above, once stale, is believed no more if it reads cheaper, but forgotten and measured afresh as one never
        measured, so a batch never grows on an old figure, nor by more than a bucket (twice its chains)
        before the new figures say it should."""
        self.planned += 1
        self.probing = False
        table = self.cost.fresh()
        if not table:
            return self.step_budget
        least = min(per_chain for _, per_chain in table)
        at, per_chain = next((at, per_chain) for at, per_chain in table if per_chain <= NEAR_LEAST * least)
        level = bucket_of(int(at))
        if level > 0 and first.running_chains <= 2 ** (level - 1):
            below = self.cost.timed.get(level - 1, 0)  # once trusted, a refresh's step is its figure (stale: alone)
            if below < TRUSTED_STEPS or self.planned % REFRESH_STEPS < 2:  # two steps: `observe` sets the first aside
                self.probing = True
                return 2 ** (level - 1)
        stale = self.cost.stale(level + 1)
        if stale is not None and per_chain > NEAR_LEAST * stale[1]:  # it would grow the batch: measured again first
            self.cost.forget(level + 1)
        top = bucket_of(int(self.cost.points()[-1][0]))
        if level == top or len(self.cost.buckets.get(level + 1, ())) < TRUSTED_STEPS:
            self.probing = level < top
            return min(self.step_budget, 2 ** (level + 1))
        return min(self.step_budget, 2**level)

    def _flat_top(self) -> int:
        """The most chains companions may fill a step to: the top of the most chains' bucket whose cost per chain is
        within NEAR_LEAST of the least (to the cap), where a chain rides along for no more than the least; the
        step's batch (`_batch`) stops at the flat stretch's bottom, which is what the urgent chains fill."""
        table = self.cost.fresh()
        if not table:
            return self.step_budget
        least = min(per_chain for _, per_chain in table)
        widest = max(at for at, per_chain in table if per_chain <= NEAR_LEAST * least)
        return min(self.step_budget, 2 ** (bucket_of(int(widest)) + 1) - 1)

    def _companions(self, urgent_chains: int, others: list[Job], budget: int) -> list[Job]:
        """The jobs that are not urgent to step beside `urgent_chains`, best ranked first, within `budget` chains:
        each step earns the slack `max_slowdown` allows on the urgent chains' measured cost, a companion spends
        what its chains add to the step's cost (so a short request's steps cost at most that much more on
        average, the long ones taking turns), and the credit never grows past what the dearest waiting companion
        costs. Until the cost is known: as many chains as the urgent ones."""
        if not others:  # what the loop below ends with: no companion, and no credit kept once the cost is known
            if len(self.cost.points()) >= 2:
                self.credit = 0.0
            return []
        cost = self.cost.seconds
        alone = cost(urgent_chains)
        if alone is None:
            allowance = float(urgent_chains)

            def added(chains: int, extra: int) -> float:
                return float(extra)
        else:

            def added(chains: int, extra: int) -> float:
                return max(0.0, (cost(chains + extra) or 0.0) - (cost(chains) or 0.0))

            slack = (self.max_slowdown - 1) * alone
            dearest = max((added(urgent_chains, job.running_chains) for job in others), default=0.0)
            self.credit = min(self.credit + slack, max(slack, dearest)) if others else 0.0
            allowance = self.credit
        taken, used = [], urgent_chains
        for job in others:
            extra = added(used, job.running_chains)
            if extra <= allowance and used + job.running_chains <= budget:
                taken.append(job)
                allowance -= extra
                used += job.running_chains
        if alone is not None:
            self.credit = allowance
        return taken

    def update_from_output(self, stepped: list[Job]) -> list[Job]:
        """Count the step each job took; return (and stop running) the jobs that are now done: every chain took
        its steps or stopped (the pool counts a job's `stopped` chains before this)."""
        done = []
        for job in stepped:
            if job.window is not None and job.window[1] < job.n:  # a slice: the pass goes on at the next step
                job.cursor, job.window = job.window[1], None
            else:
                job.cursor, job.window = 0, None
                job.done_steps += 1
            if job.finished:
                done.append(job)
        self.finish(done)
        return done

    def finish(self, jobs: list[Job]) -> None:
        """Stop running these jobs (done, or failed in the pool)."""
        if not jobs:
            return
        leaving = set(map(id, jobs))
        for job in jobs:
            self.device.release(id(job))
        self.running = [job for job in self.running if id(job) not in leaving]
