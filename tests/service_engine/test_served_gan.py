"""GANs through the server: window batching, seeded latents, family-specific validation."""

import base64
import concurrent.futures
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import write_tiny_gan
from PIL import Image
from server import running_server

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(models_dir: Path, tmp_path: Path):
    write_tiny_gan(models_dir / "gan.safetensors")
    settings = Settings(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu", batch_window_ms=50)
    with running_server(settings) as (base, app):
        yield base, app


def test_gan_is_listed_and_samples_png_json_and_gif(server) -> None:
    base, _ = server
    gan = next(model for model in httpx.get(f"{base}/models").json() if model["name"] == "gan")
    assert gan["family"] == "gan" and gan["buffer_size"] is None and gan["sampler"]["latent_dim"] == 16
    assert gan["latent_langevin"] and gan["sampler"]["steps"] == 0  # DDLS on request; a plain pass by default
    png = httpx.post(f"{base}/sample", json={"model": "gan", "n": 4})
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (62, 62)
    body = httpx.post(f"{base}/sample", json={"model": "gan", "n": 3, "format": "json", "seed": 9}).json()
    assert len(body["images"]) == 3 and "energy" not in body and body["seed"] == 9
    gif = httpx.post(f"{base}/sample", json={"model": "gan", "n": 2, "format": "gif"})
    assert gif.status_code == 200 and Image.open(io.BytesIO(gif.content)).n_frames == 1


def test_requests_within_the_window_share_one_generator_pass(server) -> None:
    base, app = server

    def grid(seed: int) -> np.ndarray:
        reply = httpx.post(f"{base}/sample", json={"model": "gan", "n": 2, "seed": seed, "format": "json"})
        assert reply.status_code == 200
        return np.stack(
            [np.asarray(Image.open(io.BytesIO(base64.b64decode(image)))) for image in reply.json()["images"]]
        )

    alone = grid(77)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(grid, [77, 1, 2, 3, 4, 5]))
    assert app.state.worker.pools["gan"].stats["max_jobs_in_step"] >= 2
    assert np.array_equal(alone, together[0])  # seeded latents do not depend on the batch
    assert not np.array_equal(together[0], together[1])


def test_image_langevin_fields_are_422_for_a_gan(server) -> None:
    base, _ = server
    readings = (
        ("init", "buffer", "EBMs and CNFs"),
        ("momentum", 0.5, "EBMs"),
        ("guidance", 2.0, "class-conditional EBMs and CNFs"),
    )
    for field, value, readers in readings:
        reply = httpx.post(f"{base}/sample", json={"model": "gan", field: value})
        assert (
            reply.status_code == 422
            and f"'{field}' applies to {readers}; gan is an unconditional GAN whose critic" in reply.text
        )
    assert httpx.post(f"{base}/sample", json={"model": "gan", "temperature": 0.7}).status_code == 200


def decoded(images: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(image)))) for image in images])


