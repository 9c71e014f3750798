"""Prometheus metrics, one registry per app so several apps (tests) never share counters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from service.catalogue.registry import Registry

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STEP_BUCKETS = (1, 5, 10, 20, 30, 35, 40, 45, 50, 60, 80, 100, 200, 500, 1000)
CHAIN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "samplebay_requests", "POST /sample requests by model and HTTP status", ["model", "status"], registry=r
        )
        self.latency_seconds = Histogram(
            "samplebay_request_latency_seconds",
            "Time from request to response",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "samplebay_queue_seconds",
            "Time a request waited before its chains ran",
            ["pool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("samplebay_queue_depth", "Requests waiting for the worker", registry=r)
        self.running_chains = Gauge("samplebay_running_chains", "Langevin chains running now", ["pool"], registry=r)
        self.langevin_steps = Counter(
            "samplebay_langevin_steps", "Batched Langevin steps executed", ["pool"], registry=r
        )
        self.chain_steps = Counter(
            "samplebay_chain_steps", "Chain-steps executed (chains x steps)", ["pool"], registry=r
        )
        self.chains_per_step = Histogram(
            "samplebay_chains_per_step",
            "Chains advanced together in one step",
            ["pool"],
            buckets=CHAIN_BUCKETS,
            registry=r,
        )
        self.steps_per_chain = Histogram(
            "samplebay_steps_per_chain",
            "Langevin steps each answered EBM chain ran (fewer than asked where it stopped at its tolerance)",
            ["pool"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.step_cost = Gauge(
            "samplebay_step_cost_per_chain_seconds",
            "What a pool's step costs a chain, by the chains it advances (buckets 1, 2-3, 4-7, ...): the median of"
            " its recent timed steps there (the scheduler picks each step's batch and weighs long requests beside"
            " short ones by it)",
            ["pool", "chains"],
            registry=r,
        )
        self.buffer_size = Gauge("samplebay_buffer_size", "Samples in each replay buffer", ["pool"], registry=r)
        self.model_loaded = Gauge(
            "samplebay_model_loaded_timestamp_seconds",
            "When each served model's version was loaded (Unix time); the version is its file's digest prefix",
            ["model", "version"],
            registry=r,
        )
        self.model_scans = Counter(
            "samplebay_model_scans", "Scans of the models directory (polls and POST /models/reload)", registry=r
        )
        self.model_changes = Counter(
            "samplebay_model_changes",
            "Model files added, replaced, removed, or failed to load, by the scans of the live models directory",
            ["outcome"],
            registry=r,
        )
        self._shown: set[tuple[str, str]] = set()  # (model, version) label pairs model_loaded holds now
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # what a step sets, by labels: none is removed
        self._running: dict[str, int] = {}  # the running chains shown, by pool

    def observe_step(self, pool: str, chains: int) -> None:
        self._child(self.langevin_steps, pool).inc()
        self._child(self.chain_steps, pool).inc(chains)
        self._child(self.chains_per_step, pool).observe(chains)

    def observe_chain_steps(self, pool: str, steps: list[int]) -> None:
        """The steps each chain of an answered request ran."""
        histogram = self._child(self.steps_per_chain, pool)
        for taken in steps:
            histogram.observe(taken)

    def show_running(self, pool: str, chains: int) -> None:
        """The chains a pool holds, set when they changed (the worker shows them after every step)."""
        if self._running.get(pool) != chains:
            self._child(self.running_chains, pool).set(chains)
            self._running[pool] = chains

    def show_step_cost(self, pool: str, table: dict[str, float]) -> None:
        for chains, per_chain in table.items():
            self._child(self.step_cost, pool, chains).set(per_chain)

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: a step sets several (labels() takes a lock and checks them)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def show_models(self, registry: Registry) -> None:
        """Each served model's version and load time, with the label pairs of versions no longer served removed."""
        shown = set()
        for model in registry.models.values():
            if model.loaded_at is not None:
                self.model_loaded.labels(model.name, model.version).set(model.loaded_at.timestamp())
                shown.add((model.name, model.version))
        for labels in self._shown - shown:
            self.model_loaded.remove(*labels)
        self._shown = shown
