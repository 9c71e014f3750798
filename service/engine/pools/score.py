"""Scoring on the worker (POST /score): the pools that run what training/sampling/scoring.py computes.

A one-pass score (an energy, a flow's log-density, a critic's value) batches across requests as generator
passes do: requests for one model that arrive within the batching window run as one forward pass. A CNF's
likelihood is an adaptive ODE solve per image (dopri5, training/sampling/ode.py): each image is a chain with
its own time and step size, requests join the batch between attempted steps and leave it as their images reach
t = 0, and a cancelled request's images leave at the next step; so the worker steps a long solve one attempt
at a time between the other pools' steps, and a short sample never waits for a whole solve. Every image's
dequantization noise and Hutchinson probes are seeded by its own pixels: a score is the same alone or batched.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from service.catalogue.registry import ServedModel
from service.engine.messages import Deliver, FrameSink, Handle, Order, ScoreOrder, ScoreResult
from service.engine.pools.base import SamplerPool
from service.engine.scheduler import Job
from service.metrics import Metrics
from training.sampling.likelihood import augmented_start, likelihood_field, likelihood_norm, prior_and_delta
from training.sampling.ode import Dopri5Rows, dopri5_attempt, dopri5_start
from training.sampling.scoring import (
    LikelihoodInputs,
    LikelihoodSettings,
    cnf_scores,
    likelihood_inputs,
    one_pass_scores,
    ood_score_name,
    ood_statistics,
    score_family,
)

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 10**9  # pool steps a job may take part in (dopri5 fails a row whose step collapses first)


def score_pool_name(model: ServedModel) -> str:
    """The worker's pool that scores a served model's inputs (an ensemble's own, beside its buffer group's)."""
    return f"{model.name}:score"


def scores_inputs(model: ServedModel) -> bool:
    """Whether a served model gets a score pool: not a GAN without its critic, nor a model of 2-D points (POST
    /score then says why)."""
    try:
        score_family(model.members[0])
    except ValueError:
        return False
    return True


@dataclass(eq=False)
class ScoreState:
    """A score job's order, where its answer goes, and (a CNF's) its images' solves."""

    order: ScoreOrder
    deliver: Deliver
    inputs: LikelihoodInputs | None = None  # a CNF's dequantized images and probes, on the device
    solve: Dopri5Rows | None = None  # a CNF's images' solves, once every image's is started
    started: list[Dopri5Rows] = field(default_factory=list)  # the solves started so far, `chunk` images at a time


def score_state(job: Job) -> ScoreState:
    state: ScoreState = job.state
    return state


class ScorePool(SamplerPool):
    """What both score pools share: a job per request, one image per chain, the answer a ScoreResult."""

    def __init__(
        self,
        model: ServedModel,
        chain_budget: int,
        device: torch.device,
        metrics: Metrics,
        clock: Callable[[], float],
        window_s: float | None,
    ) -> None:
        super().__init__(score_pool_name(model), chain_budget, device, metrics, clock, window_s)
        self.model = model
        self.family = score_family(model.members[0])
        self.ood = ood_score_name(model.members[0], self.family)  # its statistics are computed with the scores

    def job_steps(self, order: Order) -> int:
        return 1  # one pass; a likelihood solve: as many attempted steps as its images need

    def make_job(self, order: Order, deliver: Deliver, handle: Handle, on_frame: FrameSink | None) -> Job:
        assert isinstance(order, ScoreOrder)
        state = ScoreState(order, deliver)
        return Job(n=order.n, steps=self.job_steps(order), handle=handle, arrived=self.clock(), state=state)

    def _answer(self, job: Job, scores: dict[str, torch.Tensor], likelihood: dict | None = None) -> None:
        waited, ran = job.admitted_at - job.arrived, self.clock() - job.admitted_at
        score_state(job).deliver(ScoreResult(scores, waited, ran, likelihood))

    def _labels(self, jobs: list[Job]) -> torch.Tensor | None:
        """[B] labels of the jobs' images (-1: the null label) for a conditional model; None otherwise."""
        if not self.family.conditional_label or self.model.classes is None:
            return None
        orders = [score_state(job).order for job in jobs]
        parts = [order.labels if order.labels is not None else torch.full((order.n,), -1) for order in orders]
        return torch.cat(parts).to(self.device)

    def _isolated(self, jobs: list[Job], run: Callable[[list[Job]], None], what: str) -> list[Job]:
        """Run a batch; when it raises, each job alone, so only a job that fails by itself is answered with the
        failure. Returns the jobs that ran."""
        try:
            run(jobs)
            return jobs
        except Exception as error:  # one failed batch must not take the worker down
            if len(jobs) > 1:
                log.warning("%s of %d requests failed on %s; running each alone", what, len(jobs), self.name)
                return [ran for job in jobs for ran in self._isolated([job], run, what)]
            log.exception("%s of 1 request failed on %s", what, self.name)
            self.fail(jobs, error)
            return []


