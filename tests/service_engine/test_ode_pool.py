"""A CNF served by batched ODE steps: its chains step beside other requests' (and beside Langevin chains of
another model) and end where they end alone and in the CLI; labels, guidance, inpainting, cancellation and
streaming, driven round by round with a fake clock and through real HTTP."""

from __future__ import annotations

import base64
import dataclasses
import io
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import CNF_STEPS, write_tiny_cnf, write_tiny_ebm
from engine_bench import Bench, FakeClock, worker_bench
from payloads import png_array, png_b64, sse_events
from PIL import Image
from server import running_server, wait_for

from service.catalogue.buffer_store import BufferStore
from service.catalogue.registry import Registry, ServedModel
from service.engine.messages import CancelledByClient
from service.engine.worker import Worker
from service.metrics import Metrics
from service.settings import Settings
from training.families import draw_samples
from training.runtime.draw import cnf_prior, sample_cnf
from training.runtime.images import decode_image
from training.runtime.load import load_model
from training.sampling.noise import chain_seeds

SHAPE = (1, 16, 16)


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_cnf(models / "cnf.safetensors")
    write_tiny_cnf(models / "cnf_random.safetensors", unlabelled="random")
    write_tiny_ebm(models / "solo.safetensors")
    return worker_bench(models, tmp_path / "state")


def run_until(bench: Bench, *answers: list) -> None:
    for _ in range(200):
        if all(answers):
            return
        bench.worker.run_once()
    raise AssertionError("the requests were not answered within 200 rounds")


def cli_samples(path: Path, seed: int, n: int, **options) -> torch.Tensor:
    """What `python -m training sample` draws: the checkpoint's sampler, --guidance replacing its guidance."""
    model = load_model(path)
    if "guidance" in options:
        model.sampler = dataclasses.replace(model.sampler, guidance=options.pop("guidance"))
    return sample_cnf(model, chain_seeds(seed, n), **options)


def test_a_seeded_cnf_chain_is_the_same_alone_batched_beside_others_and_in_the_cli(bench: Bench, tmp_path) -> None:
    pool = bench.worker.pools["cnf"]
    request = {"model": "cnf", "n": 3, "seed": 1234, "label": 3, "guidance": 2.5, "temperature": 0.9}
    alone = bench.submit(**request)
    run_until(bench, alone)
    assert pool.stats["max_jobs_in_step"] == 1 and bench.result(alone).steps == CNF_STEPS
    # Beside: null-labelled chains, labelled chains at guidance 1 (not guided), each at its own time and steps,
    # and an EBM's Langevin chains stepping in the same rounds.
    crowd = bench.submit(model="cnf", n=4, steps=9, seed=7, temperature=1.2)
    plain = bench.submit(model="cnf", n=2, steps=6, seed=8, label=5, guidance=1.0)
    langevin = bench.submit(model="solo", n=2, steps=30, seed=3, init="noise")
    bench.worker.run_once()  # the crowd is a step ahead: at t = 1/9 and 1/6 when the request starts at 0
    together = bench.submit(**request)
    run_until(bench, together)
    assert pool.stats["max_jobs_in_step"] == 3 and pool.stats["max_chains_in_step"] == 9  # it did share steps
    assert not langevin and bench.worker.pools["solo"].stats["steps"] == CNF_STEPS + 1  # Langevin chains ran beside
    samples = bench.result(alone).samples  # [3, 1, 16, 16]
    assert torch.allclose(samples, bench.result(together).samples, atol=1e-5, rtol=0)
    path = tmp_path / "models" / "cnf.safetensors"
    cli = cli_samples(path, 1234, 3, temperature=0.9, guidance=2.5, labels=torch.full((3,), 3))
    assert torch.allclose(samples, cli, atol=1e-5, rtol=0)
    run_until(bench, crowd, plain, langevin)
    assert bench.result(crowd).steps == 9 and bench.result(crowd).chain_steps == [9] * 4
    cli_crowd = cli_samples(path, 7, 4, temperature=1.2, steps=9)
    assert torch.allclose(bench.result(crowd).samples, cli_crowd, atol=1e-5, rtol=0)
    cli_plain = cli_samples(path, 8, 2, steps=6, guidance=1.0, labels=torch.full((2,), 5))
    assert torch.allclose(bench.result(plain).samples, cli_plain, atol=1e-5, rtol=0)


