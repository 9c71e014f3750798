"""Issue 15's request-side faults, through real HTTP: absurd numbers, diverging chains, a mask of the
wrong size, and checkpoints whose config claims sizes no model has."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import write_tiny_ebm, write_tiny_eqm, write_tiny_gan
from payloads import png_b64
from server import running_server

from service.settings import Settings
from training.runtime.checkpoint import load_checkpoint, read_metadata, save_checkpoint

NORMAL = {"model": "solo", "n": 2, "steps": 40, "format": "json", "init": "noise"}


@pytest.fixture
def models(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    write_tiny_ebm(directory / "solo.safetensors")
    write_tiny_eqm(directory / "eqm.safetensors", conditional=False)  # unclamped gradient descent
    return directory


@pytest.fixture
def server(models: Path, tmp_path: Path):
    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu", max_n=8, max_steps=500)
    with running_server(settings) as (base, app):
        yield base, app


def post_together(base: str, bodies: list[dict]) -> list[httpx.Response]:
    """Send the bodies at once, so their chains share the worker's batched steps."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: httpx.post(f"{base}/sample", json=body, timeout=60), bodies))


@pytest.mark.parametrize(
    ("field", "value"),
    [("step_size", 1e39), ("noise", 1e39), ("temperature", 1e-300), ("momentum", 0.9999999999), ("n", 2**40)],
)
def test_an_absurd_number_is_a_422_and_its_neighbours_are_answered(server, field: str, value: float) -> None:
    base, _ = server
    absurd = {**NORMAL, field: value}
    *normal, odd = post_together(base, [NORMAL, {**NORMAL, "seed": 3}, {**NORMAL, "model": "eqm"}, absurd])
    assert [reply.status_code for reply in normal] == [200, 200, 200]
    assert all(len(reply.json()["energy"]) == 2 for reply in normal)
    assert odd.status_code == 422 and field in odd.json()["detail"]


def test_models_and_the_schema_state_the_same_limits(server) -> None:
    base, _ = server
    limits = {model["name"]: model["limits"] for model in httpx.get(f"{base}/models").json()}["solo"]
    fields = limits["fields"]
    assert fields["step_size"] == {"gt": 0, "le": 1000} and fields["noise"] == {"ge": 0, "le": 10}
    assert fields["temperature"] == {"ge": 0.001, "le": 100} and fields["momentum"] == {"ge": 0, "le": 0.999}
    assert fields["n"]["le"] == 8 and fields["steps"]["le"] == 500  # this server's caps
    schema = httpx.get(f"{base}/openapi.json").json()["components"]["schemas"]["SampleRequest"]["properties"]
    assert "guidance" not in fields and "label" not in fields  # solo is unconditional: only what it reads
    for name in ("step_size", "noise", "temperature", "momentum", "tolerance"):
        number = next(option for option in schema[name]["anyOf"] if option["type"] == "number")
        assert number["maximum"] == fields[name]["le"], name
        assert number.get("minimum", number.get("exclusiveMinimum")) == fields[name].get("ge", fields[name].get("gt"))


def test_a_diverging_chain_ends_only_its_own_request(server) -> None:
    """An energy with a singularity far from the data: a request whose wild (but allowed) step size carries
    its chains there diverges; the requests in the same batched steps finish as if it were not there."""
    base, app = server
    pool = app.state.worker.pools["eqm"]
    healthy = pool.modules[0]

    def singular(x: torch.Tensor) -> torch.Tensor:
        reach = x.flatten(1).abs().amax(1)  # [B]
        return healthy(x) + torch.sqrt(50.0 - reach)  # NaN, with a NaN gradient, past |x| = 50

    calm = {"model": "eqm", "n": 2, "steps": 60, "format": "json", "seed": 1}
    pool.modules[0] = singular
    try:
        first, wild, second = post_together(base, [calm, {**calm, "step_size": 1000, "seed": 2}, {**calm, "seed": 5}])
        alone = httpx.post(f"{base}/sample", json=calm, timeout=60)
    finally:
        pool.modules[0] = healthy
    assert first.status_code == 200 and second.status_code == 200
    assert wild.status_code == 422
    assert "diverged" in wild.json()["detail"] and "step_size 1000" in wild.json()["detail"]
    assert pool.stats["max_jobs_in_step"] >= 2  # they did share steps
    assert alone.json()["images"] == first.json()["images"]  # the neighbour was not disturbed


