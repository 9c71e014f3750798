"""Flows through the server: inverse passes batched in a window, layer-by-layer trajectories, bits/dim (a CNF's
ODE chains: tests/service_engine/test_ode_pool.py)."""

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import write_tiny_flow
from PIL import Image
from server import running_server

from service.settings import Settings


@pytest.fixture
def server(models_dir: Path, tmp_path: Path):
    write_tiny_flow(models_dir / "nice.safetensors")
    settings = Settings(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu")
    with running_server(settings) as (base, app):
        yield base, app


def test_flow_samples_carry_their_exact_bits_per_dim(server) -> None:
    base, _ = server
    nice = next(model for model in httpx.get(f"{base}/models").json() if model["name"] == "nice")
    assert nice["family"] == "flow" and nice["metrics"] == {"test_bits_per_dim": 5.0}
    body = httpx.post(f"{base}/sample", json={"model": "nice", "n": 3, "format": "json", "seed": 4}).json()
    assert len(body["images"]) == 3 and len(body["bits_per_dim"]) == 3 and "energy" not in body
    assert all(np.isfinite(body["bits_per_dim"]))
    again = httpx.post(f"{base}/sample", json={"model": "nice", "n": 3, "format": "json", "seed": 4}).json()
    assert again["images"] == body["images"]  # seeded base samples
    png = httpx.post(f"{base}/sample", json={"model": "nice", "n": 4})
    assert Image.open(io.BytesIO(png.content)).size == (62, 62)


def test_flow_trajectory_is_every_layer_of_the_inverse(server) -> None:
    base, _ = server
    gif = httpx.post(f"{base}/sample", json={"model": "nice", "n": 4, "format": "gif"})
    assert gif.status_code == 200 and Image.open(io.BytesIO(gif.content)).n_frames == 5  # 4 couplings + scaling
    with httpx.stream("POST", f"{base}/sample", json={"model": "nice", "n": 2, "stream": True}) as response:
        lines = list(response.iter_lines())
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert names == ["frame"] * 5 + ["done"]
    last = [line for line in lines if line.startswith("data: ")][-1]
    assert '"bits_per_dim"' in last


def test_langevin_fields_are_422_for_a_flow(server) -> None:
    base, _ = server
    reply = httpx.post(f"{base}/sample", json={"model": "nice", "steps": 10})
    assert reply.status_code == 422 and "'steps' applies to EBMs, CNFs and GANs with a critic" in reply.text
    assert "nice is an unconditional flow sampled by one pass of its inverse, which takes temperature" in reply.text
    for field, value in (("guidance", 2.0), ("trajectory_every", 1), ("momentum", 0.5)):
        reply = httpx.post(f"{base}/sample", json={"model": "nice", field: value})
        assert reply.status_code == 422 and f"'{field}' applies to " in reply.text
    nice = next(model for model in httpx.get(f"{base}/models").json() if model["name"] == "nice")
    assert nice["fields"] == ["temperature"]
    image = base64.b64encode(b"not used").decode()
    assert httpx.post(f"{base}/sample", json={"model": "nice", "init": "image", "image": image}).status_code == 422
    hot = httpx.post(f"{base}/sample", json={"model": "nice", "temperature": 1e20})
    assert hot.status_code == 422 and "temperature" in hot.text


@pytest.fixture
def zoo_server(models_dir: Path, tmp_path: Path):
    for arch in ("glow", "iresnet"):
        write_tiny_flow(models_dir / f"{arch}.safetensors", arch_name=arch)
    settings = Settings(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu")
    with running_server(settings) as (base, app):
        yield base, app


def test_multiscale_flow_and_iresnet_are_served_with_trajectories(zoo_server) -> None:
    base, _ = zoo_server
    for name in ("glow", "iresnet"):
        body = httpx.post(f"{base}/sample", json={"model": name, "n": 2, "format": "json", "seed": 1}).json()
        assert len(body["images"]) == 2 and all(np.isfinite(body["bits_per_dim"]))
        reply = httpx.post(f"{base}/sample", json={"model": name, "n": 1, "format": "gif"})
        gif = Image.open(io.BytesIO(reply.content))
        first = np.asarray(gif.convert("L"))
        gif.seek(gif.n_frames - 1)
        assert gif.n_frames > 3 and not np.array_equal(first, np.asarray(gif.convert("L")))
    layers = 1 + 2 * 2  # squeeze, then actnorm + residual block twice
    with httpx.stream("POST", f"{base}/sample", json={"model": "iresnet", "n": 1, "stream": True}) as response:
        names = [line[7:] for line in response.iter_lines() if line.startswith("event: ")]
    assert layers < names.count("frame") <= 65  # fixed-point iterations are frames, thinned to max_frames