def test_labels_guidance_temperature_and_seed_each_change_a_cnf_s_samples(bench: Bench) -> None:
    request = {"model": "cnf", "n": 2, "seed": 11, "label": 3}
    changes = [{"label": 4}, {"guidance": 4.0}, {"temperature": 0.5}, {"seed": 12}]
    answers = [bench.submit(**request), *(bench.submit(**{**request, **change}) for change in changes)]
    run_until(bench, *answers)
    base = bench.result(answers[0]).samples
    for change, answer in zip(changes, answers[1:], strict=True):
        assert not torch.allclose(base, bench.result(answer).samples, atol=1e-3), change


def test_an_unlabelled_chain_takes_the_class_its_seed_draws_as_the_cli_does(bench: Bench, tmp_path) -> None:
    answers = bench.submit(model="cnf_random", n=4, seed=21)
    run_until(bench, answers)
    cli = draw_samples(load_model(tmp_path / "models" / "cnf_random.safetensors"), chain_seeds(21, 4))
    assert torch.allclose(bench.result(answers).samples, cli, atol=1e-5, rtol=0)


def test_a_cancelled_cnf_request_frees_its_chains_at_the_next_step(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_cnf(models / "cnf.safetensors")
    bench = worker_bench(models, tmp_path / "state", chain_budget=8)
    pool = bench.worker.pools["cnf"]
    cancelled = bench.submit(model="cnf", n=6, steps=50, seed=1)
    bench.worker.run_once()
    bench.worker.run_once()
    waiting = bench.submit(model="cnf", n=4, steps=2, seed=2)  # 6 + 4 chains pass the budget of 8: it waits
    bench.worker.run_once()
    assert pool.scheduler.running_chains == 6 and len(pool.scheduler.waiting) == 1
    job = pool.scheduler.running[0]
    job.handle.cancel()  # what the HTTP side does when its client goes away
    bench.worker.run_once()  # the next step: the cancelled chains are gone and the waiting request took their place
    assert len(cancelled) == 1 and isinstance(cancelled[0], CancelledByClient)
    assert pool.scheduler.running_chains == 4 and job.done_steps == 3
    run_until(bench, waiting)
    assert bench.result(waiting).steps == 2


def test_inpainting_holds_the_known_pixels_on_the_straight_path_to_the_image(bench: Bench) -> None:
    digit = np.zeros(SHAPE[1:])
    digit[2:14, 7:9] = 255  # a '1'
    mask = np.zeros(SHAPE[1:])
    mask[8:, :] = 255  # fill in the lower half
    image, free = png_b64(digit), np.zeros(SHAPE, dtype=bool)
    free[:, 8:, :] = True
    result, frames = bench.streamed(
        model="cnf", n=2, seed=5, init="image", image=image, mask=png_b64(mask), trajectory_every=1, label=1
    )
    known = decode_image(base64.b64decode(image), SHAPE, (-1.0, 1.0))  # [1, 16, 16] in the data range
    start = cnf_prior(chain_seeds(5, 2), SHAPE, 1.0)  # each chain's x(0)
    assert [frame.step for frame in frames] == list(range(CNF_STEPS + 1))
    for frame in frames:
        t = frame.step / CNF_STEPS
        path = ((1 - t) * start + t * known).clamp(-1, 1)  # x_t of the known pixels
        assert torch.allclose(frame.x[:, ~free], path[:, ~free], atol=1e-6), frame.step
    assert torch.equal(result.samples[:, ~free], known.expand(2, *SHAPE)[:, ~free])  # the image itself at t = 1
    assert (result.samples[:, free] - known.expand(2, *SHAPE)[:, free]).abs().mean() > 0.1  # filled in, not copied


# --- A 2-D mixture: the served solver carries prior samples to the modes of the labels asked for --------------


@pytest.fixture(scope="module")
def mixture_cnf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional CNF on 8 Gaussians (std 0.05 on a circle of radius 0.75), trained in seconds."""
    from training.train.flow import FlowTrainConfig, train_flow

    models = tmp_path_factory.mktemp("mixture")
    train_flow(
        FlowTrainConfig(
            arch="cnf",
            dataset="toy2d:8gaussians",
            conditional=True,
            label_dropout=0.0,
            hidden=64,
            epochs=4,
            batch_size=256,
            max_batches=75,
            lr=3e-3,
            warmup_steps=20,
            out=str(models / "mixture.safetensors"),
            autocast="none",
            threads=1,
        )
    )
    return models


def test_served_chains_of_every_label_reach_their_mode_batched_together(mixture_cnf: Path, tmp_path: Path) -> None:
    # The server renders images, so its registry refuses 2-D data; the worker and its ODE pool take any shape.
    mixture = ServedModel("mixture", "flow", [load_model(mixture_cnf / "mixture.safetensors")])
    registry, clock = Registry(models={"mixture": mixture}), FakeClock()
    store, cpu = BufferStore(tmp_path / "state"), torch.device("cpu")
    worker = Worker(registry, store, cpu, Metrics(), 512, 16, 1e9, 0.5, clock, step_budget=512)  # one batch for all
    bench = Bench(worker, registry, clock)
    answers = {label: bench.submit(model="mixture", n=30, seed=label, label=label) for label in range(8)}
    bench.worker.run_once()
    late = bench.submit(model="mixture", n=30, seed=99, label=2, steps=10)  # joins at another time and step size
    run_until(bench, *answers.values(), late)
    assert bench.worker.pools["mixture"].stats["max_chains_in_step"] == 8 * 30 + 30
    for label, points in [*((k, bench.result(a).samples) for k, a in answers.items()), (2, bench.result(late).samples)]:
        angle = label * math.pi / 4
        mode = torch.tensor([math.cos(angle), math.sin(angle)]) * 0.75
        near = (points - mode).norm(dim=1) < 0.2
        assert near.float().mean() > 0.9, f"only {near.float().mean():.2f} of label {label}'s chains reached its mode"


# --- Through real HTTP ---------------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path):
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_cnf(models / "cnf.safetensors")
    write_tiny_ebm(models / "solo.safetensors")
    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu", max_steps=50000)
    with running_server(settings) as (base, app):
        yield base, app


def test_models_list_the_fields_a_cnf_reads(server) -> None:
    base, _ = server
    models = {model["name"]: model for model in httpx.get(f"{base}/models").json()}
    cnf = models["cnf"]
    assert cnf["family"] == "flow" and cnf["sampler"]["solver"] == "midpoint"
    assert cnf["fields"] == ["temperature", "label", "steps", "guidance", "init", "image", "mask", "trajectory_every"]
    assert {"step_size", "noise", "momentum", "tolerance"} <= set(models["solo"]["fields"])


def test_a_label_and_steps_through_http_draw_seeded_pngs_that_depend_on_the_label(server) -> None:
    base, _ = server

    def images(**fields) -> tuple[list[np.ndarray], httpx.Response]:
        reply = httpx.post(f"{base}/sample", json={"model": "cnf", "n": 2, "format": "json", **fields}, timeout=60)
        assert reply.status_code == 200, reply.text
        return [png_array(encoded) for encoded in reply.json()["images"]], reply

    three, reply = images(seed=3, label=3, steps=6, guidance=3.0)
    assert reply.headers["x-steps"] == "6" and reply.json()["chain_steps"] == [6, 6]
    again, _ = images(seed=3, label=3, steps=6, guidance=3.0)
    four, _ = images(seed=3, label=4, steps=6, guidance=3.0)
    assert all(np.array_equal(a, b) for a, b in zip(three, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(three, four, strict=True))
    assert three[0].shape == SHAPE[1:]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"step_size": 0.1}, "'step_size' applies to EBMs and GANs with a critic; cnf is a class-conditional CNF"),
        ({"noise": 0.1}, "'noise' applies to EBMs and GANs with a critic; cnf is a class-conditional CNF"),
        ({"momentum": 0.5}, "'momentum' applies to EBMs; cnf is a class-conditional CNF sampled by its ODE"),
        ({"tolerance": 0.01}, "'tolerance' applies to EBMs; cnf is a class-conditional CNF sampled by its ODE"),
        ({"steps": 0}, "whose ODE takes at least 1 solver step"),
        ({"steps": 50001}, "this server allows at most 50000"),
        ({"label": 10}, "'label' 10 is out of range"),
        ({"init": "buffer"}, "init 'buffer' needs a replay buffer; cnf is a CNF"),
        ({"init": "image", "image": png_b64(np.zeros(SHAPE[1:]))}, "completes a masked image: send a 'mask'"),
    ],
)
def test_fields_a_cnf_does_not_read_are_422_with_the_reason(server, fields: dict, message: str) -> None:
    base, _ = server
    reply = httpx.post(f"{base}/sample", json={"model": "cnf", **fields})
    assert reply.status_code == 422 and message in reply.json()["detail"], reply.text


def test_a_cnf_streams_a_frame_per_solver_step_and_its_gif_has_them_all(server) -> None:
    base, _ = server
    body = {"model": "cnf", "n": 3, "seed": 4, "label": 7, "stream": True, "trajectory_every": 1}
    with httpx.stream("POST", f"{base}/sample", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = sse_events(response.iter_lines())
    assert [name for name, _ in events] == ["frame"] * (CNF_STEPS + 1) + ["done"]
    frames = [data for name, data in events if name == "frame"]
    assert [frame["step"] for frame in frames] == list(range(CNF_STEPS + 1))
    assert all(frame["steps"] == CNF_STEPS and frame["energy"] is None for frame in frames)
    assert not np.array_equal(png_array(frames[0]["grid"]), png_array(frames[-1]["grid"]))  # noise moved
    done = events[-1][1]
    assert np.array_equal(png_array(done["grid"]), png_array(frames[-1]["grid"])) and len(done["images"]) == 3
    gif = httpx.post(f"{base}/sample", json={"model": "cnf", "n": 2, "format": "gif", "seed": 4}, timeout=60)
    assert gif.status_code == 200 and Image.open(io.BytesIO(gif.content)).n_frames == CNF_STEPS + 1  # prior too


def test_a_client_leaving_a_cnf_stream_stops_its_chains(server) -> None:
    base, app = server
    pool = app.state.worker.pools["cnf"]
    body = {"model": "cnf", "n": 2, "steps": 50000, "trajectory_every": 10, "stream": True}
    with httpx.stream("POST", f"{base}/sample", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event: frame"):
                break  # one frame seen; leave
    wait_for(lambda: pool.scheduler.running_chains == 0, 10, "the left stream's chains leaving the pool")
    assert pool.stats["steps"] < 50000


def test_inpainting_through_http_keeps_the_known_half(server) -> None:
    base, _ = server
    digit = np.zeros(SHAPE[1:])
    digit[2:14, 7:9] = 255
    mask = np.zeros(SHAPE[1:])
    mask[8:, :] = 255
    fields = {"init": "image", "image": png_b64(digit), "mask": png_b64(mask), "format": "json", "seed": 1}
    reply = httpx.post(f"{base}/sample", json={"model": "cnf", "n": 2, **fields}, timeout=60)
    assert reply.status_code == 200, reply.text
    for encoded in reply.json()["images"]:
        completed = png_array(encoded).astype(int)
        assert np.abs(completed[:8] - digit[:8]).max() <= 1  # kept (up to 8-bit rounding)
        assert np.abs(completed[8:] - digit[8:]).mean() > 10  # the masked half was drawn
