"""The per-chain stop (`tolerance`): a chain stops once its RMS move in a step falls below it, leaves the batch,
and its place goes to waiting work; seeded chains stop where their fixed-step path says, alone, batched and
in the CLI; tolerance 0 is the fixed-step sampler, bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import httpx
import pytest
import torch
from conftest import write_tiny_ebm, write_tiny_gan
from engine_bench import Bench, FakeClock, solo_bench, tolerance_that_spreads, worker_bench
from server import metric, running_server

from service.engine.messages import Handle
from service.engine.scheduler import ChainScheduler, Job
from service.settings import Settings
from training.commands.cli import main
from training.commands.set_sampler import set_sampler
from training.runtime.checkpoint import load_checkpoint
from training.runtime.draw import sample_ebm
from training.sampling.langevin import langevin_step
from training.sampling.noise import chain_gaussian, chain_seeds, chain_start
from training.sampling.sampler_config import EBMSampler

STEPS = 12
REQUEST = {"model": "solo", "n": 4, "steps": STEPS, "seed": 5, "init": "noise"}


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    return solo_bench(tmp_path)


def run_until_answered(bench: Bench, answers: list) -> None:
    for _ in range(10 * STEPS):
        if answers:
            return
        bench.worker.run_once()
    raise AssertionError("no answer")


def test_a_seeded_chain_stops_where_its_fixed_path_arrives_alone_batched_and_in_the_cli(bench: Bench) -> None:
    frames = [frame.x for frame in bench.streamed(**REQUEST, trajectory_every=1)[1]]  # [STEPS + 1] [n, 1, 28, 28]
    tolerance, stops = tolerance_that_spreads(frames)
    expected = torch.stack([frames[stop][chain] for chain, stop in enumerate(stops)])

    alone = bench.submit(**REQUEST, tolerance=tolerance)
    run_until_answered(bench, alone)
    assert bench.result(alone).chain_steps == stops and bench.result(alone).steps == max(stops)
    torch.testing.assert_close(bench.result(alone).samples, expected, atol=1e-5, rtol=0)

    pool = bench.worker.pools["solo"]
    crowd = bench.submit(model="solo", n=3, steps=3 * STEPS, seed=9, init="noise", momentum=0.5)
    bench.worker.run_once()
    together = bench.submit(**REQUEST, tolerance=tolerance)
    run_until_answered(bench, together)
    assert pool.stats["max_jobs_in_step"] == 2 and not crowd  # it shared steps with chains that run on
    assert bench.result(together).chain_steps == stops
    torch.testing.assert_close(bench.result(together).samples, bench.result(alone).samples, atol=1e-5, rtol=0)

    member = copy.copy(bench.registry.models["solo"].members[0])
    member.sampler = dataclasses.replace(member.sampler_as(EBMSampler), tolerance=tolerance)
    seeds = chain_seeds(REQUEST["seed"], REQUEST["n"])
    taken = torch.zeros(len(seeds), dtype=torch.int64)
    drawn = sample_ebm([member], seeds, STEPS, "noise", chain_steps=taken)
    assert taken.tolist() == stops
    torch.testing.assert_close(drawn, expected, atol=1e-5, rtol=0)


def test_tolerance_zero_is_the_fixed_step_sampler_bit_for_bit(bench: Bench) -> None:
    member = bench.registry.models["solo"].members[0]
    sampler = member.sampler_as(EBMSampler)
    seeds = chain_seeds(3, 5)
    x = chain_start(seeds, member.shape, sampler, member.data_range)
    with torch.no_grad():
        for step in range(STEPS):  # the fixed-step loop as it was before the stop existed
            eps = chain_gaussian(seeds, torch.full_like(seeds, step), member.shape)
            x = langevin_step(member.module, x, eps, sampler.step_size, sampler.noise, sampler.grad_clip).x
    taken = torch.zeros(5, dtype=torch.int64)
    assert torch.equal(sample_ebm([member], seeds, STEPS, "noise", chain_steps=taken), x)
    assert taken.tolist() == [STEPS] * 5

    answers = [bench.submit(**REQUEST, **extra) for extra in ({}, {"tolerance": 0.0})]
    for each in answers:
        run_until_answered(bench, each)
    default, zero = (bench.result(each) for each in answers)
    assert torch.equal(default.samples, zero.samples) and zero.chain_steps == [STEPS] * 4


def test_a_stopped_chain_gives_its_place_to_a_waiting_request_at_the_next_step() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=4, clock=clock)
    first = Job(n=4, steps=STEPS, handle=Handle(100.0), arrived=0.0)
    waiting = Job(n=1, steps=STEPS, handle=Handle(100.0), arrived=0.0)
    scheduler.add(first)
    scheduler.add(waiting)
    plan = scheduler.schedule()
    assert plan.running == [first] and list(scheduler.waiting) == [waiting]
    first.stopped = 1  # the pool saw one chain arrive in this step
    assert scheduler.update_from_output(plan.running) == []
    plan = scheduler.schedule()
    assert plan.admitted == [waiting] and plan.running == [first, waiting]  # the freed chain's place, at once
    assert scheduler.running_chains == 4
    first.stopped = 4
    assert scheduler.update_from_output(plan.running) == [first]  # all its chains stopped: answered early


def test_a_request_whose_chains_all_stop_frees_its_slots_for_the_next_step(tmp_path: Path) -> None:
    bench = solo_bench(tmp_path, chain_budget=4)
    pool = bench.worker.pools["solo"]
    early = bench.submit(**REQUEST, tolerance=10.0)  # every move is below 10: each chain stops after one step
    later = bench.submit(**{**REQUEST, "seed": 6})
    bench.worker.run_once()
    assert bench.result(early).chain_steps == [1] * 4 and bench.result(early).steps == 1 and not later
    bench.worker.run_once()  # the waiting request's chains run in the very next step
    assert pool.scheduler.running[0].done_steps == 1 and pool.stats["chain_steps"] == 8


def test_chain_steps_stopped_frames_and_the_histogram_through_http(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors")
    write_tiny_gan(models / "gan.safetensors")
    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu")
    with running_server(settings) as (base, _):
        body = {"model": "solo", "n": 3, "steps": 6, "seed": 1, "init": "noise", "format": "json"}
        fixed = httpx.post(f"{base}/sample", json=body, timeout=60).json()
        assert fixed["chain_steps"] == [6, 6, 6] and fixed["steps"] == 6
        early = httpx.post(f"{base}/sample", json={**body, "tolerance": 10.0}, timeout=60).json()
        assert early["chain_steps"] == [1, 1, 1] and early["steps"] == 1
        assert metric(base, 'samplebay_steps_per_chain_count{pool="solo"}') == 6
        assert metric(base, 'samplebay_steps_per_chain_bucket{le="1.0",pool="solo"}') == 3
        assert metric(base, 'samplebay_steps_per_chain_sum{pool="solo"}') == 3 * 6 + 3 * 1

        stream = {**body, "stream": True, "trajectory_every": 1, "tolerance": 10.0}
        with httpx.stream("POST", f"{base}/sample", json=stream, timeout=60) as reply:
            events = [json.loads(line[5:]) for line in reply.iter_lines() if line.startswith("data:")]
        frames = [event for event in events if "grid" in event and "images" not in event]
        assert [frame["stopped"] for frame in frames] == [[], [0, 1, 2]]
        assert events[-1]["chain_steps"] == [1, 1, 1]

        httpx.post(f"{base}/sample", json={**body, "n": 12}, timeout=60)  # steps of 3 chains and of 12: two buckets
        exposition = httpx.get(f"{base}/metrics").text
        for chains in ("2-3", "8-15"):
            found = re.search(
                rf'^samplebay_step_cost_per_chain_seconds{{chains="{chains}",pool="solo"}} (\S+)$', exposition, re.M
            )
            assert found and float(found.group(1)) > 0, exposition[-2000:]

        for wrong, why in (({"tolerance": -1}, "tolerance"), ({"model": "gan", "tolerance": 0.1}, "'tolerance'")):
            reply = httpx.post(f"{base}/sample", json={**body, **wrong}, timeout=60)
            assert reply.status_code == 422 and why in reply.text


def test_set_sampler_ships_a_tolerance_and_old_checkpoints_read_as_fixed_steps(tmp_path: Path) -> None:
    path = write_tiny_ebm(tmp_path / "solo.safetensors")
    assert load_checkpoint(path).config.sampler.get("tolerance") is None  # written before the stop existed
    assert EBMSampler().tolerance == 0.0
    changes, _ = set_sampler(path, ["tolerance=0.003"])
    assert changes == {"tolerance": (0.0, 0.003)}
    assert load_checkpoint(path).config.sampler["tolerance"] == 0.003
    with pytest.raises(ValueError, match="tolerance"):
        set_sampler(path, ["tolerance=-1"])


def test_evaluate_reports_the_steps_its_stopped_chains_ran(
    tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = write_tiny_ebm(tmp_path / "tiny.safetensors", steps=6)
    words = ["evaluate", str(checkpoint), "--data-dir", str(idx_dir), "--n", "20", "--init", "noise", "--device", "cpu"]
    main([*words, "--tolerance", "10"])  # every chain moves less than 10 in its first step
    stopped = json.loads(capsys.readouterr().out)["sampler"]
    assert (stopped["tolerance"], stopped["mean_steps"], stopped["p95_steps"], stopped["max_chain_steps"]) == (
        10,
        1,
        1,
        1,
    )
    main(words)  # the fixed-step sampler: every chain ran its 6 steps, nothing to report beyond them
    fixed = json.loads(capsys.readouterr().out)["sampler"]
    assert fixed["steps"] == 6 and "mean_steps" not in fixed


def test_larger_steps_first_each_chain_on_its_own_schedule_alone_batched_and_in_the_cli(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    set_sampler(write_tiny_ebm(models / "solo.safetensors"), ["step_decay=0.8"])
    bench = worker_bench(models, tmp_path / "state")
    registry = bench.registry
    member = registry.models["solo"].members[0]
    sampler = member.sampler_as(EBMSampler)
    seeds = chain_seeds(REQUEST["seed"], REQUEST["n"])
    x = chain_start(seeds, member.shape, sampler, member.data_range)
    for step in range(STEPS):  # step t moves by step_size * 0.8**t
        eps = chain_gaussian(seeds, torch.full_like(seeds, step), member.shape)
        size = sampler.step_size * 0.8**step
        x = langevin_step(member.module, x, eps, size, sampler.noise, sampler.grad_clip).x
    assert torch.equal(sample_ebm([member], seeds, STEPS, "noise"), x)
    constant = sample_ebm([dataclasses.replace(member, sampler=dataclasses.replace(sampler, step_decay=1.0))], seeds)
    assert not torch.allclose(constant, x, atol=1e-3)

    crowd = bench.submit(model="solo", n=3, steps=3 * STEPS, seed=9, init="noise")
    for _ in range(5):  # the crowd's chains are 5 steps ahead: their steps are smaller than the newcomer's
        bench.worker.run_once()
    together = bench.submit(**REQUEST)
    run_until_answered(bench, together)
    assert bench.worker.pools["solo"].stats["max_jobs_in_step"] == 2 and not crowd
    torch.testing.assert_close(bench.result(together).samples, x, atol=1e-5, rtol=0)
