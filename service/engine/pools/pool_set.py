"""The worker's pools across model versions: those that serve the registry published now, by pool name, and
replaced ones that finish the requests admitted on their version before they are dropped.

Each pool is known by its pool name ("solo", "pair", "gan:ddls") and the key requests lease
(service/catalogue/served_models.py): the served pool and its version, "pair@3f2a9c01b7de". A registry swapped in keeps
every pool whose key is unchanged (its chains, buffer and batches go on untouched), builds the others, and
retires the pools it no longer names; the worker thread alone calls everything here but `find`, which the
HTTP side calls under the worker's inbox lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from service.engine.pools.base import SamplerPool

log = logging.getLogger(__name__)

PoolPlan = tuple[str, Callable[[], SamplerPool]]  # the key requests lease, and how to build the pool


class PoolSet:
    def __init__(self) -> None:
        self.current: dict[str, SamplerPool] = {}  # pool name -> the pool of the version served now
        self.keys: dict[str, str] = {}  # pool name -> its lease key (pool@version)
        self.retired: list[tuple[str, SamplerPool]] = []  # (lease key, pool) of replaced versions still finishing

    def all(self) -> list[SamplerPool]:
        """Every pool that may have work: the current ones, then the retired ones."""
        return [*self.current.values(), *(pool for _, pool in self.retired)]

    def plan(self, wanted: Mapping[str, PoolPlan]) -> tuple[dict[str, SamplerPool], dict[str, Exception]]:
        """The pools for `wanted` (pool name -> plan): the current pool where its key is unchanged, else a new
        one; and the pools whose build raised, with why. Nothing changes yet, and a pool that cannot be built
        costs only that pool: the worker serves the others (worker.py `_build`)."""
        pools: dict[str, SamplerPool] = {}
        failed: dict[str, Exception] = {}
        for name, (key, build) in wanted.items():
            try:
                pools[name] = self.current[name] if self.keys.get(name) == key else build()
            except Exception as error:
                failed[name] = error
        return pools, failed

    def swap(self, wanted: Mapping[str, PoolPlan], pools: dict[str, SamplerPool]) -> list[SamplerPool]:
        """Serve from `pools` (built by `plan`) and retire the current pools not among them; the retired ones."""
        retiring = [(self.keys[name], pool) for name, pool in self.current.items() if pools.get(name) is not pool]
        self.retired.extend(retiring)
        self.current, self.keys = pools, {name: key for name, (key, _) in wanted.items()}
        return [pool for _, pool in retiring]

    def find(self, name: str, key: str) -> SamplerPool | None:
        """The pool named `name` of the version `key` names: current, or retired and still finishing."""
        if self.keys.get(name) == key:
            return self.current[name]
        return next((pool for held, pool in self.retired if held == key and pool.name == name), None)

    def drop_finished(self, busy: Callable[[str, SamplerPool], bool]) -> list[SamplerPool]:
        """Forget the retired pools that `busy(key, pool)` says are done with; the pools dropped."""
        dropped = [(key, pool) for key, pool in self.retired if not busy(key, pool)]
        self.retired = [entry for entry in self.retired if entry not in dropped]
        return [pool for _, pool in dropped]
