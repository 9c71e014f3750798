"""The worker's replay buffers in one place: the slots the one buffer budget grants each group, the saved
buffer a new pool starts from, saves handed to the saver's thread and their outcome taken back, and the
read-only figures /models shows. Only the worker thread calls it (service/engine/worker.py)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from service.catalogue.budgets import BufferBudget, BufferGrant
from service.catalogue.buffer_store import BUFFER_DTYPE, BufferSaver, BufferStore
from service.catalogue.registry import BufferGroup
from service.engine.pools.langevin import LangevinPool
from training.runtime.draw import buffer_capacity, pooled_buffer
from training.sampling.replay_buffer import ReplayBuffer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BufferFigures:
    """A replay buffer as /models shows it; published by the worker thread, read by any thread."""

    size: int
    capacity: int
    nbytes: int = 0  # memory its slots hold
    note: str | None = None  # why it holds fewer slots than its model asks for (the buffer budget), if it does


class FailureLog:
    """Each kind of failure logged once while it lasts (with its traceback) and once when it is over, so a
    failure that repeats at every step or save does not flood the log."""

    def __init__(self) -> None:
        self.failing: set[str] = set()

    def failed(self, what: str, error: BaseException) -> None:
        if what in self.failing:
            log.debug("%s failed again (%s: %s)", what, type(error).__name__, error)
            return
        self.failing.add(what)
        log.error("%s failed (%s: %s); logged once while it lasts", what, type(error).__name__, error, exc_info=error)

    def recovered(self, what: str) -> None:
        if what in self.failing:
            self.failing.discard(what)
            log.info("%s works again", what)


class BufferKeeper:
    def __init__(self, store: BufferStore, budget: BufferBudget | None, failures: FailureLog) -> None:
        self.store = store
        self.budget = budget or BufferBudget(2**62)
        self.failures = failures
        self.saver = BufferSaver()  # buffers are written on its thread; steps never wait for a save
        self._saving: dict[str, LangevinPool] = {}  # saves under way: NAME@DIGEST -> the pool saved
        self._shown_writes = 0  # the pools' write-backs when `figures` last ran

    def buffer_for(self, group: BufferGroup) -> tuple[ReplayBuffer, str | None]:
        """A new pool's buffer: the one saved under the group's digest (a new version: its checkpoints'), within
        the slots the budget grants it, and why it holds fewer than asked if it does."""
        shape = group.members[0].shape
        if group.has_buffer:
            wanted = buffer_capacity(group.members)
            grant = self.budget.grant(group.name, wanted, ReplayBuffer.slot_bytes(shape, BUFFER_DTYPE))
        else:  # trained without one (EqM): its chains never write back, so it holds no slots
            grant = BufferGrant(0, 0)
        if grant.reason:
            log.warning("the replay buffer of %s is %s", group.name, grant.reason)
        saved = self._saved_buffer(group, grant.capacity) if grant.capacity else None
        return saved or pooled_buffer(group.members, grant.capacity, BUFFER_DTYPE), grant.reason

    def _saved_buffer(self, group: BufferGroup, capacity: int) -> ReplayBuffer | None:
        """The group's buffer from the state directory, or None; a store that raises costs only that buffer."""
        try:
            return self.store.load(group.name, group.digest, group.members[0].shape, capacity, BUFFER_DTYPE)
        except Exception as error:
            log.warning(
                "could not read the saved replay buffer of %s (%s); starting from the checkpoint's", group.name, error
            )
            return None

    def start_save(self, name: str, pool: LangevinPool) -> None:
        """Hand the buffer to the saver's thread; chains written back from now on make it dirty again."""
        key = f"{name}@{pool.group.digest}"
        if self.saver.submit(key, functools.partial(self.store.save, name, pool.group.digest, pool.buffer)):
            self._saving[key] = pool
            pool.buffer_dirty = False  # set again if the save fails (collect)

    def start_saves(self, pools: Iterable[object], attempt: Callable[..., bool]) -> None:
        """Start saving every buffer among `pools` that changed since its last save (a failed save stays dirty)."""
        for pool in pools:
            if isinstance(pool, LangevinPool) and pool.buffer_dirty:
                attempt(f"starting to save the replay buffer of {pool.name}", self.start_save, pool.name, pool)

    def collect(self, wait: bool = False) -> None:
        """Take in the outcome of finished saves (with `wait`: of all under way): a failed one stays dirty."""
        for key, future in self.saver.finished(wait):
            pool = self._saving.pop(key)
            what = f"saving the replay buffer of {pool.name}"
            try:
                saved = future.result()  # the store reports an unwritable directory itself (once): False
            except Exception as error:
                self.failures.failed(what, error)
                pool.buffer_dirty = True
                continue
            self.failures.recovered(what)
            pool.buffer_dirty = pool.buffer_dirty or not saved

    def written_since_figures(self, pools: Mapping[str, LangevinPool]) -> bool:
        """Whether a buffer took chains back since `figures` last ran (only a write-back changes its figures)."""
        return sum(pool.buffer_writes for pool in pools.values()) != self._shown_writes

    def figures(self, pools: Mapping[str, LangevinPool]) -> Mapping[str, BufferFigures]:
        """A fresh read-only snapshot, so readers on other threads never see one half-built."""
        self._shown_writes = sum(pool.buffer_writes for pool in pools.values())
        figures = {
            name: BufferFigures(len(pool.buffer), pool.buffer.capacity, pool.buffer.nbytes, pool.buffer_note)
            for name, pool in pools.items()
        }
        return MappingProxyType(figures)
