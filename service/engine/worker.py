"""The device worker: one thread owns the device and every model's weights and steps the pools.

The HTTP side calls `submit` (thread-safe, never waits for the device) and keeps the `Handle` it gets
back; answers come back through the order's callbacks, which the caller makes thread-safe (the app hands
in `loop.call_soon_threadsafe`). What the HTTP side may read of the worker's state (`buffers`) is a
snapshot the worker thread publishes.

Models change while it runs (service/catalogue/model_watch.py): `replace_registry` hands it a new registry, which it
swaps in between steps, building the pools of new versions and keeping replaced ones until the requests
admitted on them are answered (service/engine/pools/pool_set.py); only then do new requests see it (served_models.py).

The worker never stops for one request or one file: a pool step, a buffer save, a publish, taking in
requests and shutting down each fail only what they concern, and each kind of failure is logged once
while it lasts. Whatever gets past those guards ends the thread; `stopped_by` then says why, every
waiting request is answered, and the server process exits non-zero (service/__main__.py) so that its
supervisor restarts it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import Any, TypeVar

import torch

from service.catalogue.budgets import BufferBudget, DeviceBudget
from service.catalogue.buffer_store import BufferStore
from service.catalogue.registry import VERSION_CHARS, BufferGroup, Registry, ServedModel, refusal
from service.catalogue.served_models import ServedModels
from service.engine.buffer_keeper import BufferFigures, BufferKeeper, FailureLog
from service.engine.messages import Deliver, FrameSink, Handle, Order, QueueFull, ScoreOrder, WorkerFailure
from service.engine.pools.base import SamplerPool
from service.engine.pools.chain import ChainPool
from service.engine.pools.generator import GeneratorPool
from service.engine.pools.langevin import LangevinPool
from service.engine.pools.latent import LatentPool, pool_name
from service.engine.pools.ode import OdePool
from service.engine.pools.pool_set import PoolPlan, PoolSet
from service.engine.pools.score import (
    SCORE_PASS_IMAGES,
    LikelihoodPool,
    OnePassScorePool,
    ScorePool,
    score_pool_name,
    scores_inputs,
)
from service.engine.scheduler import IDLE_SECONDS, Job
from service.metrics import Metrics
from training.sampling.scoring import LikelihoodSettings, score_family

Chains = TypeVar("Chains", bound=ChainPool)

log = logging.getLogger(__name__)


class Worker:
    """Owns the device; loops over the pools, stepping each that has work, and saves buffers."""

    def __init__(
        self,
        registry: Registry,
        store: BufferStore,
        device: torch.device,
        metrics: Metrics,
        chain_budget: int,
        max_queue: int,
        save_interval_s: float,
        batch_window_s: float,
        clock: Callable[[], float] = time.monotonic,
        step_budget: int | None = None,  # the most chains a chain pool's step advances; None: the chain budget
        served: ServedModels | None = None,  # what requests see; published here once a new registry's pools exist
        sampling_dtype: torch.dtype = torch.float32,  # what chain pools step in (training/runtime/device.py)
        buffer_budget: BufferBudget | None = None,  # bytes for every replay buffer; None: no limit
        likelihood: LikelihoodSettings | None = None,  # a CNF's likelihood solves for POST /score
        device_budget: DeviceBudget | None = None,  # bytes for the chain pools' chains; None: no limit
        on_idle: Callable[[], None] | None = None,  # called once each time the work runs out (the app's malloc trim)
        score_memory: Callable[[], AbstractContextManager[None]] | None = None,  # one-pass score passes run in it
    ) -> None:
        self.score_memory = score_memory
        self.device_budget = device_budget or DeviceBudget(None)
        self.on_idle, self._worked = on_idle or (lambda: None), False  # _worked: a pool stepped since it last ran
        self.likelihood = likelihood or LikelihoodSettings()
        self.store, self.device, self.metrics, self.clock = store, device, metrics, clock
        self.chain_budget, self.max_queue = chain_budget, max_queue
        self.save_interval_s, self.batch_window_s = save_interval_s, batch_window_s
        self.step_budget, self.sampling_dtype = step_budget, sampling_dtype  # batches are chosen below the budget
        self.failures = FailureLog()
        self.buffer_keeper = BufferKeeper(store, buffer_budget, self.failures)
        self.stopped_by: BaseException | None = None  # what ended the worker thread past every guard
        self._pools = PoolSet()
        registry, wanted, pools = self._build(registry)
        self._pools.swap(wanted, pools)
        self.served = served or ServedModels(registry)
        self.served.registry = registry  # not published yet: the models whose pools could be built
        self._pending: list[tuple[Registry, threading.Event]] = []  # registries handed over, not yet swapped in
        self.buffers: Mapping[str, BufferFigures] = MappingProxyType({})
        self._publish_buffers()
        self._inbox: list[tuple[SamplerPool, Job]] = []
        self._inbox_lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.last_save = clock()
        self._shown_depth = -1  # the queue depth /metrics shows (-1: none yet)

    @property
    def pools(self) -> dict[str, SamplerPool]:
        """The pools of the models served now, by pool name (replaced versions still finishing are not here)."""
        return self._pools.current

    @property
    def langevin_pools(self) -> dict[str, LangevinPool]:
        return {name: pool for name, pool in self._pools.current.items() if isinstance(pool, LangevinPool)}

    def _wanted_pools(self, registry: Registry) -> dict[str, PoolPlan]:
        """Every pool `registry` needs: pool name -> (the key its requests lease, how to build it)."""
        wanted: dict[str, PoolPlan] = {}
        for name, group in registry.groups.items():
            wanted[name] = (f"{name}@{group.digest[:VERSION_CHARS]}", functools.partial(self._langevin_pool, group))
        builders = {"ode": self._ode_pool, "one_pass": self._generator_pool, "ddls": self._latent_pool}
        for model in registry.models.values():
            for kind in model.kind.pools(model.members[0]):  # "langevin": its buffer group's pool, above
                if kind in builders:
                    wanted[pool_name(model, kind)] = (model.pool_key, functools.partial(builders[kind], model))
            if scores_inputs(model):  # POST /score: its inputs' energies, likelihoods or critic values
                wanted[score_pool_name(model)] = (model.pool_key, functools.partial(self._score_pool, model))
        return wanted

    def _pools_of(self, model: ServedModel) -> set[str]:
        """The names of the pools `model`'s requests run in (_wanted_pools)."""
        pools = {pool_name(model, kind) for kind in model.kind.pools(model.members[0])}
        return pools | ({score_pool_name(model)} if scores_inputs(model) else set())

    def _build(self, registry: Registry) -> tuple[Registry, dict[str, PoolPlan], dict[str, SamplerPool]]:
        """The pools `registry` needs, built (or kept); a pool that cannot be built fails only the models that run
        in it: they are left out of the registry served, each with the reason in /readyz, and the others swap in."""
        wanted = self._wanted_pools(registry)
        pools, failed = self._pools.plan(wanted)
        if not failed:
            return registry, wanted, pools
        models, refused = {}, dict(registry.refused)
        for name, model in registry.models.items():
            broken = sorted(self._pools_of(model) & set(failed))
            if not broken:
                models[name] = model
                continue
            error = failed[broken[0]]
            refused[name] = refusal(ValueError(f"{name} is not served: its pool could not be built ({error})"))
            log.warning("%s", refused[name])
        groups = {name: group for name, group in registry.groups.items() if name not in failed}
        registry = Registry(models, groups, refused)
        wanted = self._wanted_pools(registry)  # a subset of what was planned, under the same keys
        return registry, wanted, {name: pools[name] for name in wanted}

    def _score_pool(self, model: ServedModel) -> ScorePool:
        common = (self.chain_budget, self.device, self.metrics, self.clock)
        if score_family(model.members[0]).one_pass:
            passes = self.step_budget or (SCORE_PASS_IMAGES if self.device.type == "cpu" else None)
            return OnePassScorePool(
                model, *common, window_s=self.batch_window_s, pass_images=passes, memory=self.score_memory
            )
        return LikelihoodPool(model, self.likelihood, *common)

    def _langevin_pool(self, group: BufferGroup) -> LangevinPool:
        """A buffer group's pool, its buffer from the keeper: saved under its digest, within the budget's grant."""
        buffer, note = self.buffer_keeper.buffer_for(group)
        pool = LangevinPool(group, buffer, self.chain_budget, self.device, self.metrics, self.clock)
        pool.buffer_note = note
        return self._stepping(pool)

    def _ode_pool(self, model: ServedModel) -> OdePool:
        return self._stepping(OdePool(model, self.chain_budget, self.device, self.metrics, self.clock))

    def _generator_pool(self, model: ServedModel) -> GeneratorPool:
        return GeneratorPool(model, self.chain_budget, self.batch_window_s, self.device, self.metrics, self.clock)

    def _latent_pool(self, model: ServedModel) -> LatentPool:
        return self._stepping(LatentPool(model, self.chain_budget, self.device, self.metrics, self.clock))

    def _stepping(self, pool: Chains) -> Chains:
        """A chain pool with the worker's step budget, device budget and sampling dtype."""
        pool.scheduler.step_budget = pool.scheduler.batch = self.step_budget or self.chain_budget
        pool.scheduler.device, pool.scheduler.step_bytes = self.device_budget, pool.step_bytes
        pool.dtype = self.sampling_dtype
        return pool

    def replace_registry(self, registry: Registry) -> threading.Event:
        """Hand over the models to serve from now on (thread-safe); the event is set once they are served."""
        served = threading.Event()
        with self._inbox_lock:
            self._pending.append((registry, served))
        self._wake.set()
        return served

    def _swap_in_pending(self) -> None:
        """Swap in the newest registry handed over: build its new pools, retire replaced ones, then publish."""
        with self._inbox_lock:
            pending, self._pending = self._pending, []  # not empty: run_once calls this when it is not
        registry, wanted, pools = self._build(pending[-1][0])  # may read saved buffers: outside the lock
        with self._inbox_lock:  # submit looks pools up under this lock
            retired = self._pools.swap(wanted, pools)
        for pool in retired:
            log.info("%s: a replaced version finishes its requests, then is dropped", pool.name)
        self.buffer_keeper.budget.retain(self.langevin_pools)
        self._publish_buffers()
        self.served.publish(registry)
        for _, served in pending:
            served.set()

    def _drop_finished_pools(self) -> None:
        """Drop the replaced versions that no request holds or waits for any more, saving their buffers."""

        def busy(key: str, pool: SamplerPool) -> bool:
            if self.served.held(key):  # held first: once it is not, no request can still submit to it
                return True
            with self._inbox_lock:
                waiting = any(queued is pool for queued, _ in self._inbox)
            return waiting or bool(pool.scheduler.waiting or pool.scheduler.running)

        for pool in self._pools.drop_finished(busy):
            self.buffer_keeper.start_saves([pool], self._attempt)
            log.info("%s: the replaced version answered its last request and was dropped", pool.name)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.stopped_by is None

    @property
    def stop_reason(self) -> str:
        """Why the worker does not run, as a client or /healthz is told."""
        if self.stopped_by is not None:
            error = self.stopped_by
            return f"the device worker stopped ({type(error).__name__}: {error}); the server restarts, retry shortly"
        return "the device worker is not running"

    def queue_depth(self) -> int:
        return len(self._inbox) + sum(len(pool.scheduler.waiting) for pool in self._pools.all())

    def submit(self, order: Order, deliver: Deliver, deadline: float, on_frame: FrameSink | None = None) -> Handle:
        """Queue an order (thread-safe); QueueFull when the queue is full, WorkerFailure once stopped.

        Orders submitted before `start` wait in the inbox (tests drive the loop with `run_once`).
        """
        if isinstance(order, ScoreOrder):
            name = score_pool_name(order.model)
        else:
            name = pool_name(order.model, order.model.kind.pool_for(order.model.members[0], order.steps))
        handle = Handle(deadline)
        with self._inbox_lock:  # checked under the lock the last drain takes: no job is left unanswered
            if self._stop.is_set() or self.stopped_by is not None or (self._thread and not self._thread.is_alive()):
                raise WorkerFailure(self.stop_reason)
            pool = self._pools.find(name, order.model.pool_key)  # the version the order was made for
            if pool is None:  # only an order made without a lease (served_models.py) can come too late
                raise WorkerFailure(f"{order.model.name} version {order.model.version} is no longer served; retry")
            if self.queue_depth() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._inbox.append((pool, pool.make_job(order, deliver, handle, on_frame)))  # TooLarge: never fits
        self._wake.set()
        return handle

    def device_limits(self, model: ServedModel) -> dict[str, int] | None:
        """What the device budget allows `model`'s sampling requests (GET /models; ChainPool.device_limits)."""
        pools = [self.pools.get(name) for name in sorted(self._pools_of(model))]
        chains = [pool for pool in pools if isinstance(pool, ChainPool)]
        return max(chains, key=lambda pool: pool.step_bytes).device_limits() if chains else None

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
            self._shut_down()

    def _drain_inbox(self) -> None:
        if not self._inbox:  # read without the lock: an order queued after this is taken at the next round
            return
        with self._inbox_lock:  # moved under the lock, so queue_depth() never misses a job in transit
            arrivals, self._inbox = self._inbox, []
            refused = []
            for pool, job in arrivals:
                try:
                    pool.scheduler.add(job)
                except ValueError as error:  # the HTTP layer checks this first; never let it stop the worker
                    refused.append((pool, job, str(error)))
                except Exception as error:
                    self.failures.failed(f"queueing requests for {pool.name}", error)
                    refused.append((pool, job, f"the request could not be queued: {type(error).__name__}"))
        for pool, job, reason in refused:
            self._attempt(f"answering refused requests of {pool.name}", pool.fail, [job], reason)

    def _attempt(self, what: str, action: Callable[..., object], *args: Any) -> bool:
        """Run one guarded part of the worker's work: False (logged once while it lasts) when it raised."""
        try:
            action(*args)
        except Exception as error:
            self.failures.failed(what, error)
            return False
        self.failures.recovered(what)
        return True

    def _step(self, pool: SamplerPool) -> bool:
        """Step the pool if it has work (whether it had); a pool that raises fails its own requests only."""
        try:
            if not pool.has_work():
                return False
            pool.step()
            self.metrics.show_running(pool.name, pool.scheduler.running_chains)
        except Exception as error:  # outside one batch (start, finish): fail this pool's jobs only
            self.failures.failed(f"stepping {pool.name} (its requests fail)", error)
            self._attempt(f"failing the requests of {pool.name}", pool.fail_all, error)
            return True
        self.failures.recovered(f"stepping {pool.name} (its requests fail)")
        return True

    def run_once(self) -> bool:
        """One round: take in new orders, step every pool that has work, save buffers when due; whether any pool
        stepped. The worker thread loops over this; tests call it directly."""
        if self._pending:  # read without the lock: one handed over after this is swapped in at the next round
            self._attempt("swapping in the models handed over", self._swap_in_pending)
        self._drain_inbox()
        busy = False
        pools = self._pools.all()  # a CNF's likelihood solves (long) step only in rounds no other pool has work
        for pool in [pool for pool in pools if not isinstance(pool, LikelihoodPool)]:
            busy = self._step(pool) or busy
        for pool in [pool for pool in pools if isinstance(pool, LikelihoodPool)] if not busy else []:
            busy = self._step(pool) or busy
        if self._pools.retired:
            self._attempt("dropping replaced versions", self._drop_finished_pools)
        depth = self.queue_depth()
        if depth != self._shown_depth:  # a gauge set takes a lock: only when the depth changed
            self.metrics.queue_depth.set(depth)
            self._shown_depth = depth
        if busy and self.buffer_keeper.written_since_figures(self.langevin_pools):
            self._attempt("publishing the buffer figures", self._publish_buffers)
        self.buffer_keeper.collect()
        if self._worked and not busy and not depth:  # no chains left: memory the steps freed goes back
            self._attempt("returning freed memory", self.on_idle)
        self._worked = busy or (self._worked and depth > 0)
        if self.clock() - self.last_save >= self.save_interval_s:
            self.save_buffers()
        return busy

    def seconds_until_due(self) -> float:
        return min([IDLE_SECONDS, *(pool.seconds_until_due() for pool in self._pools.all())])

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()  # before draining: a submit from now on wakes the next wait
                if not self.run_once():
                    self._wake.wait(timeout=self.seconds_until_due())
        except BaseException as error:  # past every guard: say so, answer what waits, let the process end
            with self._inbox_lock:
                self.stopped_by = error
            log.critical(
                "the device worker stopped (%s: %s): every request now fails with 503, and the server exits "
                "so that its supervisor restarts it",
                type(error).__name__,
                error,
                exc_info=error,
            )
            self._shut_down(self.stop_reason)
            return
        self._shut_down()

    def _shut_down(self, reason: str = "the server is shutting down; retry on the next instance") -> None:
        """Nobody will run what is queued: answer it, then save from this thread (the buffers' only user)."""
        self._attempt("taking in the last requests", self._drain_inbox)
        for pool in self._pools.all():
            self._attempt(f"answering the requests of {pool.name}", pool.fail_all, reason)
        self.save_buffers(wait=True)  # a save under way ends first; one that failed is tried once more

    def _publish_buffers(self) -> None:
        """Swap in a fresh read-only snapshot of the buffers' figures for readers on other threads."""
        self.buffers = self.buffer_keeper.figures(self.langevin_pools)
        for name, each in self.buffers.items():
            self.metrics.buffer_size.labels(name).set(each.size)

    def save_buffers(self, wait: bool = False) -> None:
        """Start saving every buffer that changed since its last save, on the saver's thread (atomically; see
        BufferStore); with `wait`, the saves under way end first and it returns once every buffer is saved."""
        if wait:
            self.buffer_keeper.collect(wait=True)
        self.last_save = self.clock()
        self.buffer_keeper.start_saves(self._pools.all(), self._attempt)  # a replaced version's too, by its digest
        if wait:
            self.buffer_keeper.collect(wait=True)
        self._attempt("publishing the buffer figures", self._publish_buffers)