def test_ddls_refines_latents_under_the_critic_with_frames_energy_and_zero_steps_as_the_plain_pass(
    models_dir: Path, tmp_path: Path
) -> None:
    from conftest import write_gan_whose_critic_likes_bright_images

    write_gan_whose_critic_likes_bright_images(models_dir / "gan.safetensors")
    settings = Settings(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu", batch_window_ms=5)
    with running_server(settings) as (base, _):

        def sample(**fields) -> dict:
            reply = httpx.post(f"{base}/sample", json={"model": "gan", "n": 8, "seed": 3, "format": "json", **fields})
            assert reply.status_code == 200, reply.text
            return reply.json()

        plain, zero = sample(), sample(steps=0)
        assert np.array_equal(decoded(plain["images"]), decoded(zero["images"]))  # bit for bit
        short, refined = sample(steps=1, step_size=0.05, noise=0.02), sample(steps=40, step_size=0.05, noise=0.02)
        assert refined["steps"] == 40 and len(refined["energy"]) == 8
        assert np.mean(refined["energy"]) < np.mean(short["energy"]) - 10  # E(z) falls along the chains
        brighter = decoded(refined["images"]).astype(float).mean((1, 2)) > decoded(plain["images"]).mean((1, 2))
        assert brighter.mean() > 0.75  # toward the images this critic prefers
        gif = httpx.post(f"{base}/sample", json={"model": "gan", "steps": 12, "trajectory_every": 4, "format": "gif"})
        assert gif.status_code == 200 and Image.open(io.BytesIO(gif.content)).n_frames == 4  # steps 0, 4, 8, 12
        with httpx.stream("POST", f"{base}/sample", json={"model": "gan", "steps": 6, "stream": True}) as response:
            names = [line[7:] for line in response.iter_lines() if line.startswith("event: ")]
        assert names.count("frame") >= 2 and names[-1] == "done"


def test_a_gan_saved_without_its_critic_answers_ddls_with_a_422_that_says_why(models_dir: Path, tmp_path: Path) -> None:
    from training.runtime.checkpoint import load_checkpoint, save_checkpoint

    path = write_tiny_gan(models_dir / "gan.safetensors")
    checkpoint = load_checkpoint(path)
    del checkpoint.extras["critic"]
    checkpoint.config.sampler["steps"] = 50  # as an exported program keeps a DDLS default it cannot run
    save_checkpoint(path, checkpoint)
    settings = Settings(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu", batch_window_ms=5)
    with running_server(settings) as (base, _):
        assert not httpx.get(f"{base}/models").json()[0]["latent_langevin"]
        for fields in ({"steps": 5}, {"step_size": 0.1}, {"trajectory_every": 2}):
            reply = httpx.post(f"{base}/sample", json={"model": "gan", **fields})
            assert reply.status_code == 422 and "saved without its critic" in reply.json()["detail"]
        assert httpx.post(f"{base}/sample", json={"model": "gan", "steps": 0}).status_code == 200
        plain = httpx.post(f"{base}/sample", json={"model": "gan", "format": "json"})  # the plain pass by default
        assert plain.status_code == 200 and plain.json()["steps"] == 1


def test_gan_stream_is_one_frame_then_the_samples(server) -> None:
    base, _ = server
    with httpx.stream("POST", f"{base}/sample", json={"model": "gan", "n": 2, "stream": True}) as response:
        names = [line[7:] for line in response.iter_lines() if line.startswith("event: ")]
    assert names == ["frame", "done"]


def test_page_lists_the_gan_without_langevin_controls(server) -> None:
    base, _ = server
    assert json.dumps(httpx.get(f"{base}/models").json()).count('"family": "gan"') == 1


def test_a_gan_without_a_usable_latent_size_is_refused(models_dir: Path, tmp_path: Path) -> None:
    from training.runtime.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    good = load_checkpoint(write_tiny_gan(models_dir / "gan.safetensors"))
    good.config.sampler = {"temperature": 1.0, "weights": "ema"}
    save_checkpoint(models_dir / "no_latent.safetensors", Checkpoint(good.config, good.weights, good.extras))
    good.config.sampler = {"latent_dim": 16, "temperature": 1.0, "weights": "ema"}
    good.config.data = {"shape": [1, 32, 32], "range": [-1, 1]}
    save_checkpoint(models_dir / "wrong_shape.safetensors", Checkpoint(good.config, good.weights, good.extras))
    settings = Settings(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu")
    with running_server(settings) as (base, _):
        refused = httpx.get(f"{base}/readyz").json()["refused"]
        assert "sampler.latent_dim" in refused["no_latent.safetensors"]
        assert "[1, 28, 28]" in refused["wrong_shape.safetensors"]
        assert httpx.post(f"{base}/sample", json={"model": "gan"}).status_code == 200


def test_the_exported_dcgan_with_its_critic_gives_the_checkpoints_seeded_ddls_samples(tmp_path: Path) -> None:
    """`python -m training export` writes dcgan_mnist's critic beside its generator: the copy refines its latents
    by DDLS by default, as the checkpoint does, and scores images by the same critic."""
    from training.commands.cli import main

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(REPO / "checkpoints" / "dcgan_mnist.safetensors", models / "dcgan_mnist.safetensors")
    main(["export", str(models / "dcgan_mnist.safetensors"), "--out", str(models / "dcgan_copy.pt2")])
    assert (models / "dcgan_copy.critic.pt2").is_file()
    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu", sampling_dtype="float32")
    with running_server(settings) as (base, _):
        listed = {model["name"]: model for model in httpx.get(f"{base}/models").json()}
        assert listed["dcgan_copy"]["latent_langevin"] and "weights" not in listed["dcgan_copy"]["sampler"]
        assert listed["dcgan_copy"]["sampler"]["steps"] == listed["dcgan_mnist"]["sampler"]["steps"] == 50

        def answer(model: str, **fields) -> dict:
            reply = httpx.post(f"{base}/sample", json={"model": model, "n": 6, "seed": 21, "format": "json", **fields})
            assert reply.status_code == 200, reply.text
            return reply.json()

        for fields in ({}, {"steps": 20, "step_size": 0.01}):  # its default DDLS, and DDLS stepped per request
            native, copy = answer("dcgan_mnist", **fields), answer("dcgan_copy", **fields)
            assert copy["steps"] == native["steps"] == fields.get("steps", 50)
            assert np.abs(decoded(copy["images"]).astype(int) - decoded(native["images"]).astype(int)).max() <= 1
            assert copy["energy"] == pytest.approx(native["energy"], rel=1e-4, abs=1e-3)
        plain = answer("dcgan_copy", steps=0)
        assert not np.array_equal(decoded(plain["images"]), decoded(answer("dcgan_copy")["images"]))
        images = answer("dcgan_mnist", steps=0)["images"][:3]
        scores = {
            model: [
                result["critic"]
                for result in httpx.post(f"{base}/score", json={"model": model, "images": images}).json()["results"]
            ]
            for model in ("dcgan_mnist", "dcgan_copy")
        }
        assert scores["dcgan_copy"] == pytest.approx(scores["dcgan_mnist"], rel=1e-4, abs=1e-4)
