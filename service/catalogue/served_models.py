"""The registry requests are served from, and the model versions requests still hold.

The live models directory (service/catalogue/model_watch.py) makes a new registry whenever a file is added, replaced
or removed; the worker builds the pools it needs and only then publishes it here, so a request never picks
a version that has no pool yet. A request leases its model for as long as it runs: a replaced version's
pool is dropped only once it has no work and no request holds that version, so a request that picked the
old version just before the swap still finds its pool when it reaches the worker.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from service.catalogue.registry import Registry, ServedModel


class ServedModels:
    """What HTTP requests see of the models: the registry last published, and who holds which version."""

    def __init__(self, registry: Registry, on_publish: Callable[[Registry], None] | None = None) -> None:
        self.registry = registry
        self.on_publish = on_publish  # told of each registry published (the app's state, the metrics)
        self._lock = threading.Lock()
        self._holds: Counter[str] = Counter()  # pool key (pool@version) -> requests holding it

    @contextmanager
    def lease(self, name: str) -> Iterator[ServedModel | None]:
        """The model served as `name` now (None when there is none), held until the block ends."""
        with self._lock:
            model = self.registry.models.get(name)
            if model is not None:
                self._holds[model.pool_key] += 1
        try:
            yield model
        finally:
            if model is not None:
                with self._lock:
                    self._holds[model.pool_key] -= 1
                    if not self._holds[model.pool_key]:
                        del self._holds[model.pool_key]

    def held(self, pool_key: str) -> bool:
        """Whether a request still holds that version of a pool (it may be on its way to the worker)."""
        with self._lock:
            return self._holds[pool_key] > 0

    def publish(self, registry: Registry) -> None:
        """Serve new requests from `registry` (the worker calls this once its pools are built)."""
        with self._lock:
            self.registry = registry
        if self.on_publish is not None:
            self.on_publish(registry)
