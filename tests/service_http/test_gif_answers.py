"""Trajectory GIFs through real HTTP (issue 39): decoded back, a grey GIF is its frames exactly and a colour one
is close to them under its one palette; a GIF over --max-gif-pixels is a 422 that names the limit and what fits,
sent before any chain steps, and what it suggests is answered."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import write_tiny_ebm
from PIL import Image, ImageSequence
from server import running_server

from service.settings import Settings
from training.runtime.images import pixel_grid


def write_colour_ebm(path: Path) -> Path:
    """A real (untrained) conv EBM on 3 x 16 x 16 images, sampled from uniform noise."""
    from training.models import build_model
    from training.runtime.checkpoint import Checkpoint, ModelConfig, save_checkpoint

    torch.manual_seed(0)
    arch = {"name": "conv_energy", "kwargs": {"channels": 3, "image_size": 16, "width": 4}}
    config = ModelConfig(
        family="ebm",
        arch=arch,
        data={"shape": [3, 16, 16], "range": [-1.0, 1.0], "dataset": "fake"},
        sampler={"steps": 8, "step_size": 10.0, "noise": 0.005, "grad_clip": 0.03, "temperature": 1.0, "init": "noise"},
        training={"seed": 0},
    )
    save_checkpoint(path, Checkpoint(config, build_model(arch).state_dict(), {}))
    return path


@pytest.fixture
def models(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    write_tiny_ebm(directory / "solo.safetensors")
    write_colour_ebm(directory / "colour.safetensors")
    return directory


def gif_frames(body: bytes) -> list[np.ndarray]:
    """Every frame of a GIF as a viewer shows it, RGB [H, W, 3] uint8."""
    with Image.open(io.BytesIO(body)) as animation:
        assert animation.format == "GIF"
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(animation)]


def trajectory_grids(base: str, request: dict) -> list[np.ndarray]:
    """The same request's trajectory as JSON (a PNG per image per frame), laid out as the GIF lays out a frame."""
    body = httpx.post(f"{base}/sample", json={**request, "format": "json"}, timeout=60).json()
    grids = []
    for frame in body["trajectory"]:
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")) for png in frame]
        grids.append(np.asarray(pixel_grid(torch.from_numpy(np.stack(images))).convert("RGB")))
    return grids


def chain_steps(base: str) -> float:
    """Chain-steps every pool of the server has run."""
    text = httpx.get(f"{base}/metrics").text
    return sum(float(value) for value in re.findall(r"^samplebay_chain_steps_total\{.*\} (\S+)$", text, re.M))


def test_a_grey_gif_is_its_frames_exactly_and_a_colour_one_is_near_them(models: Path, tmp_path: Path) -> None:
    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu")
    with running_server(settings) as (base, _):
        for model, exact in (("solo", True), ("colour", False)):
            request = {"model": model, "n": 4, "steps": 8, "trajectory_every": 2, "seed": 5, "init": "noise"}
            gif = httpx.post(f"{base}/sample", json={**request, "format": "gif"}, timeout=60)
            assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
            shown, kept = gif_frames(gif.content), trajectory_grids(base, request)
            assert len(shown) == len(kept) == 5 and shown[0].shape == kept[0].shape
            errors = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(shown, kept, strict=True)]
            if exact:
                assert max(errors) == 0, errors
            else:  # 255 colours for the whole animation: each frame within a few levels of its pixels (6.2 here)
                assert 0 < max(errors) <= 8, errors
                assert len(np.unique(shown[-1].reshape(-1, 3), axis=0)) > 16  # in colour, not a few flat shades


def test_a_gif_over_the_pixel_limit_is_a_422_naming_it_before_any_step_and_what_it_suggests_is_answered(
    models: Path, tmp_path: Path
) -> None:
    # n 4 of 28x28 is a 62 x 62 grid: 3,844 pixels a frame, 5 frames 19,220; n 2 is 62 x 32: 5 frames 9,920.
    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu", max_gif_pixels=10_000)
    request = {"model": "solo", "n": 4, "steps": 8, "trajectory_every": 2, "seed": 5, "init": "noise"}
    with running_server(settings) as (base, _):
        assert httpx.get(f"{base}/models").json()[0]["limits"]["max_gif_pixels"] == 10_000
        refused = httpx.post(f"{base}/sample", json={**request, "format": "gif"}, timeout=60)
        assert refused.status_code == 422
        assert refused.json()["detail"] == (
            "a GIF of 5 frames of 4 images of [1, 28, 28] is 19,220 pixels; this server encodes at most 10,000 "
            "(--max-gif-pixels): ask for at most 2 images, or ask for at most 2 frames ('trajectory_every' of 8 or "
            "more), or stream the frames ('stream': true, or Accept: text/event-stream)"
        )
        assert chain_steps(base) == 0  # refused before its chains ran
        for fits, frames in (({"n": 2}, 5), ({"trajectory_every": 8}, 2)):
            answered = httpx.post(f"{base}/sample", json={**request, **fits, "format": "gif"}, timeout=60)
            assert answered.status_code == 200 and len(gif_frames(answered.content)) == frames
        with httpx.stream("POST", f"{base}/sample", json={**request, "stream": True}, timeout=60) as streamed:
            assert streamed.status_code == 200
            assert sum(line.startswith("event: frame") for line in streamed.iter_lines()) == 5
        as_json = httpx.post(f"{base}/sample", json={**request, "format": "json"}, timeout=60)
        assert as_json.status_code == 200 and len(as_json.json()["trajectory"]) == 5  # the limit is a GIF's
