"""The device worker: one thread owns the device and every model's weights and runs what schedulers decide.

The HTTP side only calls `submit` (thread-safe) and sets `Job.cancelled`; results come back through a
callback that the caller makes thread-safe (the app hands in `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service.buffer_store import BufferStore
from service.metrics import Metrics
from service.registry import BufferGroup, Registry, ServedModel
from service.scheduler import ChainScheduler, Job
from training.langevin import ReplayBuffer, langevin_step
from training.losses import bits_per_dim
from training.noise import chain_gaussian, chain_seeds, chain_start, latent_gaussian
from training.sampler_config import EBMSampler, GANSampler

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue is full: the caller should answer 503 with Retry-After."""


class CancelledByClient(Exception):
    """The client went away; nobody reads this result."""


class WorkerFailure(Exception):
    """A batch failed on the device (for example out of memory); only its requests see this."""


@dataclass
class SampleOrder:
    """What a client asked for, with defaults already filled in from the checkpoint.

    Every family reads model, n, seed and temperature; the Langevin fields are read by EBM pools only
    (a GAN's order has steps = 1: one pass of its generator).
    """

    model: ServedModel
    n: int
    seed: int
    temperature: float
    steps: int = 1
    step_size: float = 0.0
    noise: float = 0.0
    init: str = "noise"  # "buffer" | "noise" | "image"
    trajectory_every: int | None = None
    max_frames: int | None = None  # flows: an iterative inverse (i-ResNet) is thinned to this many frames
    start_image: torch.Tensor | None = None  # [*shape] in the data range, for init "image"
    free_mask: torch.Tensor | None = None  # [*shape] bool: True where chains may move (inpainting)


@dataclass
class SampleResult:
    samples: torch.Tensor  # [n, *shape] on the CPU
    energy: torch.Tensor | None  # [n] energy at each chain's last step (EBMs)
    frames: list[torch.Tensor]  # trajectory states [n, *shape], at frame_steps
    frame_steps: list[int]
    queue_seconds: float
    run_seconds: float
    bits_per_dim: torch.Tensor | None = None  # [n] flows: -log2 p(sample) per dimension, 256 levels


Deliver = Callable[[SampleResult | BaseException], None]
FrameSink = Callable[[int, torch.Tensor, torch.Tensor | None], None]  # (step, x [n, *shape], energy [n])


@dataclass(eq=False)
class ChainState:
    """A job's tensors while its chains run."""

    order: SampleOrder
    deliver: Deliver
    member_indices: list[int]  # which of the pool's modules this job's chains move under, in turn
    on_frame: FrameSink | None = None  # streaming: called from the worker thread at every kept frame
    x: torch.Tensor | None = None  # [n, *shape] on the device
    seeds: torch.Tensor | None = None  # [n] int64 chain seeds
    slots: torch.Tensor | None = None  # [n] replay-buffer slots (-1: not from the buffer)
    energy: torch.Tensor | None = None  # [n]
    frames: list[torch.Tensor] = field(default_factory=list)
    frame_steps: list[int] = field(default_factory=list)
    known: torch.Tensor | None = None  # [1, *shape] pixels held fixed (inpainting)
    free: torch.Tensor | None = None  # [1, *shape] bool, True where chains move

    def keep_frame(self, step: int, x: torch.Tensor, energy: torch.Tensor | None) -> None:
        x_cpu = x.detach().cpu()
        if self.on_frame is not None:
            self.on_frame(step, x_cpu, None if energy is None else energy.detach().cpu())
        else:
            self.frames.append(x_cpu)
            self.frame_steps.append(step)


def evenly_spaced(frames: list[torch.Tensor], limit: int | None) -> list[tuple[int, torch.Tensor]]:
    """(1-based index, frame) pairs, thinned evenly to at most `limit` and always keeping the last."""
    count = len(frames)
    if limit is None or count <= limit:
        return list(enumerate(frames, start=1))
    picks = sorted({round(position * (count - 1) / (limit - 1)) for position in range(limit)})
    return [(pick + 1, frames[pick]) for pick in picks]


