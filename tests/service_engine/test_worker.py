"""The device worker driven round by round with a fake clock: no threads, no sleeps."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_tiny_ebm, write_tiny_eqm, write_tiny_gan
from engine_bench import Bench, FakeClock

from service.catalogue.buffer_store import BufferStore
from service.catalogue.registry import load_registry
from service.engine.messages import ChainDiverged, Frame, SampleResult
from service.engine.pools.chain import FINITE_CHECK_STEPS
from service.engine.worker import Worker
from service.http.orders import make_order
from service.http.schemas import SampleRequest
from service.metrics import Metrics
from service.settings import Settings

WINDOW_S = 0.5  # binary fractions, so the fake clock's sums are exact


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors")
    write_tiny_gan(models / "gan.safetensors")
    write_tiny_eqm(models / "digits.safetensors")
    clock = FakeClock()
    registry = load_registry(models, torch.device("cpu"))
    store = BufferStore(tmp_path / "state")
    worker = Worker(registry, store, torch.device("cpu"), Metrics(), 64, 16, 1e9, WINDOW_S, clock=clock)
    return Bench(worker, registry, clock)


def test_generator_requests_within_the_window_share_one_batch(bench: Bench) -> None:
    first = bench.submit(model="gan", n=2, seed=1)
    bench.clock.now += 0.25
    second = bench.submit(model="gan", n=3, seed=2)
    assert not bench.worker.run_once() and not first  # the window is still open
    assert bench.worker.seconds_until_due() == 0.25
    bench.clock.now += 0.25
    assert bench.worker.run_once()
    assert bench.result(first).samples.shape == (2, 1, 28, 28) and bench.result(second).steps == 1
    stats = bench.worker.pools["gan"].stats
    assert stats == {"steps": 1, "chain_steps": 5, "max_jobs_in_step": 2, "max_chains_in_step": 5}
    late = bench.submit(model="gan", seed=3)  # after the batch ran: waits for a window of its own
    bench.clock.now += WINDOW_S
    bench.worker.run_once()
    assert bench.result(late).samples.shape == (1, 1, 28, 28) and stats["steps"] == 2


def test_freed_memory_goes_back_once_each_time_the_work_runs_out(bench: Bench) -> None:
    """The worker asks for a trim (the app's malloc_trim, service/http/memory.py) in the first round after its
    chains run out: never while any request runs or waits, and once per load, not once per idle round."""
    trims: list[int] = []
    bench.worker.on_idle = lambda: trims.append(bench.worker.pools["solo"].stats["steps"])
    assert not bench.worker.run_once() and trims == []  # idle from the start: nothing was freed
    long = bench.submit(model="solo", n=2, steps=4, seed=1, init="noise")
    short = bench.submit(model="solo", n=3, steps=2, seed=2, init="noise")
    while not long:
        assert bench.worker.run_once() and trims == []  # the short request's end leaves the long one running
    assert short and not bench.worker.run_once() and trims == [4]  # the round after the last step
    for _ in range(3):
        bench.worker.run_once()
    assert trims == [4]
    waiting = bench.submit(model="gan", seed=3)  # a one-shot request waits out its batch window: not idle
    bench.worker.run_once()
    bench.clock.now += WINDOW_S
    assert bench.worker.run_once() and waiting and trims == [4]
    assert not bench.worker.run_once() and trims == [4, 4]


def test_a_request_joins_running_chains_at_the_next_step(bench: Bench) -> None:
    pool = bench.worker.pools["solo"]
    long = bench.submit(model="solo", n=2, steps=6, seed=1, init="noise")
    bench.worker.run_once()
    bench.worker.run_once()
    short = bench.submit(model="solo", n=3, steps=2, seed=2, init="noise")
    bench.worker.run_once()  # the short request's first step is the long one's third
    assert pool.stats["max_jobs_in_step"] == 2 and pool.stats["max_chains_in_step"] == 5
    bench.worker.run_once()
    assert bench.result(short).steps == 2 and not long
    while not long:
        bench.worker.run_once()
    assert bench.result(long).steps == 6 and pool.stats["steps"] == 6
    assert pool.stats["chain_steps"] == 2 * 6 + 3 * 2


def test_a_seeded_request_gives_the_same_images_alone_and_in_a_shared_batch(bench: Bench) -> None:
    pool = bench.worker.pools["solo"]
    request = {"model": "solo", "n": 3, "steps": 5, "seed": 1234, "init": "noise", "momentum": 0.5}
    alone = bench.submit(**request)
    while not alone:
        bench.worker.run_once()
    assert pool.stats["max_jobs_in_step"] == 1
    crowd = bench.submit(model="solo", n=4, steps=8, seed=7, init="noise", step_size=3.0)
    bench.worker.run_once()
    together = bench.submit(**request)
    while not together:
        bench.worker.run_once()
    assert pool.stats["max_jobs_in_step"] == 2 and pool.stats["max_chains_in_step"] == 7  # it did share a step
    assert torch.allclose(bench.result(alone).samples, bench.result(together).samples, atol=1e-5, rtol=0)
    while not crowd:  # the crowd's longer chains finish after the shared steps
        bench.worker.run_once()
    assert bench.result(crowd).samples.shape == (4, 1, 28, 28)
    other = bench.submit(**{**request, "seed": 1235})
    while not other:
        bench.worker.run_once()
    assert not torch.allclose(bench.result(alone).samples, bench.result(other).samples)


def test_seeded_ddls_chains_are_the_same_alone_and_in_a_shared_batch_and_as_the_cli_draws_them(
    bench: Bench,
) -> None:
    from training.runtime.draw import sample_generator
    from training.sampling.noise import chain_seeds

    pool = bench.worker.pools["gan:ddls"]
    request = {"model": "gan", "n": 3, "steps": 6, "seed": 4321, "step_size": 0.05, "noise": 0.2}
    alone = bench.submit(**request)
    while not alone:
        bench.worker.run_once()
    assert pool.stats["max_jobs_in_step"] == 1
    bench.submit(model="gan", n=4, steps=9, seed=8, step_size=0.01, temperature=0.7)
    bench.worker.run_once()
    together = bench.submit(**request)
    while not together:
        bench.worker.run_once()
    assert pool.stats["max_jobs_in_step"] == 2 and pool.stats["max_chains_in_step"] == 7  # it did share a step
    samples = bench.result(alone).samples
    assert torch.allclose(samples, bench.result(together).samples, atol=1e-5, rtol=0)
    assert bench.result(alone).steps == 6 and bench.result(alone).energy is not None
    model = bench.registry.models["gan"].members[0]
    model.sampler = dataclasses.replace(model.sampler, step_size=0.05, noise=0.2)
    cli = sample_generator(model, chain_seeds(4321, 3), steps=6).clamp(-1, 1)
    assert torch.allclose(samples, cli, atol=1e-5, rtol=0)
    plain = bench.submit(model="gan", n=3, seed=4321)  # 0 steps: the one-pass pool, not the chains
    bench.clock.now += WINDOW_S  # its batching window closes
    while not plain:
        bench.worker.run_once()
    assert not torch.allclose(samples, bench.result(plain).samples)
    assert bench.worker.pools["gan"].stats["steps"] == 1


def test_a_zero_noise_chain_is_served_the_same_bytes_without_its_draws_as_with_them_and_as_the_cli(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.engine.pools import langevin
    from training.families import draw_samples
    from training.sampling.noise import chain_seeds

    request = {"model": "digits", "n": 3, "steps": 6, "seed": 99, "label": 4}  # its sampler's noise is 0

    def served() -> torch.Tensor:
        answers = bench.submit(**request)
        while not answers:
            bench.worker.run_once()
        return bench.result(answers).samples

    skipped = served()
    drew: list[float] = []

    def always(noise: float, x: torch.Tensor) -> bool:  # as before the skip: every step draws
        drew.append(noise)
        return True

    with monkeypatch.context() as patch:
        patch.setattr(langevin, "draws_noise", always)
        drawn = served()
    assert drew == [0.0] * 6
    assert skipped.numpy().tobytes() == drawn.numpy().tobytes()
    member = bench.registry.models["digits"].members[0]
    cli = draw_samples(member, chain_seeds(99, 3), 6, "noise", labels=torch.full((3,), 4))
    assert skipped.numpy().tobytes() == cli.clamp(*member.data_range).numpy().tobytes()


def test_a_labelled_chain_is_the_same_alone_and_beside_other_labels_and_settings(bench: Bench) -> None:
    pool = bench.worker.pools["digits"]
    request = {"model": "digits", "n": 2, "steps": 5, "seed": 99, "label": 3}
    alone = bench.submit(**request)
    while not alone:
        bench.worker.run_once()
    crowd = bench.submit(model="digits", n=3, steps=9, seed=1, label=8, step_size=0.02, momentum=0.3, guidance=3.0)
    unlabelled = bench.submit(model="digits", n=1, steps=9, seed=2)
    bench.worker.run_once()
    together = bench.submit(**request)
    while not together:
        bench.worker.run_once()
    assert pool.stats["max_jobs_in_step"] == 3 and pool.stats["max_chains_in_step"] == 6  # one shared step
    assert torch.allclose(bench.result(alone).samples, bench.result(together).samples, atol=1e-5, rtol=0)
    other_label = bench.submit(**{**request, "label": 4})
    while not other_label:
        bench.worker.run_once()
    assert not torch.allclose(bench.result(alone).samples, bench.result(other_label).samples)
    while not (crowd and unlabelled):
        bench.worker.run_once()
    assert bench.result(crowd).samples.shape == (3, 1, 28, 28)
    assert bench.result(unlabelled).steps == 9


def test_buffer_figures_are_a_snapshot_published_by_the_worker(bench: Bench) -> None:
    before = bench.worker.buffers["solo"]
    assert (before.size, before.capacity) == (32, 64)
    answers = bench.submit(model="solo", n=4, steps=10, seed=1, init="noise")  # the checkpoint's steps: kept
    while not answers:
        bench.worker.run_once()
    assert before.size == 32 and bench.worker.buffers["solo"].size == 36


def test_cancelled_and_late_requests_are_answered_and_give_back_their_slots(bench: Bench) -> None:
    body = SampleRequest(model="solo", n=2, steps=50, seed=1, init="buffer")
    order = asyncio.run(make_order(body, bench.registry.models["solo"], Settings(), streaming=False))
    answers: list[SampleResult | BaseException] = []
    handle = bench.worker.submit(order, answers.append, bench.clock.now + 60)
    bench.worker.run_once()
    handle.cancel()
    bench.worker.run_once()
    assert type(answers[0]).__name__ == "CancelledByClient"
    late = bench.submit(model="solo", n=2, steps=50, seed=2, init="buffer")
    bench.worker.run_once()
    bench.clock.now += 61
    bench.worker.run_once()
    assert isinstance(late[0], TimeoutError)
    assert not bench.worker.langevin_pools["solo"].buffer.in_use.any()


def test_chains_that_go_non_finite_between_checks_end_before_any_answer_or_frame_of_theirs(bench: Bench) -> None:
    """The finite check runs every FINITE_CHECK_STEPS steps and on every step whose states go out: chains that turn NaN
    at their second step end with ChainDiverged (a 422) at the next check, never answered or streamed."""
    pool = bench.worker.pools["solo"]
    healthy = pool.modules[0]
    batches = 0

    def nan_from_the_second_step(x: torch.Tensor) -> torch.Tensor:  # [B]
        nonlocal batches
        batches += 1
        return healthy(x) * (float("nan") if batches >= 2 else 1.0)

    def answer(on_frame: Callable[[Frame], None] | None = None, **fields: Any) -> SampleResult | BaseException:
        nonlocal batches
        batches = 0
        answers = bench.submit(on_frame=on_frame, model="solo", n=3, seed=1, init="noise", **fields)
        while not answers:
            bench.worker.run_once()
        return answers[0]

    pool.modules[0] = nan_from_the_second_step
    steps = pool.stats["steps"]
    long = answer(steps=3 * FINITE_CHECK_STEPS)
    assert isinstance(long, ChainDiverged) and f"by step {FINITE_CHECK_STEPS} of" in str(long)
    assert pool.stats["steps"] - steps == FINITE_CHECK_STEPS  # it stepped on to the next check, no further
    short = answer(steps=FINITE_CHECK_STEPS - 3)  # no check on the way: its last step is one
    assert isinstance(short, ChainDiverged) and f"by step {FINITE_CHECK_STEPS - 3} of" in str(short)
    frames: list[Frame] = []
    streamed = answer(frames.append, steps=3 * FINITE_CHECK_STEPS, trajectory_every=3)  # a frame's step is a check
    assert isinstance(streamed, ChainDiverged) and "by step 3 of" in str(streamed)
    assert [frame.step for frame in frames] == [0] and frames[0].x.isfinite().all()


class TimedEnergy(torch.nn.Module):
    """An energy as it is, with the fake clock advanced by what its batch costs: a big network on a CPU, whose cost
    per chain is least near 8 chains (issue 39's 3 x 128² ResNet, a hundred times faster)."""

    def __init__(self, energy: torch.nn.Module, clock: FakeClock) -> None:
        super().__init__()
        self.energy, self.clock = energy, clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chains = len(x)
        self.clock.now += (0.134 + 0.0297 * chains + 0.00144 * chains**2) / 100
        return self.energy(x)


def test_a_pool_whose_cost_per_chain_rises_with_the_batch_serves_8_requests_at_least_as_fast_as_one(
    bench: Bench,
) -> None:
    pool = bench.worker.pools["solo"]
    pool.modules = [TimedEnergy(module, bench.clock) for module in pool.modules]
    request = {"model": "solo", "n": 4, "steps": 100, "init": "noise"}
    started = bench.clock.now
    alone = bench.submit(**request, seed=1)
    while not alone:
        bench.worker.run_once()
    alone_rate = 4 * 100 / (bench.clock.now - started)
    started = bench.clock.now
    answers = [bench.submit(**request, seed=seed) for seed in range(8)]
    while not all(answers):
        bench.worker.run_once()
    together_rate = 8 * 4 * 100 / (bench.clock.now - started)
    # From 4 chains a step (one request alone) it grew while cheaper a chain (8), measured the bucket above (16),
    # then settled on 8 chains a step: never all 32 at once.
    assert pool.scheduler.batch == 8 and pool.stats["max_chains_in_step"] == 16
    assert together_rate >= 1.1 * alone_rate
    assert torch.equal(bench.result(answers[1]).samples, bench.result(alone).samples)  # the same chains, batched