SCORE_PASS_IMAGES = 64  # images per forward pass on a CPU without --step-budget (a pass of 1024 scored half as fast)


class OnePassScorePool(ScorePool):
    """Energies, flows' log-densities and critics' values: requests within the window run as one pass."""

    def __init__(
        self,
        model: ServedModel,
        chain_budget: int,
        device: torch.device,
        metrics: Metrics,
        clock: Callable[[], float],
        window_s: float,
        pass_images: int | None = None,  # images per forward pass (--step-budget); None: all at once
        memory: Callable[[], AbstractContextManager[None]] | None = None,  # where the passes' blocks come from
    ) -> None:
        super().__init__(model, chain_budget, device, metrics, clock, window_s)
        self.pass_images = pass_images or chain_budget
        self.memory = memory or contextlib.nullcontext  # the app's: the heap (service/http/memory.py heap_blocks)

    def step(self) -> None:
        plan = self.scheduler.schedule()
        self._admit(plan.admitted, plan.dropped)
        stepped = self._isolated(plan.running, self._score, "score batch") if plan.running else []
        self.scheduler.update_from_output(stepped)

    def _score(self, jobs: list[Job]) -> None:
        orders = [score_state(job).order for job in jobs]
        images = torch.cat([order.images for order in orders]).to(self.device)  # [B, *shape]
        labels = self._labels(jobs)
        parts = []
        with self.memory():  # a pass's blocks reused, not mapped and faulted in afresh (service/http/memory.py)
            for chunk, rows in zip(
                images.split(self.pass_images), torch.arange(len(images)).split(self.pass_images), strict=True
            ):  # a CPU scores fastest in passes of its step budget (64), not of all the batch's images at once
                chunk_labels = None if labels is None else labels[rows]
                part = one_pass_scores(self.family, self.model.members, chunk, chunk_labels)
                parts.append(part | ood_statistics(self.ood, self.model.members, chunk, chunk_labels, part))
        scores = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        self._record_step(len(jobs), len(images))
        sizes = [order.n for order in orders]
        split = {name: values.split(sizes) for name, values in scores.items()}
        for index, job in enumerate(jobs):
            self._answer(job, {name: values[index] for name, values in split.items()})


