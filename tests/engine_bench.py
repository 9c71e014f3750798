"""The device worker driven round by round with a fake clock (no threads, no sleeps), for the engine's tests."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from conftest import write_tiny_ebm

from service.catalogue.buffer_store import BufferStore
from service.catalogue.registry import Registry, load_registry
from service.engine.messages import Frame, FrameSink, SampleResult
from service.engine.pools import langevin
from service.engine.worker import Worker
from service.http.orders import make_order
from service.http.schemas import SampleRequest
from service.metrics import Metrics
from service.settings import Settings
from training.sampling.langevin import chain_moves


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Bench:
    worker: Worker
    registry: Registry
    clock: FakeClock

    def submit(self, on_frame: FrameSink | None = None, **fields) -> list[SampleResult | BaseException]:
        """Submit a request as the app does (the same request -> order path); its answer lands in the list.
        With `on_frame` it is streamed: its frames go there as they are made."""
        body = SampleRequest(**fields)
        streaming = on_frame is not None
        order = asyncio.run(make_order(body, self.registry.models[body.model], Settings(), streaming=streaming))
        answers: list[SampleResult | BaseException] = []
        self.worker.submit(order, answers.append, self.clock.now + 60, on_frame)
        return answers

    def streamed(self, **fields) -> tuple[SampleResult, list[Frame]]:
        """A request run until answered, streamed: its answer and its frames, whose states [n, *shape] stay in
        float32 (an answer that is not streamed keeps its frames as 8-bit pixels, SampleResult.frames)."""
        frames: list[Frame] = []
        answers = self.submit(on_frame=frames.append, **fields)
        while not answers:
            self.worker.run_once()
        return self.result(answers), frames

    def result(self, answers: list[SampleResult | BaseException]) -> SampleResult:
        assert len(answers) == 1 and isinstance(answers[0], SampleResult), answers
        return answers[0]


StepBytes = Callable[[torch.nn.Module, tuple[int, ...], torch.device], int]  # langevin.step_bytes's signature


def worker_bench(
    models: Path,
    state: Path,
    chain_budget: int = 64,
    step_bytes: StepBytes | None = None,
    window_s: float = 0.5,
    **options: Any,
) -> Bench:
    """A worker over the model files in `models`, on the CPU, with a fake clock: `chain_budget` chains a pool, and
    `options` as the Worker takes them (device_budget, sampling_dtype, ...). `step_bytes` stands in for the Langevin
    pools' probe of what a chain's step needs (service/engine/pools/langevin.py) while they are built."""
    clock = FakeClock()
    registry = load_registry(models, torch.device("cpu"))
    with mock.patch.object(langevin, "step_bytes", step_bytes or langevin.step_bytes):
        worker = Worker(
            registry, BufferStore(state), torch.device("cpu"), Metrics(), chain_budget, 16, 1e9, window_s, clock,
            **options,
        )  # fmt: skip
    return Bench(worker, registry, clock)


def solo_bench(tmp_path: Path, chain_budget: int = 64, step_bytes: StepBytes | None = None, **options: Any) -> Bench:
    """worker_bench over one tiny EBM, "solo" (tests/conftest.py), in `tmp_path`."""
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors")
    return worker_bench(models, tmp_path / "state", chain_budget, step_bytes, **options)


def tolerance_that_spreads(frames: list[torch.Tensor]) -> tuple[float, list[int]]:
    """A tolerance between two measured moves (far from any) at which the chains stop at different steps, and
    the step each chain stops at: the first whose move is below it (else the last)."""
    moves = torch.stack([chain_moves(before, after) for before, after in itertools.pairwise(frames)])
    values = sorted(set(moves.flatten().tolist()))
    best: tuple[int, float, list[int]] = (0, 0.0, [])
    for low, high in itertools.pairwise(values):
        if high - low < 1e-3 * high:
            continue  # too near a measured move: float noise of another batch could decide it
        tolerance = (low + high) / 2
        below = moves < tolerance  # [steps, n]
        stops = [int(below[:, c].nonzero()[0]) + 1 if below[:, c].any() else len(moves) for c in range(moves.shape[1])]
        spread = len(set(stops)) - (max(stops) == len(moves))
        if spread > best[0]:
            best = (spread, tolerance, stops)
    assert best[0] >= 2, f"the tiny EBM's chains do not spread out: {moves}"
    return best[1], best[2]
