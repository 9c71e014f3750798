"""What every pool of chains shares: one batched step for every running chain, requests joining and leaving
at step boundaries, each request isolated from its neighbours in the batch.

Three kinds of chains move this way: images under an energy (Langevin, service/engine/pools/langevin.py), a GAN's
latents under the energy its critic defines (DDLS, service/engine/pools/latent.py), and a CNF's states along its ODE
(service/engine/pools/ode.py). A subclass says how a job's chains start, what one batched step computes, which pixels
an inpainting step holds, what image a state shows, and how a finished job is answered.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import Protocol

import torch

from service.engine.messages import ChainDiverged, Deliver, FrameSink, Handle, Order, SampleOrder, TooLarge
from service.engine.pools.base import SamplerPool, state_of
from service.engine.scheduler import Job
from training.runtime.device import chain_precision
from training.sampling.langevin import arrived
from training.sampling.sampler_config import EBMSampler, FlowSampler, GANSampler

log = logging.getLogger(__name__)


STEP_STATE_COPIES = 8  # states a step makes besides the network's: noise, noised, probe, gradient, push; solver stages
FINITE_CHECK_STEPS = 8  # steps between the checks that a job's chains are finite (a sum and a device sync: _commit)
BACKWARD_FACTOR = 1.5  # what backward adds to the tensors autograd keeps: the gradients of one layer's at a time


def probed_step_bytes(
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    state_shape: tuple[int, ...],
    device: torch.device,
    backward: bool = True,
    evaluations: int = 1,
) -> int:
    """What one step needs a chain on the device besides its state, from a probe of the network `evaluate` runs on
    states [B, *state_shape]: the bytes autograd keeps to differentiate it at 4 chains less those at 2 (weights,
    kept at both, cancel), per chain, times BACKWARD_FACTOR for a step that takes the gradient (Langevin, DDLS),
    once for a forward-only one (an ODE step under no_grad keeps less than autograd would: an upper bound), times
    the batches a step evaluates (`evaluations`: two for guidance), and STEP_STATE_COPIES float32 states. Probed
    in float32: bfloat16 steps need less."""

    def kept(chains: int) -> int:
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        x = torch.zeros(chains, *state_shape, device=device, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), torch.enable_grad():
            torch.autograd.grad(evaluate(x).sum(), x)
        return sum(storages.values())

    per_chain = max(0, kept(4) - kept(2)) / 2 * (BACKWARD_FACTOR if backward else 1.0)
    return int(evaluations * per_chain) + STEP_STATE_COPIES * 4 * math.prod(state_shape)


class ChainMove(Protocol):
    """What one batched step of any kind of chain returns (a Langevin step's LangevinStep is one)."""

    @property
    def x(self) -> torch.Tensor: ...  # [B, *shape] the new states

    @property
    def energy(self) -> torch.Tensor | None: ...  # [B] what the step evaluated (Langevin); None for an ODE step

    @property
    def velocity(self) -> torch.Tensor | None: ...  # [B, *shape] heavy-ball velocity (Langevin); None for ODEs


class ChainPool(SamplerPool):
    """Continuous batching of chains; every chain keeps its own settings, seed and state."""

    sampler: EBMSampler | GANSampler | FlowSampler  # the checkpoint's defaults (named when chains diverge)
    exact_steps = False  # True: every chain takes all its steps (an ODE reaches t = 1), no tolerance stop
    dtype = torch.float32  # what a step computes the energy or field in (the worker sets --sampling-dtype)
    state_values = 0  # values in one chain's state (what it holds between steps)
    image_values = 0  # values in one trajectory frame of a chain
    step_bytes = 0  # what a step needs a chain besides its state (probe_step_bytes); 0: not bounded

    def probe_step_bytes(self, probe: Callable[[], int]) -> None:
        """Set step_bytes from `probe`; one that fails (a program exported for one batch size) leaves the pool's
        steps unsliced, and the log says so."""
        try:
            self.step_bytes = probe()
        except Exception as error:
            log.warning("%s: its step's bytes could not be probed (%s); its steps are not sliced", self.name, error)

    def make_job(self, order: Order, deliver: Deliver, handle: Handle, on_frame: FrameSink | None) -> Job:
        """A job that holds its chains' bytes on the device (DeviceBudget) from its admission to its answer."""
        job = super().make_job(order, deliver, handle, on_frame)
        assert isinstance(order, SampleOrder)
        job.held_bytes = self.held_bytes(order, job.steps, streamed=on_frame is not None)
        device = self.scheduler.device
        if not device.fits_alone(job.held_bytes, self.step_bytes):
            limits = self.device_limits() or {}
            raise TooLarge(
                f"its chains would hold {job.held_bytes / 2**20:.4g} MiB between steps, beside "
                f"{self.step_bytes / 2**20:.4g} MiB for a chain's step: more than {device.described()} MiB; "
                f"{order.model.name} takes at most {limits.get('max_images', 0):,} images a request without "
                f"momentum or trajectory frames (raise {device.setting}, or ask for fewer images or frames, or "
                "stream them)"
            )
        return job

    def device_limits(self) -> dict[str, int] | None:
        """What the device budget allows this pool's requests, in images and bytes (GET /models): a chain's bytes
        held between steps (as much again with momentum, and a frame's for each trajectory frame kept) and needed
        by a step, the most images one request may ask for, and the most a step advances; None: no bound."""
        budget = self.scheduler.device.total_bytes
        if budget is None:
            return None
        held, frame, step = 4 * self.state_values, self.image_values, self.step_bytes
        return {
            "budget_bytes": budget,
            "held_bytes_per_image": held,
            "frame_bytes_per_image": frame,
            "step_bytes_per_image": step,
            "max_images": max(0, min(self.scheduler.chain_budget, (budget - step) // held)),
            "max_images_per_step": budget // step if step else self.scheduler.chain_budget,
        }

    def held_bytes(self, order: SampleOrder, steps: int, streamed: bool = False) -> int:
        """What a request's chains hold between steps: their states (and velocities, with momentum) in float32,
        and the trajectory frames it keeps to answer with, as 8-bit pixels (none when streamed: each goes out as it
        is made)."""
        states = 2 if order.momentum else 1
        frames = 0 if streamed or not order.trajectory_every else -(-steps // order.trajectory_every) + 1
        return order.n * (4 * states * self.state_values + frames * self.image_values)

    def _start(self, job: Job) -> None:
        """Give an admitted job's chains their starting states (and keep frame 0 when asked)."""
        raise NotImplementedError

    def _advance(self, module_index: int, jobs: list[Job]) -> ChainMove:
        """The batched step itself; changes no job's state, so a failed batch can be retried job by job."""
        raise NotImplementedError

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        """The images [B, *image] that states x show, in the data range (trajectory frames)."""
        raise NotImplementedError

    def _finish(self, job: Job) -> None:
        """Answer a job whose chains took all their steps."""
        raise NotImplementedError

    def _hold_known(self, job: Job, x: torch.Tensor) -> torch.Tensor:
        """Inpainting: a job's running chains' new states [R, *shape] with the known pixels put back as they
        are (a Langevin chain's known pixels never move)."""
        state = state_of(job)
        assert state.free is not None and state.known is not None
        return torch.where(state.free, x, state.known)

    def step(self) -> None:
        """Schedule, execute one step for every running chain, and hand out what finished."""
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
        chains = {id(job): state_of(job).choose_rows(job.window) for job in plan.running}  # before any of them stops
        stepped: list[Job] = []
        started = self.clock()
        for module_index, jobs in by_module.items():
            stepped.extend(self._execute(module_index, jobs))
        advanced = sum(chains[id(job)] for job in stepped)
        self.tally.cost.update(self.scheduler.cost.observe(advanced, self.clock() - started))  # weighs companions
        self._record_step(len(stepped), advanced)
        for job in self.scheduler.update_from_output(stepped):
            self._finish(job)

    def _execute(self, module_index: int, jobs: list[Job]) -> list[Job]:
        """One step for these jobs' chains in one batch; returns the jobs that stepped.

        Requests are isolated from their neighbours in the batch: when the batch raises, each job is
        stepped alone, so only a request that fails by itself is answered with the failure; a job whose
        chains left the finite numbers ends alone with ChainDiverged (a 422).
        """
        try:
            with chain_precision(self.device, self.dtype):
                moved = self._advance(module_index, jobs)
        except Exception as error:  # one failed batch must not take the worker down
            if len(jobs) > 1:
                log.warning("chain batch of %d requests failed on %s; stepping each alone", len(jobs), self.name)
                return [job for one in jobs for job in self._execute(module_index, [one])]
            log.exception("chain batch of 1 request failed on %s", self.name)
            self.fail(jobs, error)
            return []
        return self._commit(jobs, moved)

    def _commit(self, jobs: list[Job], moved: ChainMove) -> list[Job]:
        """Hand each job its part of the batched step (the rows of its running chains); stop the chains that
        arrived (`arrived`, at the order's tolerance; never with `exact_steps`); end the jobs whose chains went
        non-finite."""
        sizes = [state_of(job).stepping for job in jobs]
        parts = zip(jobs, _split(moved.x, sizes), _rows(moved.energy, sizes), _rows(moved.velocity, sizes), strict=True)
        stopping = not self.exact_steps and any(state_of(job).order.tolerance > 0 for job in jobs)
        placed, stops = [], []
        for job, x_part, energy_part, velocity_part in parts:
            state = state_of(job)
            if state.free is not None and state.known is not None:
                x_part = self._hold_known(job, x_part)
            assert state.x is not None
            if stopping:  # else no chain can arrive: nothing to compute
                stops.append(arrived(state.running(state.x), x_part, state.order.tolerance, state.free))
            placed.append((x_part, energy_part, velocity_part))
        # One device sync a batch: [the chains' sums, whether each arrived (when any may)]; with no stop to read, the
        # batch's one sum on the steps a job checks (`_checks_finite`), and the chains' only when it is not finite.
        sums: list[float] | None = None  # [B] each chain's; None: every chain is finite, or none checked
        arrivals: list[float] = []  # [B] 1.0 where a chain arrived
        if stopping:
            chain_sums = _chain_sums(moved)
            sums, arrivals = torch.stack([chain_sums, torch.cat(stops).to(chain_sums.dtype)]).tolist()
        elif any(map(_checks_finite, jobs)) and not _finite(moved):
            sums = _chain_sums(moved).tolist()
        stepped, diverged = [], []
        ends = itertools.accumulate(sizes)
        for job, (x_part, energy_part, velocity_part), end, size in zip(jobs, placed, ends, sizes, strict=True):
            if sums is not None and not all(map(math.isfinite, sums[end - size : end])):
                diverged.append(job)
                continue
            stepped.append(job)
            stop = [flag > 0 for flag in arrivals[end - size : end]] if stopping else []
            self._place(job, x_part, energy_part, velocity_part, stop if any(stop) else None)
            state, whole = state_of(job), job.window is None or job.window[1] >= job.n
            if whole and state.x is not None and _keeps_frame(job):
                state.keep_frame(job.done_steps + 1, job.steps, self._image(state.x), state.energy)
        for job in diverged:
            self.end([job], self._diverged(job))
        return stepped

    def _place(
        self,
        job: Job,
        x: torch.Tensor,
        energy: torch.Tensor | None,
        velocity: torch.Tensor | None,
        stop: list[bool] | None,
    ) -> None:
        """Write a job's running chains' new states [R, ...] into its chains [n, ...]; stop those that arrived
        (`stop`, a flag per running chain; None: none did), so they leave the batch at the next step. With every
        chain running, the step's tensors are kept as they are (no copy: a fixed-step request computes what it
        always did)."""
        state = state_of(job)
        assert state.x is not None
        if state.rows is None:
            state.x, state.energy = x, energy
            state.velocity = velocity if state.order.momentum else None
        else:
            rows = state.rows
            state.x = state.x.index_copy(0, rows, x)
            if energy is not None:  # a slice's first pass: the others' energies come with their slices
                whole = torch.zeros(job.n, dtype=energy.dtype, device=energy.device)
                state.energy = (whole if state.energy is None else state.energy).index_copy(0, rows, energy)
            if state.order.momentum and velocity is not None:
                whole = torch.zeros_like(state.x)
                state.velocity = (whole if state.velocity is None else state.velocity).index_copy(0, rows, velocity)
            if state.chain_steps is None:  # counted from here: so far every chain took every step
                state.chain_steps = torch.full((job.n,), job.done_steps, dtype=torch.int64)
            state.chain_steps[rows.cpu()] += 1
        if stop is not None:
            moving = torch.arange(job.n, device=x.device) if state.moving is None else state.moving
            arrived = (state.rows if state.rows is not None else moving)[torch.tensor(stop, device=moving.device)]
            state.moving = moving[~torch.isin(moving, arrived)]
            job.stopped = job.n - len(state.moving)

    def _diverged(self, job: Job) -> ChainDiverged:
        """The answer to a job whose chains left the finite numbers (a Langevin chain's; the ODE pool says its own)."""
        order, sampler = state_of(job).order, self.sampler
        assert not isinstance(sampler, FlowSampler)
        return ChainDiverged(
            f"the chains diverged by step {job.done_steps + 1} of {job.steps}: their states are no longer finite "
            f"under step_size {order.step_size:g}, noise {order.noise:g}, temperature {order.temperature:g}, "
            f"momentum {order.momentum:g}; try values nearer {self.name}'s defaults (step_size "
            f"{sampler.step_size:g}, noise {sampler.noise:g}, temperature {sampler.temperature:g})"
        )


def _keeps_frame(job: Job) -> bool:
    """Whether the step a job's chains take now ends at one of its trajectory frames (streamed or kept). A sliced
    job's frame is kept once its last slice took the step, and shows the chains of every slice."""
    every, step = state_of(job).order.trajectory_every, job.done_steps + 1
    if not every:
        return False
    return step % every == 0 or step == job.steps or job.stopped == job.n


def _checks_finite(job: Job) -> bool:
    """Whether the step a job's chains take now checks that they are finite: every FINITE_CHECK_STEPS steps, and
    always before their states go out (its last step, a frame's step), so no answer, frame or buffer slot is ever
    non-finite. Chains that diverged in between end at the next check (NaN and inf carry through the later steps)."""
    step = job.done_steps + 1
    return step % FINITE_CHECK_STEPS == 0 or step >= job.steps or _keeps_frame(job)


def _chain_sums(moved: ChainMove) -> torch.Tensor:
    """Each chain's state (and velocity) values summed in float64 [B]: finite exactly when all of them are (NaN and inf
    carry through a sum, and float32 values cannot overflow a float64 one), at a fraction of what isfinite costs."""
    sums = moved.x.flatten(1).sum(1, dtype=torch.float64)
    if moved.velocity is not None:
        sums += moved.velocity.flatten(1).sum(1, dtype=torch.float64)
    return sums


def _finite(moved: ChainMove) -> bool:
    """Whether every chain of a step is finite, from one sum of the batch in its own dtype: a finite sum has no NaN or
    inf in it; one that is not may be finite values that overflowed (then `_chain_sums` decides, chain by chain)."""
    total = moved.x.sum()
    if moved.velocity is not None:
        total = total + moved.velocity.sum()
    return math.isfinite(total.item())


def _split(values: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Per-chain values [B, ...] split into each job's rows (one job's: as they are)."""
    return [values] if len(sizes) == 1 else list(values.split(sizes))


def _rows(values: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    """Per-chain values [B, ...] split into each job's rows; None for every job when a step has none."""
    return [None] * len(sizes) if values is None else list(_split(values, sizes))