class SamplerPool:
    """What the worker needs of every family's pool: a scheduler, `has_work`, `step`, `fail_all`.

    Subclasses say how a job starts, steps and finishes; this class keeps the shared bookkeeping.
    """

    buffer: ReplayBuffer | None = None
    buffer_dirty = False

    def __init__(
        self, name: str, chain_budget: int, device: torch.device, metrics: Metrics, clock: Callable[[], float]
    ) -> None:
        self.name = name
        self.device = device
        self.metrics = metrics
        self.clock = clock
        self.scheduler = ChainScheduler(chain_budget, clock)
        self.stats = {"steps": 0, "chain_steps": 0, "max_jobs_in_step": 0, "max_chains_in_step": 0}

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def seconds_until_due(self) -> float:
        """How long the worker may sleep before this pool has work without a new submission."""
        return 0.25

    def step(self) -> None:
        raise NotImplementedError

    def _release(self, job: Job) -> None:
        """Give back what a job holds (buffer slots); nothing by default."""

    def _drop(self, dropped: list[tuple[Job, str]]) -> None:
        for job, reason in dropped:
            self._release(job)
            job.state.deliver(TimeoutError(reason) if reason == "deadline" else CancelledByClient(reason))

    def fail_all(self, reason: str) -> None:
        """Hand every waiting and running job an error and give back what it holds."""
        jobs = list(self.scheduler.waiting) + list(self.scheduler.running)
        self.scheduler.waiting.clear()
        self.scheduler.finish(jobs)
        for job in jobs:
            self._release(job)
            job.state.deliver(WorkerFailure(reason))

    def _record_step(self, jobs: int, chains: int) -> None:
        self.stats["steps"] += 1
        self.stats["chain_steps"] += chains
        self.stats["max_jobs_in_step"] = max(self.stats["max_jobs_in_step"], jobs)
        self.stats["max_chains_in_step"] = max(self.stats["max_chains_in_step"], chains)
        self.metrics.observe_step(self.name, chains)