def test_a_batch_that_raises_is_retried_request_by_request(server) -> None:
    """A request whose chains make the module raise fails alone; the others in its batch are answered."""
    base, app = server
    pool = app.state.worker.pools["solo"]
    healthy = pool.modules[0]

    def fragile(x: torch.Tensor) -> torch.Tensor:
        if (x.flatten(1).amin(1) > 0.9).any():  # a chain started from the white image, at its first step
            raise RuntimeError("simulated kernel failure")
        return healthy(x)

    white = {**NORMAL, "init": "image", "image": png_b64(np.full((28, 28), 255))}
    pool.modules[0] = fragile
    try:
        replies = post_together(base, [NORMAL, {**NORMAL, "n": 1, "seed": 9}, white])
    finally:
        pool.modules[0] = healthy
    assert [reply.status_code for reply in replies] == [200, 200, 503]
    assert "RuntimeError" in replies[2].json()["detail"]


def test_a_mask_of_another_size_is_a_422_naming_both_sizes(server) -> None:
    base, _ = server
    image, mask = np.zeros((28, 28)), np.zeros((20, 24))
    mask[10:, :] = 255
    body = {"model": "solo", "steps": 3, "init": "image", "image": png_b64(image), "mask": png_b64(mask)}
    reply = httpx.post(f"{base}/sample", json=body, timeout=60)
    assert reply.status_code == 422
    assert "24x20" in reply.json()["detail"] and "28x28" in reply.json()["detail"]
    same = httpx.post(f"{base}/sample", json={**body, "mask": png_b64(np.full((28, 28), 255))}, timeout=60)
    assert same.status_code == 200


def rewrite_config(path: Path, change) -> None:
    """Rewrite a checkpoint's config JSON in place, keeping its tensors as they are."""
    checkpoint = load_checkpoint(path)
    raw = json.loads(read_metadata(path.read_bytes(), path.name)["config"])
    change(raw)
    for key, value in raw.items():
        setattr(checkpoint.config, key, value)
    save_checkpoint(path, checkpoint)


def test_absurd_checkpoints_are_refused_with_the_reason_in_readyz(models: Path, tmp_path: Path) -> None:
    def claim_width(raw: dict) -> None:
        raw["arch"]["kwargs"]["width"] = 200_000

    def claim_width_near_the_cap(raw: dict) -> None:
        raw["arch"]["kwargs"]["width"] = 1_000  # within the build limits, but not these tensors: 300 MB of weights

    def claim_image(raw: dict) -> None:
        raw["data"]["shape"] = [3, 100_000, 100_000]

    for name, change in (("wide", claim_width), ("wider", claim_width_near_the_cap), ("huge", claim_image)):
        rewrite_config(write_tiny_ebm(models / f"{name}.safetensors"), change)
    buffered = write_tiny_ebm(models / "bottomless.safetensors")
    checkpoint = load_checkpoint(buffered)
    checkpoint.extras["replay_buffer"]["capacity"] = torch.tensor(10**12)
    save_checkpoint(buffered, checkpoint)

    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu")
    with running_server(settings) as (base, _):
        ready = httpx.get(f"{base}/readyz")
        served = {model["name"] for model in httpx.get(f"{base}/models").json()}
    assert ready.status_code == 200 and served == {"solo", "eqm"}
    refused = ready.json()["refused"]
    assert "arch.kwargs.width is 200,000" in refused["wide.safetensors"]
    assert "weights/" in refused["wider.safetensors"] and "1000" in refused["wider.safetensors"]
    assert "data.shape" in refused["huge.safetensors"]
    assert "replay_buffer/capacity 1,000,000,000,000" in refused["bottomless.safetensors"]


def test_a_generator_batch_that_raises_is_retried_request_by_request(tmp_path: Path) -> None:
    """GANs and flows batch whole requests: one whose latents make the generator raise fails alone."""
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_gan(models / "gan.safetensors")
    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu", batch_window_ms=1000)
    with running_server(settings) as (base, app):
        pool = app.state.worker.pools["gan"]
        healthy, batches = pool.module, []

        def fragile(z: torch.Tensor) -> torch.Tensor:
            batches.append(len(z))
            if (z.abs().amax(1) > 8).any():  # only the request at temperature 100 draws latents this far out
                raise RuntimeError("simulated kernel failure")
            return healthy(z)

        pool.module = fragile
        normal = {"model": "gan", "n": 2, "format": "json", "seed": 1}
        wild = {**normal, "seed": 3, "temperature": 100.0}
        try:
            replies = post_together(base, [normal, {**normal, "seed": 9}, wild])
        finally:
            pool.module = healthy
    assert [reply.status_code for reply in replies] == [200, 200, 503]
    assert batches == [6, 2, 2, 2]  # the three shared a batch that failed, then ran one by one
