"""The device byte budget: requests admitted by the bytes their chains hold, steps cut to the bytes left, a request
wider than a step's share stepped in slices of chains, with the same seeded images as unsliced."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch
from conftest import write_tiny_cnf, write_tiny_ebm, write_tiny_gan
from engine_bench import Bench, FakeClock, solo_bench, tolerance_that_spreads, worker_bench
from server import running_server

from service.catalogue.budgets import DeviceBudget
from service.engine.messages import Handle, SampleResult
from service.engine.scheduler import ChainScheduler, Job
from service.http.orders import make_order
from service.http.render import gif_body
from service.http.schemas import SampleRequest
from service.settings import Settings
from training.runtime.images import gif_bytes, grid, to_uint8

MIB = 2**20


def job(n: int, steps: int, clock: FakeClock, held: int) -> Job:
    return Job(n=n, steps=steps, handle=Handle(clock.now + 100), arrived=clock.now, held_bytes=held)


def test_a_request_wider_than_a_step_s_bytes_steps_in_slices_its_step_counted_once_every_chain_took_it() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=1024, clock=clock)
    scheduler.device, scheduler.step_bytes = DeviceBudget(100 * MIB), MIB  # 1 MiB a chain's step
    wide, small = job(250, 3, clock, held=10 * MIB), job(4, 3, clock, held=MIB)
    scheduler.add(wide)
    scheduler.add(small)
    windows = []
    while scheduler.running or scheduler.waiting:
        plan = scheduler.schedule()
        held = scheduler.device.held_bytes
        assert held == sum(each.held_bytes for each in scheduler.running)  # held from admission to answer
        windows.append([(each.n, each.window) for each in plan.running])
        stepping = [
            each.running_chains if each.window is None else each.window[1] - each.window[0] for each in plan.running
        ]
        assert sum(stepping) <= (100 * MIB - held) // MIB  # the bytes not held, at 1 MiB a chain's step
        scheduler.update_from_output(plan.running)
    assert windows[:4] == [
        [(250, (0, 89))],  # the wide one first (admitted first); the small one does not fit beside its slice
        [(250, (89, 174)), (4, None)],  # the small one (it sat out: first now) and the wide one's next chains
        [(250, (174, 250)), (4, None)],  # the pass ends: the wide one's first step is counted
        [(250, (0, 85)), (4, None)],
    ]
    assert windows[4:] == [
        [(250, (85, 175))],
        [(250, (175, 250))],
        [(250, (0, 90))],
        [(250, (90, 180))],
        [(250, (180, 250))],
    ]
    assert wide.done_steps == 3 and small.done_steps == 3 and scheduler.device.held_bytes == 0


def test_a_request_waits_for_the_bytes_running_ones_hold_and_one_that_can_never_fit_is_refused() -> None:
    clock = FakeClock()
    scheduler = ChainScheduler(chain_budget=1024, clock=clock)
    scheduler.device, scheduler.step_bytes = DeviceBudget(100 * MIB), MIB
    first, second = job(8, 2, clock, held=60 * MIB), job(8, 2, clock, held=60 * MIB)
    scheduler.add(first)
    scheduler.add(second)
    assert scheduler.schedule().admitted == [first]  # 120 MiB would not fit: the second waits
    scheduler.update_from_output([first])
    scheduler.update_from_output(scheduler.schedule().running)
    assert scheduler.schedule().admitted == [second] and scheduler.device.held_bytes == 60 * MIB
    with pytest.raises(ValueError, match="device budget"):
        scheduler.add(job(8, 2, clock, held=100 * MIB))  # with a chain's step beside it: never


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    return solo_bench(tmp_path, device_budget=DeviceBudget(None))  # the tests set its bytes


def answer(bench: Bench, **request) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    answers = bench.submit(**request)
    while not answers:
        bench.worker.run_once()
    result = bench.result(answers)
    assert result.chain_steps is not None
    return result.samples, result.chain_steps, result.frames


@pytest.mark.parametrize(
    "request_fields",
    [
        {"init": "noise", "steps": 4},
        {"init": "noise", "steps": 6, "momentum": 0.5, "trajectory_every": 2},
        {"init": "noise", "steps": 12, "tolerance": "spread"},  # chains stop at different steps, some mid-pass
    ],
    ids=["plain", "momentum-frames", "stops"],
)
def test_a_request_over_the_device_budget_answers_the_images_it_answers_unbounded(
    bench: Bench, request_fields: dict
) -> None:
    request = {"model": "solo", "n": 24, "seed": 5, **request_fields}
    if request_fields.get("tolerance") == "spread":  # one at which the chains stop at different steps
        _, frames = bench.streamed(**{**request, "tolerance": 0.0, "trajectory_every": 1})
        request["tolerance"], _ = tolerance_that_spreads([frame.x for frame in frames])
    pool = bench.worker.pools["solo"]
    unbounded = answer(bench, **request)
    assert pool.stats["max_chains_in_step"] == 24
    body = SampleRequest(**request)
    order = asyncio.run(make_order(body, bench.registry.models["solo"], Settings(), streaming=False))
    held = pool.held_bytes(order, order.steps)
    bench.worker.device_budget.total_bytes = held + 5 * pool.step_bytes  # room for 5 chains a step
    pool.stats["max_chains_in_step"] = 0
    sliced = answer(bench, **request)
    assert pool.stats["max_chains_in_step"] == 5  # never more than the budget's chains in one step
    # The same images and chain steps: to float32's last bits (a CPU's conv kernels block a batch of 5 and one of
    # 24 differently, as they do a request alone and in a shared batch), the noise bit for bit.
    torch.testing.assert_close(sliced[0], unbounded[0], atol=1e-6, rtol=0)
    assert sliced[1] == unbounded[1] and len(sliced[2]) == len(unbounded[2])
    for sliced_frame, unbounded_frame in zip(sliced[2], unbounded[2], strict=True):  # 8-bit pixels
        assert (sliced_frame.int() - unbounded_frame.int()).abs().max() <= 1  # one level at most: those last bits
    if "tolerance" in request_fields:
        assert len(set(sliced[1])) > 2  # the stops did happen, chain by chain
    assert bench.worker.device_budget.held_bytes == 0


@pytest.mark.parametrize(("model", "pool_name"), [("gan", "gan:ddls"), ("cnf", "cnf")], ids=["ddls", "ode"])
def test_ddls_and_ode_steps_are_sliced_within_the_device_budget_with_the_images_of_unsliced_ones(
    tmp_path: Path, model: str, pool_name: str
) -> None:
    """A GAN's latent chains and a CNF's ODE chains step within the budget too (they only counted what they held):
    each pool probes what a step needs a chain (DDLS: the gradient through generator and critic; an ODE step: the
    field, guided), and a request wider than the bytes left is stepped in slices, to the same seeded images."""
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_gan(models / "gan.safetensors")  # its critic refines the latents: DDLS
    write_tiny_cnf(models / "cnf.safetensors")  # class-conditional: its guided steps evaluate two batches
    bench = worker_bench(models, tmp_path / "state", device_budget=DeviceBudget(None))
    pool = bench.worker.pools[pool_name]
    assert pool.step_bytes > 0  # probed when the pool was built
    request = {"model": model, "n": 24, "seed": 5, "steps": 4, "trajectory_every": 2, "format": "json"}
    if model == "cnf":
        request["guidance"] = 2.0

    def answered() -> SampleResult:
        answers = bench.submit(**request)
        while not answers:
            bench.worker.run_once()
        return bench.result(answers)

    unbounded = answered()
    assert pool.stats["max_chains_in_step"] == 24
    order = asyncio.run(make_order(SampleRequest(**request), bench.registry.models[model], Settings(), False))
    bench.worker.device_budget.total_bytes = pool.held_bytes(order, order.steps) + 5 * pool.step_bytes
    pool.stats["max_chains_in_step"] = 0
    sliced = answered()
    assert pool.stats["max_chains_in_step"] == 5  # never more than the budget's chains in one step
    torch.testing.assert_close(sliced.samples, unbounded.samples, atol=1e-5, rtol=0)
    if unbounded.energy is not None:
        torch.testing.assert_close(sliced.energy, unbounded.energy, atol=1e-4, rtol=1e-5)
    assert sliced.frame_steps == unbounded.frame_steps == [0, 2, 4]
    for sliced_frame, unbounded_frame in zip(sliced.frames, unbounded.frames, strict=True):
        assert (sliced_frame.int() - unbounded_frame.int()).abs().max() <= 1
    assert bench.worker.device_budget.held_bytes == 0


def test_a_kept_trajectory_is_its_streamed_frames_as_8_bit_pixels_a_quarter_of_their_bytes(bench: Bench) -> None:
    """An answer that is not streamed keeps its frames as the pixels they are rendered from (issue 39: float32
    frames took ~415 MB for n = 64 at 128²): the GIF is the one the float frames make, byte for byte, and what
    the device budget counts for them is what is kept."""
    request = {"model": "solo", "n": 16, "steps": 8, "seed": 3, "init": "noise", "trajectory_every": 1, "format": "gif"}
    _, streamed = bench.streamed(**request)
    answers = bench.submit(**request)
    while not answers:
        bench.worker.run_once()
    kept = bench.result(answers).frames
    assert len(kept) == len(streamed) == 9 and all(frame.dtype == torch.uint8 for frame in kept)
    assert all(torch.equal(pixels, to_uint8(frame.x)) for pixels, frame in zip(kept, streamed, strict=True))
    assert 4 * sum(frame.nbytes for frame in kept) == sum(frame.x.nbytes for frame in streamed)  # a quarter
    assert gif_body(bench.result(answers), (-1.0, 1.0)) == gif_bytes([grid(frame.x) for frame in streamed])
    pool = bench.worker.pools["solo"]
    order = asyncio.run(make_order(SampleRequest(**request), bench.registry.models["solo"], Settings(), False))
    states = 4 * 16 * 28 * 28  # float32
    assert pool.held_bytes(order, order.steps) == states + sum(frame.nbytes for frame in kept)


def test_over_http_models_states_the_limits_a_wide_request_is_sliced_and_one_that_never_fits_is_a_422(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors")
    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu", device_budget_mb=0.5)
    with running_server(settings) as (base, app):
        listed = {model["name"]: model["limits"]["device"] for model in httpx.get(f"{base}/models").json()}
        limits = listed["solo"]
        pool = app.state.worker.pools["solo"]
        assert limits == {
            "budget_bytes": 2**19,
            "held_bytes_per_image": 4 * 28 * 28,
            "frame_bytes_per_image": 28 * 28,  # kept as 8-bit pixels
            "step_bytes_per_image": pool.step_bytes,
            "max_images": (2**19 - pool.step_bytes) // (4 * 28 * 28),
            "max_images_per_step": 2**19 // pool.step_bytes,
        }
        wide = httpx.post(f"{base}/sample", json={"model": "solo", "n": 48, "steps": 3, "seed": 1, "format": "json"})
        assert wide.status_code == 200 and len(wide.json()["images"]) == 48
        room = (2**19 - 48 * 4 * 28 * 28) // pool.step_bytes
        assert 1 <= pool.stats["max_chains_in_step"] == room < 48  # stepped in slices within the budget
        frames = {"model": "solo", "n": 64, "steps": 20, "trajectory_every": 1, "format": "json"}
        refused = httpx.post(f"{base}/sample", json=frames)
        assert refused.status_code == 422 and "--device-budget-mb 0.5" in refused.text, refused.text
        assert "at most" in refused.text and app.state.worker.device_budget.held_bytes == 0


def test_an_energy_that_cannot_be_probed_is_served_with_its_steps_not_sliced(tmp_path: Path) -> None:
    def fixed_batch(module: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
        raise RuntimeError("exported for a batch of 1")

    bench = solo_bench(tmp_path, step_bytes=fixed_batch, device_budget=DeviceBudget(2**20))
    worker, registry = bench.worker, bench.registry
    samples, _, _ = answer(bench, model="solo", n=8, steps=2, seed=1, init="noise")
    assert samples.shape == (8, 1, 28, 28) and worker.pools["solo"].stats["max_chains_in_step"] == 8
    assert worker.device_limits(registry.models["solo"]) == {
        "budget_bytes": 2**20,
        "held_bytes_per_image": 4 * 28 * 28,
        "frame_bytes_per_image": 28 * 28,  # kept as 8-bit pixels
        "step_bytes_per_image": 0,
        "max_images": 64,
        "max_images_per_step": 64,
    }
