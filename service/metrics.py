"""Prometheus metrics, one registry per app so several apps (tests) never share counters."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

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
        self.steps_per_chain = Histogram(
            "samplebay_steps_per_chain",
            "Langevin steps each answered EBM chain ran (fewer than asked where it stopped at its tolerance)",
            ["pool"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.steps = StepMetrics()  # what every step adds: read when /metrics is scraped
        r.register(self.steps)
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
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # what the worker sets, by labels: none is removed
        self._running: dict[str, int] = {}  # the running chains shown, by pool

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


class StepTally:
    """What one pool's steps add to /metrics, as plain numbers the worker thread adds to (StepMetrics reads them)."""

    def __init__(self) -> None:
        self.steps = 0  # batched steps
        self.chain_steps = 0  # chains x steps: also the chains-per-step histogram's sum
        self.chains_counts = [0] * (len(CHAIN_BUCKETS) + 1)  # steps by the CHAIN_BUCKETS bucket of their chains, +Inf
        self.cost: dict[str, float] = {}  # seconds a chain by chain bucket ("1", "2-3", ...): the latest of each

    def step(self, chains: int) -> None:
        """One step of `chains` chains."""
        self.steps += 1
        self.chain_steps += chains
        self.chains_counts[bisect.bisect_left(CHAIN_BUCKETS, chains)] += 1


class StepMetrics:
    """The pools' step metrics, a Prometheus collector over their tallies: a step adds to plain numbers, and /metrics
    turns them into samples when it is scraped. Prometheus's own metric objects take a lock on every update; the four
    a step made (two counters, a histogram, a gauge) cost 15 to 20 µs on a shared core, a tenth of the engine's own
    cost a step at 4 chains (docs/buffers-and-scale.md). A scrape on another thread reads numbers the worker thread
    may be adding to: each is read whole (the GIL), and a step's may show in one and not yet in another."""

    def __init__(self) -> None:
        self.tallies: dict[str, StepTally] = {}  # by pool name (a replaced version's steps go on its name's)

    def tally(self, pool: str) -> StepTally:
        """The tally of `pool`'s steps, made on first use."""
        tally = self.tallies.get(pool)
        if tally is None:
            tally = self.tallies[pool] = StepTally()
        return tally

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        return self._families(dict(self.tallies))

    @staticmethod
    def _families(tallies: dict[str, StepTally]) -> Iterator[Metric]:
        steps = CounterMetricFamily("samplebay_langevin_steps", "Batched Langevin steps executed", labels=["pool"])
        chain_steps = CounterMetricFamily(
            "samplebay_chain_steps", "Chain-steps executed (chains x steps)", labels=["pool"]
        )
        chains = HistogramMetricFamily(
            "samplebay_chains_per_step", "Chains advanced together in one step", labels=["pool"]
        )
        cost = GaugeMetricFamily(
            "samplebay_step_cost_per_chain_seconds",
            "What a pool's step costs a chain, by the chains it advances (buckets 1, 2-3, 4-7, ...): the median of"
            " its recent timed steps there (the scheduler picks each step's batch and weighs long requests beside"
            " short ones by it)",
            labels=["pool", "chains"],
        )
        for pool, tally in tallies.items():
            steps.add_metric([pool], tally.steps)
            chain_steps.add_metric([pool], tally.chain_steps)
            bounds = [*map(floatToGoString, CHAIN_BUCKETS), "+Inf"]
            counts = itertools.accumulate(list(tally.chains_counts))
            chains.add_metric([pool], list(zip(bounds, counts, strict=True)), sum_value=tally.chain_steps)
            for bucket, per_chain in dict(tally.cost).items():
                cost.add_metric([pool, bucket], per_chain)
        yield from (steps, chain_steps, chains, cost)
