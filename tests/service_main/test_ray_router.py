"""The Ray router's choice, decided without a cluster: a request naming its model goes first to a replica running
that model with budget left (by its routing stats, or because this router just sent it one), else to two drawn
at random. The cluster test (tests/service_main/test_ray_engine.py) shows it end to end; this one cannot flake
under load."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from service.ray_engine import ModelAffinityRouter


def replica(name: str, chains: int = 0, budget: int = 64) -> SimpleNamespace:
    stats = {"models": {"digits": {"chains": chains, "budget": budget}}} if chains else {"models": {}}
    return SimpleNamespace(replica_id=name, routing_stats=stats)


def request(model: str, loop: asyncio.AbstractEventLoop) -> SimpleNamespace:
    return SimpleNamespace(
        metadata=SimpleNamespace(multiplexed_model_id=model),
        routing_context=SimpleNamespace(should_backoff=False),
        future=loop.create_future(),
    )


def router() -> ModelAffinityRouter:
    chooser = object.__new__(ModelAffinityRouter)  # its Ray wiring is not what is tested here
    chooser.initialize_state()
    return chooser


def test_a_request_goes_first_to_the_replica_running_its_model_while_it_has_budget() -> None:
    async def ranks() -> None:
        loop = asyncio.get_running_loop()
        chooser = router()
        idle, busy, full = replica("idle"), replica("busy", chains=8), replica("full", chains=64, budget=64)
        first, drawn = await chooser.choose_replicas([idle, busy, full], request("digits", loop))
        assert first == [busy] and len(drawn) == 2  # full has no budget left for it; the others are the fallback
        (only,) = await chooser.choose_replicas([idle, full], request("digits", loop))
        assert len(only) == 2  # nobody runs it with budget: power of two choices
        (unnamed,) = await chooser.choose_replicas([idle, busy], request("", loop))
        assert len(unnamed) == 2  # no model named: routed by load alone

    asyncio.run(ranks())


def test_a_replica_this_router_just_sent_the_model_to_counts_before_its_stats_say_so() -> None:
    async def ranks() -> None:
        loop = asyncio.get_running_loop()
        chooser = router()
        a, b = replica("a"), replica("b")
        sent = request("digits", loop)
        await chooser.choose_replicas([a, b], sent)
        sent.future.set_result(SimpleNamespace(replica_id="b"))  # Ray Serve put it on b
        await asyncio.sleep(0)  # the done callback runs
        first, _ = await chooser.choose_replicas([a, b], request("digits", loop))
        assert first == [b]

    asyncio.run(ranks())
