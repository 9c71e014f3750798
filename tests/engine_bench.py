"""The device worker driven round by round with a fake clock (no threads, no sleeps), for the engine's tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from service.catalogue.registry import Registry
from service.engine.messages import SampleResult
from service.engine.worker import Worker
from service.http.orders import make_order
from service.http.schemas import SampleRequest
from service.settings import Settings


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

    def submit(self, **fields) -> list[SampleResult | BaseException]:
        """Submit a request as the app does (the same request -> order path); its answer lands in the list."""
        body = SampleRequest(**fields)
        order = asyncio.run(make_order(body, self.registry.models[body.model], Settings(), streaming=False))
        answers: list[SampleResult | BaseException] = []
        self.worker.submit(order, answers.append, self.clock.now + 60)
        return answers

    def result(self, answers: list[SampleResult | BaseException]) -> SampleResult:
        assert len(answers) == 1 and isinstance(answers[0], SampleResult), answers
        return answers[0]