class LangevinPool(SamplerPool):
    """The chains of one buffer group (an EBM or an ensemble), advanced together one step at a time."""

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

    def make_job(
        self, order: SampleOrder, deliver: Deliver, deadline: float, arrived: float, on_frame: FrameSink | None = None
    ) -> Job:
        members = [self.names.index(member.name) for member in order.model.members]
        return Job(
            n=order.n,
            steps=order.steps,
            deadline=deadline,
            arrived=arrived,
            state=ChainState(order, deliver, members, on_frame),
        )

    def _start(self, job: Job) -> None:
        state: ChainState = job.state
        order = state.order
        state.seeds = chain_seeds(order.seed, order.n)
        if order.init == "buffer":
            x, state.slots = self.buffer.draw(order.n, torch.Generator().manual_seed(order.seed))
        else:
            x = chain_start(state.seeds, self.shape, self.sampler.prior, self.data_range)
            state.slots = torch.full((order.n,), -1)
        if order.init == "image":
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
            state.keep_frame(0, state.x, None)

    def _release(self, job: Job) -> None:
        state: ChainState = job.state
        if state.slots is not None:
            self.buffer.release(state.slots)

    def step(self) -> None:
        """Schedule, execute one Langevin step for every running chain, and hand out what finished."""
        plan = self.scheduler.schedule()
        self._drop(plan.dropped)
        for job in plan.admitted:
            self._start(job)
            self.metrics.queue_seconds.labels(self.name).observe(job.admitted_at - job.arrived)
        if not plan.running:
            return
        by_module: dict[int, list[Job]] = {}
        for job in plan.running:
            state: ChainState = job.state
            module_index = state.member_indices[job.done_steps % len(state.member_indices)]
            by_module.setdefault(module_index, []).append(job)
        stepped: list[Job] = []
        for module_index, jobs in by_module.items():
            try:
                self._execute(module_index, jobs)
                stepped.extend(jobs)
            except Exception as error:  # one failed batch must not take the worker down
                log.exception("Langevin batch of %d requests failed on %s", len(jobs), self.name)
                self.scheduler.finish(jobs)
                for job in jobs:
                    self._release(job)
                    job.state.deliver(WorkerFailure(f"sampling failed on the device: {type(error).__name__}"))
        self._record_step(len(stepped), sum(job.n for job in stepped))
        for job in self.scheduler.update_from_output(stepped):
            self._finish(job)

    def _execute(self, module_index: int, jobs: list[Job]) -> None:
        states: list[ChainState] = [job.state for job in jobs]
        x = torch.cat([state.x for state in states])  # [B, *shape]
        seeds = torch.cat([state.seeds for state in states])  # [B]
        steps = torch.cat([torch.full((job.n,), job.done_steps, dtype=torch.int64) for job in jobs]).to(self.device)

        def per_chain(value: Callable[[SampleOrder], float]) -> torch.Tensor:
            return torch.cat([torch.full((state.order.n,), value(state.order)) for state in states])

        eps = chain_gaussian(seeds, steps, self.shape).to(self.device)
        step = langevin_step(
            self.modules[module_index],
            x,
            eps,
            step_size=per_chain(lambda order: order.step_size),
            noise=per_chain(lambda order: order.noise),
            grad_clip=self.sampler.grad_clip,
            temperature=per_chain(lambda order: order.temperature),
            data_range=self.data_range,
            clamp=self.sampler.clamp,
        )
        moved, energy = step.x, step.energy
        for job, state, x_part, energy_part in zip(
            jobs, states, moved.split([j.n for j in jobs]), energy.split([j.n for j in jobs]), strict=True
        ):
            if state.free is not None:
                x_part = torch.where(state.free, x_part, state.known)  # inpainting: known pixels stay
            state.x, state.energy = x_part, energy_part
            every = state.order.trajectory_every
            step = job.done_steps + 1
            if every and (step % every == 0 or step == job.steps):
                state.keep_frame(step, x_part, energy_part)

    def _worth_keeping(self, order: SampleOrder) -> bool:
        """Whether finished chains go back into the shared buffer.

        Only chains run with the checkpoint's own sampler settings: a client's odd step size or
        temperature must not poison the buffer every other client starts from. Chains started from a
        client's image never enter it (it is the client's data); noise-started chains only once they
        ran the checkpoint's default number of steps.
        """
        defaults = (self.sampler.step_size, self.sampler.noise, self.sampler.temperature)
        if (order.step_size, order.noise, order.temperature) != defaults:
            return False
        return order.init == "buffer" or (order.init == "noise" and order.steps >= self.sampler.steps)

    def _finish(self, job: Job) -> None:
        state: ChainState = job.state
        samples = state.x.detach().clamp(*self.data_range).cpu()
        if self._worth_keeping(state.order):
            self.buffer.write_back(state.slots, samples)
            self.buffer_dirty = True
        else:
            self.buffer.release(state.slots)
        now = self.clock()
        state.deliver(
            SampleResult(
                samples=samples,
                energy=state.energy.cpu(),
                frames=state.frames,
                frame_steps=state.frame_steps,
                queue_seconds=job.admitted_at - job.arrived,
                run_seconds=now - job.admitted_at,
            )
        )


