"""Inputs and pictures at every channel count and size: init images for grey+alpha and four-channel energies,
four channels drawn without transparency, and a 128 x 128 colour init image that is no 413."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from payloads import png_b64
from PIL import Image
from server import running_server
from torch import nn

from service.settings import Settings

SHAPES = {"two": (2, 16, 16), "four": (4, 16, 16), "five": (5, 8, 8), "rgb128": (3, 128, 128)}


class LinearEnergy(nn.Module):
    """A linear energy with a quadratic well, for any state shape: compute near zero, gradients everywhere."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(shape), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, *shape] -> [B]
        return self.linear(x.flatten(1)).squeeze(1) + 0.5 * x.flatten(1).pow(2).sum(1)


def export_energy(path: Path, shape: tuple[int, ...]) -> None:
    """What a user does: torch.export with a dynamic batch, torch.export.save, a JSON sidecar."""
    torch.manual_seed(0)
    example = (torch.zeros(2, *shape),)
    program = torch.export.export(
        LinearEnergy(shape).eval(), example, dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(program, path)
    sidecar = {
        "family": "ebm",
        "data": {"shape": list(shape), "range": [-1.0, 1.0]},
        "sampler": {"steps": 4, "step_size": 0.05, "noise": 0.01},
    }
    path.with_suffix(".json").write_text(json.dumps(sidecar))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    models = tmp_path_factory.mktemp("models")
    for name, shape in SHAPES.items():
        export_energy(models / f"{name}.pt2", shape)
    state = tmp_path_factory.mktemp("state")
    with running_server(Settings(models_dir=models, state_dir=state, device="cpu")) as (base, app):
        yield base, app


def post(base: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/sample", json=body, timeout=120)


@pytest.mark.parametrize(("model", "mode"), [("two", "LA"), ("four", "RGBA")])
def test_an_init_image_starts_two_and_four_channel_energies_channel_for_channel(server, model: str, mode: str) -> None:
    base, _ = server
    channels = SHAPES[model][0]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 16, channels), dtype=np.uint8)
    reply = post(base, model=model, n=1, steps=1, noise=0.0, step_size=1e-6, init="image", image=png_b64(pixels, mode))
    assert reply.status_code == 200, reply.text
    picture = Image.open(io.BytesIO(reply.content))
    assert picture.mode == "L" and picture.size == (channels * 16, 16)  # the channels side by side, none hidden
    drawn = np.asarray(picture).reshape(16, channels, 16).transpose(0, 2, 1)  # [H, W, C]
    assert np.abs(drawn.astype(int) - pixels.astype(int)).max() <= 1  # one tiny step from the image: the image


def test_four_channel_samples_are_drawn_without_transparency(server) -> None:
    base, _ = server
    reply = post(base, model="four", n=4, steps=2, seed=1)
    assert reply.status_code == 200, reply.text
    picture = Image.open(io.BytesIO(reply.content))
    assert picture.mode == "L"  # not RGBA: a fourth channel near the data range's low end no longer hides pixels


def test_an_init_image_for_a_shape_no_image_has_is_a_422_naming_the_channels(server) -> None:
    base, _ = server
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    reply = post(base, model="five", init="image", image=png_b64(pixels, "RGB"))
    assert reply.status_code == 422, reply.text
    assert "[5, 8, 8]" in reply.text and "4 (RGBA)" in reply.text


def test_a_128_pixel_colour_init_image_fits_the_body_limit(server) -> None:
    base, _ = server
    rng = np.random.default_rng(1)
    noisy = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)  # incompressible: the largest such PNG
    image = png_b64(noisy, "RGB")
    assert len(image) > 64 * 1024  # past the old fixed limit
    reply = post(base, model="rgb128", n=1, steps=1, init="image", image=image)
    assert reply.status_code == 200, reply.text
    huge = "A" * (2 * len(image) + 64 * 1024)
    assert post(base, model="rgb128", init="image", image=huge).status_code == 413  # still bounded
