"""Energies trained by Equilibrium Matching, served: Gaussian starts, class labels, no replay buffer."""

import io

import httpx
import numpy as np
import pytest
from conftest import write_tiny_ebm, write_tiny_eqm
from PIL import Image
from server import running_server

from service.settings import Settings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    models = tmp_path_factory.mktemp("models")
    write_tiny_eqm(models / "digits.safetensors")
    write_tiny_eqm(models / "plain.safetensors", seed=1, conditional=False)
    write_tiny_ebm(models / "cd.safetensors")
    state = tmp_path_factory.mktemp("state")
    with running_server(Settings(models_dir=models, state_dir=state, device="cpu")) as (base, app):
        yield base, app


def post(base: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/sample", json=body, timeout=60)


def test_models_list_their_classes_and_how_they_sample(server) -> None:
    base, _ = server
    models = {model["name"]: model for model in httpx.get(f"{base}/models").json()}
    assert models["digits"]["classes"] == [str(digit) for digit in range(10)]
    assert models["plain"]["classes"] is None and models["cd"]["classes"] is None
    sampler = models["digits"]["sampler"]
    assert (sampler["prior"], sampler["noise"], sampler["clamp"], sampler["init"]) == ("gaussian", 0.0, False, "noise")
    assert models["digits"]["buffer_size"] is None  # trained without a replay buffer
    assert models["cd"]["buffer_size"] is not None


def test_a_label_draws_real_pngs_that_depend_on_the_label(server) -> None:
    base, _ = server
    images = {}
    for label in (2, 7):
        reply = post(base, model="digits", n=2, seed=5, label=label, format="png")
        assert reply.status_code == 200, reply.text
        image = Image.open(io.BytesIO(reply.content))
        assert image.format == "PNG"
        images[label] = np.asarray(image)
    assert not np.array_equal(images[2], images[7])
    answer = post(base, model="digits", n=2, seed=5, label=2, format="json").json()
    assert answer["steps"] == 8 and len(answer["energy"]) == 2
    assert all(value is not None for value in answer["energy"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "digits", "label": 10}, "0..9"),
        ({"model": "plain", "label": 1}, "unconditional"),
        ({"model": "cd", "label": 1}, "unconditional"),
        ({"model": "digits", "init": "buffer"}, "trained without one"),
        ({"model": "plain", "guidance": 2.0}, "class-conditional"),
    ],
)
def test_labels_and_buffer_options_that_do_not_apply_are_422(server, body: dict, message: str) -> None:
    base, _ = server
    reply = post(base, **body)
    assert reply.status_code == 422 and message in reply.text, reply.text


def test_gaussian_started_chains_never_enter_a_shared_buffer(server) -> None:
    base, app = server
    assert post(base, model="plain", n=3, seed=1).status_code == 200
    pool = app.state.worker.pools["plain"]
    assert len(pool.buffer) == 0 and not pool.buffer_dirty