class GeneratorPool(SamplerPool):
    """One-shot samplers, GAN generators and flow inverses: requests for one model that arrive within a
    short window run as one batch. Latents come from the same counter-based noise as Langevin chains,
    so a seeded request gets the same images whatever shares its batch."""

    def __init__(
        self,
        model: ServedModel,
        chain_budget: int,
        window_s: float,
        device: torch.device,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(model.name, chain_budget, device, metrics, clock)
        self.family = model.family
        self.module = model.members[0].module
        self.shape = model.members[0].shape
        self.data_range = model.members[0].data_range
        self.window_s = window_s
        self.latent_dim = (
            model.members[0].sampler_as(GANSampler).latent_dim if self.family == "gan" else math.prod(self.shape)
        )

    def _latents(self, seeds: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Base samples [B, latent] scaled by each request's temperature [B, 1]."""
        if self.family == "flow":
            return self.module.base_sample(seeds, scale)
        return latent_gaussian(seeds, self.latent_dim) * scale

    def _decode(
        self, latents: torch.Tensor, keep_states: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """Images [B, *shape] (unclamped), the inverse's intermediate states if asked for (flows), and
        bits/dim (flows, from the same inverse pass)."""
        if self.family == "gan":
            return self.module(latents), [], None
        images, log_prob, states = self.module.decode(latents, keep_states)
        return images, states, bits_per_dim(log_prob, self.latent_dim)

    def make_job(
        self, order: SampleOrder, deliver: Deliver, deadline: float, arrived: float, on_frame: FrameSink | None = None
    ) -> Job:
        return Job(
            n=order.n, steps=1, deadline=deadline, arrived=arrived, state=ChainState(order, deliver, [0], on_frame)
        )

    def seconds_until_due(self) -> float:
        waiting = self.scheduler.waiting
        if not waiting:
            return 0.25
        return max(0.0, self.window_s - (self.clock() - waiting[0].arrived))

    def has_work(self) -> bool:
        """Work is due once the oldest request has waited the window, or the waiting ones fill the budget."""
        waiting = self.scheduler.waiting
        if not waiting:
            return False
        full = sum(job.n for job in waiting) >= self.scheduler.chain_budget
        return full or self.clock() - waiting[0].arrived >= self.window_s

    def step(self) -> None:
        """Run every admitted request through the generator in one batch."""
        plan = self.scheduler.schedule()
        self._drop(plan.dropped)
        if not plan.running:
            return
        for job in plan.admitted:
            self.metrics.queue_seconds.labels(self.name).observe(job.admitted_at - job.arrived)
        # Requests that want a trajectory decode apart, so an iterative inverse (i-ResNet) keeps its
        # iterates for those samples only.
        groups = [
            [job for job in plan.running if bool(job.state.order.trajectory_every) == wants] for wants in (False, True)
        ]
        stepped = []
        for jobs in groups:
            if jobs and self._run_batch(jobs, keep_states=bool(jobs[0].state.order.trajectory_every)):
                stepped += jobs
        self.scheduler.update_from_output(stepped)

    def _run_batch(self, jobs: list[Job], keep_states: bool) -> bool:
        """Decode one batch and answer its requests; False when the device failed it (answered 503)."""
        orders = [job.state.order for job in jobs]
        try:
            seeds = torch.cat([chain_seeds(order.seed, order.n) for order in orders])
            scale = torch.cat([torch.full((order.n, 1), order.temperature) for order in orders])
            with torch.no_grad():
                images, states, bits = self._decode(self._latents(seeds, scale).to(self.device), keep_states)
        except Exception as error:  # one failed batch must not take the worker down
            log.exception("generator batch of %d requests failed on %s", len(jobs), self.name)
            self.scheduler.finish(jobs)
            for job in jobs:
                job.state.deliver(WorkerFailure(f"sampling failed on the device: {type(error).__name__}"))
            return False
        self._record_step(len(jobs), len(seeds))
        now = self.clock()
        low, high = self.data_range
        sizes = [order.n for order in orders]
        bit_parts = bits.cpu().split(sizes) if bits is not None else [None] * len(sizes)
        parts = zip(jobs, images.clamp(low, high).cpu().split(sizes), bit_parts, strict=True)
        offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
        for index, (job, part, part_bits) in enumerate(parts):
            state: ChainState = job.state
            if keep_states:
                trajectory = states or [images]
                state.order.steps = len(trajectory)  # a flow's "steps" are the states of its inverse
                for frame, states_of_all in evenly_spaced(trajectory, state.order.max_frames):
                    mine = states_of_all[offsets[index] : offsets[index + 1]].clamp(low, high)
                    state.keep_frame(frame, mine, None)
            state.deliver(
                SampleResult(
                    samples=part,
                    energy=None,
                    bits_per_dim=part_bits,
                    frames=state.frames,
                    frame_steps=state.frame_steps,
                    queue_seconds=job.admitted_at - job.arrived,
                    run_seconds=now - job.admitted_at,
                )
            )
        return True


class Worker:
    """Owns the device; loops over the pools, stepping each that has work, and saves buffers.

    Submissions land in an inbox that the worker thread drains before each round, so the HTTP side
    never waits for a Langevin step to finish.
    """

    def __init__(
        self,
        registry: Registry,
        store: BufferStore,
        device: torch.device,
        metrics: Metrics,
        chain_budget: int,
        max_queue: int,
        save_interval_s: float,
        batch_window_s: float = 0.005,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.store = store
        self.device = device
        self.metrics = metrics
        self.max_queue = max_queue
        self.save_interval_s = save_interval_s
        self.clock = clock
        self.pools: dict[str, SamplerPool] = {}
        for name, group in registry.groups.items():
            buffer = store.load(name, group.digest, group.members[0].shape) or group.initial_buffer()
            self.pools[name] = LangevinPool(group, buffer, chain_budget, device, metrics, clock)
            metrics.buffer_size.labels(name).set(len(buffer))
        for name, model in registry.models.items():
            if model.family in ("gan", "flow"):
                self.pools[name] = GeneratorPool(model, chain_budget, batch_window_s, device, metrics, clock)
        self._inbox: list[tuple[LangevinPool, Job]] = []
        self._inbox_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_save = clock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_depth(self) -> int:
        return len(self._inbox) + sum(len(pool.scheduler.waiting) for pool in self.pools.values())

    def submit(self, order: SampleOrder, deliver: Deliver, deadline: float, on_frame: FrameSink | None = None) -> Job:
        """Queue an order (thread-safe, never waits for the device); QueueFull when the queue is full.

        The caller may set `cancelled` on the returned job; its chains are dropped at the next step.
        """
        if not self.running or self._stop.is_set():
            raise WorkerFailure("the device worker is not running")
        pool = self.pools[order.model.pool]
        job = pool.make_job(order, deliver, deadline, self.clock(), on_frame)
        with self._inbox_lock:
            if self.queue_depth() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._inbox.append((pool, job))
        self._wake.set()
        return job

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="device-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; the worker thread answers what is queued and saves the buffers."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        else:
            self.save_buffers()

    def _drain_inbox(self) -> None:
        with self._inbox_lock:  # moved under the lock, so queue_depth() never misses a job in transit
            arrivals, self._inbox = self._inbox, []
            refused = []
            for pool, job in arrivals:
                try:
                    pool.scheduler.add(job)
                except ValueError as error:  # the HTTP layer checks this first; never let it stop the worker
                    refused.append((job, error))
        for job, error in refused:
            job.state.deliver(WorkerFailure(str(error)))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before draining: a submit from now on wakes the next wait
            self._drain_inbox()
            busy = False
            for pool in self.pools.values():
                if pool.has_work():
                    busy = True
                    try:
                        pool.step()
                    except Exception as error:  # outside one batch (start, finish): fail this pool's jobs only
                        log.exception("pool %s failed; failing its requests", pool.name)
                        pool.fail_all(f"sampling failed on the device: {type(error).__name__}")
                    self.metrics.running_chains.labels(pool.name).set(pool.scheduler.running_chains)
            self.metrics.queue_depth.set(self.queue_depth())
            if self.clock() - self.last_save >= self.save_interval_s:
                self.save_buffers()
            if not busy:
                self._wake.wait(timeout=min([0.25, *(pool.seconds_until_due() for pool in self.pools.values())]))
        # Shutting down: nobody will run what is queued; answer it, then save from this thread, which
        # is the only one that ever touches the buffers.
        self._drain_inbox()
        for pool in self.pools.values():
            pool.fail_all("the server is shutting down; retry on the next instance")
        self.save_buffers()

    def save_buffers(self) -> None:
        """Write every buffer that changed since its last save (atomically; see BufferStore)."""
        self.last_save = self.clock()
        for name, pool in self.pools.items():
            if pool.buffer is None or not pool.buffer_dirty:
                continue
            pool.buffer_dirty = False
            try:
                self.store.save(name, pool.group.digest, pool.buffer)
            except OSError:
                log.exception("saving the replay buffer of %s failed; will retry", name)
                pool.buffer_dirty = True
            self.metrics.buffer_size.labels(name).set(len(pool.buffer))
