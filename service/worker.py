"""The device worker: one thread owns the device and every model's weights and steps the pools.

The HTTP side calls `submit` (thread-safe, never waits for the device) and keeps the `Handle` it gets
back; answers come back through the order's callbacks, which the caller makes thread-safe (the app hands
in `loop.call_soon_threadsafe`). What the HTTP side may read of the worker's state (`buffers`) is a
snapshot the worker thread publishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from service.buffer_store import BufferStore
from service.generator_pool import GeneratorPool
from service.langevin_pool import LangevinPool
from service.latent_pool import LatentPool, latent_pool_name, runs_in_latent_pool
from service.messages import Deliver, FrameSink, Handle, QueueFull, SampleOrder, WorkerFailure
from service.metrics import Metrics
from service.pools import SamplerPool
from service.registry import Registry
from service.scheduler import IDLE_SECONDS, Job, default_step_budget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BufferFigures:
    """A replay buffer as /models shows it; published by the worker thread, read by any thread."""

    size: int
    capacity: int


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
        step_budget: int | None = None,  # chains per Langevin step; None: the device's default
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.max_queue = max_queue
        self.save_interval_s = save_interval_s
        self.clock = clock
        self.pools: dict[str, SamplerPool] = {}
        self.langevin_pools: dict[str, LangevinPool] = {}
        for name, group in registry.groups.items():
            buffer = store.load(name, group.digest, group.members[0].shape) or group.initial_buffer()
            self.pools[name] = self.langevin_pools[name] = LangevinPool(
                group, buffer, chain_budget, device, metrics, clock
            )
            self.langevin_pools[name].scheduler.step_budget = step_budget or default_step_budget(
                device.type, chain_budget
            )
        for name, model in registry.models.items():
            if model.family in ("gan", "flow"):
                self.pools[name] = GeneratorPool(model, chain_budget, batch_window_s, device, metrics, clock)
            if model.family == "gan" and model.members[0].critic is not None:  # DDLS chains
                latent = LatentPool(model, chain_budget, device, metrics, clock)
                latent.scheduler.step_budget = step_budget or default_step_budget(device.type, chain_budget)
                self.pools[latent.name] = latent
        self.buffers: Mapping[str, BufferFigures] = MappingProxyType({})
        self._publish_buffers()
        self._inbox: list[tuple[SamplerPool, Job]] = []
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

    def submit(
        self, order: SampleOrder, deliver: Deliver, deadline: float, on_frame: FrameSink | None = None
    ) -> Handle:
        """Queue an order (thread-safe); QueueFull when the queue is full, WorkerFailure once stopped.

        Orders submitted before `start` wait in the inbox (tests drive the loop with `run_once`).
        """
        if self._stop.is_set() or (self._thread is not None and not self._thread.is_alive()):
            raise WorkerFailure("the device worker is not running")
        pool = self.pools[latent_pool_name(order.model) if runs_in_latent_pool(order) else order.model.pool]
        handle = Handle(deadline)
        job = pool.make_job(order, deliver, handle, on_frame)
        with self._inbox_lock:
            if self.queue_depth() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._inbox.append((pool, job))
        self._wake.set()
        return handle

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
        with self._inbox_lock:  # moved under the lock, so queue_depth() never misses a job in transit
            arrivals, self._inbox = self._inbox, []
            refused = []
            for pool, job in arrivals:
                try:
                    pool.scheduler.add(job)
                except ValueError as error:  # the HTTP layer checks this first; never let it stop the worker
                    refused.append((pool, job, str(error)))
        for pool, job, reason in refused:
            pool.fail([job], reason)

    def run_once(self) -> bool:
        """One round: take in new orders, step every pool that has work, save buffers when due.

        Returns whether any pool stepped. The worker thread loops over this; tests call it directly.
        """
        self._drain_inbox()
        busy = False
        for pool in self.pools.values():
            if not pool.has_work():
                continue
            busy = True
            try:
                pool.step()
            except Exception as error:  # outside one batch (start, finish): fail this pool's jobs only
                log.exception("pool %s failed; failing its requests", pool.name)
                pool.fail_all(error)
            self.metrics.running_chains.labels(pool.name).set(pool.scheduler.running_chains)
        self.metrics.queue_depth.set(self.queue_depth())
        if busy:
            self._publish_buffers()
        if self.clock() - self.last_save >= self.save_interval_s:
            self.save_buffers()
        return busy

    def seconds_until_due(self) -> float:
        return min([IDLE_SECONDS, *(pool.seconds_until_due() for pool in self.pools.values())])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before draining: a submit from now on wakes the next wait
            if not self.run_once():
                self._wake.wait(timeout=self.seconds_until_due())
        self._shut_down()

    def _shut_down(self) -> None:
        """Nobody will run what is queued: answer it, then save from this thread (the buffers' only user)."""
        self._drain_inbox()
        for pool in self.pools.values():
            pool.fail_all("the server is shutting down; retry on the next instance")
        self.save_buffers()

    def _publish_buffers(self) -> None:
        """Swap in a fresh read-only snapshot, so readers on other threads never see one half-built."""
        figures = {
            name: BufferFigures(len(pool.buffer), pool.buffer.capacity) for name, pool in self.langevin_pools.items()
        }
        self.buffers = MappingProxyType(figures)
        for name, each in figures.items():
            self.metrics.buffer_size.labels(name).set(each.size)

    def save_buffers(self) -> None:
        """Write every buffer that changed since its last save (atomically; see BufferStore)."""
        self.last_save = self.clock()
        for name, pool in self.langevin_pools.items():
            if not pool.buffer_dirty:
                continue
            # A failed save (the store logs why) stays dirty, so it is retried once the directory is writable.
            pool.buffer_dirty = not self.store.save(name, pool.group.digest, pool.buffer)
        self._publish_buffers()