class LikelihoodPool(ScorePool):
    """A CNF's likelihood solves as chains: one attempted dopri5 step of every running image per pool step."""

    def __init__(
        self,
        model: ServedModel,
        settings: LikelihoodSettings,
        chain_budget: int,
        device: torch.device,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(model, chain_budget, device, metrics, clock, None)
        self.settings = settings
        self.field = model.members[0].module
        self.shape = model.members[0].shape
        self.data_range = model.members[0].data_range
        self.levels, self.uniform = model.members[0].levels, model.members[0].dequantized  # its data's statement

    def job_steps(self, order: Order) -> int:
        return MAX_ATTEMPTS

    def step(self) -> None:
        """One bounded piece of work, so that a short sample beside it waits little: start the solves of up to
        `chunk` images of the oldest job not fully started (two evaluations each), else attempt one dopri5 step
        of at most `chunk` running images, oldest requests first. An image's numbers do not depend on when it
        steps or beside what."""
        plan = self.scheduler.schedule()
        self._admit(plan.admitted, plan.dropped)
        unstarted = [job for job in self.scheduler.running if score_state(job).solve is None]
        if unstarted:
            self._isolated(unstarted[:1], self._start, "likelihood start")
            return
        picked: list[tuple[Job, torch.Tensor]] = []
        room = self.settings.chunk
        for job in self.scheduler.running:
            solve = score_state(job).solve
            assert solve is not None
            rows = solve.unfinished(1.0, 0.0).nonzero().squeeze(1)[:room]
            if len(rows):
                picked.append((job, rows))
                room -= len(rows)
            if room == 0:
                break
        if not picked:
            return
        started = self.clock()
        chosen = {id(job): rows for job, rows in picked}
        attempt = functools.partial(self._attempt, chosen=chosen)
        stepped = self._isolated([job for job, _ in picked], attempt, "likelihood step")
        advanced = sum(len(chosen[id(job)]) for job in stepped)
        self.scheduler.cost.observe(advanced, self.clock() - started)
        self._record_step(len(stepped), advanced)
        for job in stepped:
            solve = score_state(job).solve
            assert solve is not None
            job.stopped = job.n - int(solve.unfinished(1.0, 0.0).sum())
        for job in self.scheduler.update_from_output(stepped):
            self._finish(job)

    def _field(self, jobs: list[Job], rows: list[torch.Tensor]):
        """The augmented field of these jobs' rows `rows` (each job's image indices), batched."""
        inputs = [score_state(job).inputs for job in jobs]
        vectors = [each.probe_vectors for each in inputs if each is not None and each.probe_vectors is not None]
        labels = self._labels(jobs)
        sizes = [score_state(job).order.n for job in jobs]
        if labels is not None:
            labels = torch.cat([part[index] for part, index in zip(labels.split(sizes), rows, strict=True)])
        probes = None
        if self.settings.probes:
            probes = torch.cat([each[:, index] for each, index in zip(vectors, rows, strict=True)], 1)
        return likelihood_field(self.field, self.shape, labels, probes, self.settings.chunk)

    def _start(self, jobs: list[Job]) -> None:
        """Start the solves of the next `chunk` images of one job; its solve is whole once all have started."""
        (job,) = jobs
        state = score_state(job)
        if state.inputs is None:
            inputs = likelihood_inputs(state.order.images, self.data_range, self.settings.probes, self.uniform)
            vectors = None if inputs.probe_vectors is None else inputs.probe_vectors.to(self.device)
            state.inputs = LikelihoodInputs(inputs.points.to(self.device), inputs.probe_seeds, vectors)
        first = sum(len(part.t) for part in state.started)
        rows = torch.arange(first, min(first + self.settings.chunk, state.order.n), device=self.device)
        field_of_rows = self._field(jobs, [rows])
        rtol, atol = self.settings.rtol, self.settings.atol
        start = augmented_start(state.inputs.points[rows])
        state.started.append(dopri5_start(field_of_rows, start, 1.0, 0.0, rtol, atol, likelihood_norm))
        if first + len(rows) == state.order.n:
            state.solve, state.started = Dopri5Rows.cat(state.started), []

    def _attempt(self, jobs: list[Job], chosen: dict[int, torch.Tensor]) -> None:
        """One attempted dopri5 step of the chosen rows (image indices) of each job, in one batch."""
        solves = [score_state(job).solve for job in jobs]
        rows = [chosen[id(job)] for job in jobs]
        batch = Dopri5Rows.cat([solve.take(index) for solve, index in zip(solves, rows, strict=True) if solve])
        rtol, atol = self.settings.rtol, self.settings.atol
        dopri5_attempt(self._field(jobs, rows), batch, 1.0, 0.0, rtol, atol, likelihood_norm)
        for solve, index, part in zip(solves, rows, batch.split([len(index) for index in rows]), strict=True):
            assert solve is not None
            solve.put(index, part)

    def _finish(self, job: Job) -> None:
        solve = score_state(job).solve
        assert solve is not None
        prior, delta = prior_and_delta(solve.y)
        scores = cnf_scores(prior + delta, solve.evaluations, self.shape, self.data_range, self.levels)
        images = score_state(job).order.images.to(self.device)
        scores |= ood_statistics(self.ood, self.model.members, images, None, scores)
        self._answer(job, scores, self.settings.report())
