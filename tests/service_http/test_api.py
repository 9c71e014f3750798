"""The REST contract, through real HTTP against the app under uvicorn."""

import base64
import io
from pathlib import Path

import httpx
import pytest
from conftest import ENSEMBLE_FIGURES
from PIL import Image
from server import running_server

from service.settings import Settings


@pytest.fixture
def server(models_dir: Path, tmp_path: Path):
    settings = Settings(
        models_dir=models_dir, state_dir=tmp_path / "state", device="cpu", max_n=16, max_steps=500, max_body_bytes=4096
    )
    with running_server(settings) as (base, app):
        yield base, app


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def test_health_readiness_and_model_list(server) -> None:
    base, _ = server
    assert httpx.get(f"{base}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    models = {model["name"]: model for model in httpx.get(f"{base}/models").json()}
    assert set(models) == {"solo", "pair", "pair_a", "pair_b"}
    assert models["pair"]["members"] == ["pair_a", "pair_b"]
    assert models["pair_a"]["ensemble"] == "pair"
    solo = models["solo"]
    assert solo["family"] == "ebm" and solo["shape"] == [1, 28, 28]
    assert solo["sampler"]["steps"] == 10 and solo["limits"]["max_n"] == 16
    assert solo["metrics"] == {"val_cd": -0.1}
    assert models["pair"]["metrics"] == {"evaluate_ensemble_buffer": ENSEMBLE_FIGURES}  # the ensemble's own
    assert solo["buffer_size"] == 32 and models["pair"]["buffer_size"] == 64  # the members' buffers pooled
    assert httpx.get(f"{base}/openapi.json").json()["paths"]["/sample"]


def test_png_is_one_image_for_one_sample_and_a_grid_for_more(server) -> None:
    base, _ = server
    single = httpx.post(f"{base}/sample", json={"model": "solo"})
    assert single.status_code == 200 and single.headers["content-type"] == "image/png"
    assert decode_png(single.content).size == (28, 28)
    many = httpx.post(f"{base}/sample", json={"model": "solo", "n": 4, "steps": 3})
    image = decode_png(many.content)
    assert image.size == (2 + 2 * 30, 2 + 2 * 30) and image.mode == "L"


def test_json_carries_images_energies_seed_and_trajectory(server) -> None:
    base, _ = server
    reply = httpx.post(
        f"{base}/sample",
        json={
            "model": "pair",
            "n": 3,
            "steps": 7,
            "seed": 42,
            "format": "json",
            "trajectory_every": 3,
            "init": "noise",
        },
    )
    assert reply.status_code == 200
    body = reply.json()
    assert body["seed"] == 42 and body["steps"] == 7
    assert len(body["images"]) == 3 and len(body["energy"]) == 3
    assert all(decode_png(base64.b64decode(image)).size == (28, 28) for image in body["images"])
    assert body["trajectory_steps"] == [0, 3, 6, 7]
    assert [len(frame) for frame in body["trajectory"]] == [3, 3, 3, 3]
    assert body["trajectory"][0] != body["trajectory"][-1]
    assert body["timings"]["total_ms"] >= body["timings"]["run_ms"] > 0


def test_gif_animates_the_trajectory(server) -> None:
    base, _ = server
    reply = httpx.post(
        f"{base}/sample", json={"model": "solo", "n": 4, "steps": 8, "format": "gif", "trajectory_every": 2}
    )
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/gif"
    animation = Image.open(io.BytesIO(reply.content))
    assert animation.format == "GIF" and animation.n_frames == 5


BAD_REQUESTS = [
    ({"model": "nope"}, 404, "unknown model 'nope'"),
    ({"model": "solo", "n": 0}, 422, "greater than or equal to 1"),
    ({"model": "solo", "n": 17}, 422, "at most 16"),
    ({"model": "solo", "n": "many"}, 422, "valid integer"),
    ({"model": "solo", "steps": 0}, 422, "at least 1 Langevin step"),
    ({"model": "solo", "steps": -1}, 422, "greater than or equal to 0"),
    ({"model": "solo", "steps": 501}, 422, "at most 500"),
    ({"model": "solo", "step_size": -1}, 422, "greater than 0"),
    ({"model": "solo", "noise": -0.1}, 422, "greater than or equal to 0"),
    ({"model": "solo", "temperature": 0}, 422, "greater than or equal to 0.001"),
    ({"model": "solo", "format": "bmp"}, 422, "'png', 'json' or 'gif'"),
    ({"model": "solo", "init": "zeros"}, 422, "'buffer', 'noise' or 'image'"),
    ({"model": "solo", "init": "image"}, 422, "needs 'image'"),
    ({"model": "solo", "image": "aGVsbG8="}, 422, "only read with init 'image'"),
    ({"model": "solo", "init": "image", "image": "aGVsbG8="}, 422, "not a base64 image"),
    ({"model": "solo", "init": "image", "image": "%%%"}, 422, "not a base64 image"),
    (
        {"model": "solo", "label": 3},
        422,
        "'label' applies to class-conditional EBMs and CNFs; solo is an unconditional",
    ),
    ({"model": "solo", "seed": -5}, 422, "greater than or equal to 0"),
    ({"model": "solo", "colour": "red"}, 422, "Extra inputs are not permitted"),
    ({"model": "solo", "steps": 100, "trajectory_every": 1}, 422, "frames"),
    ({"n": 2}, 422, "Field required"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS)
def test_bad_input_is_a_4xx_that_says_what_is_wrong(server, body: dict, status: int, message: str) -> None:
    base, _ = server
    reply = httpx.post(f"{base}/sample", json=body)
    assert reply.status_code == status
    assert message in reply.text


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ('{"model": "solo", "step_size": NaN}', 422),
        ('{"model": "solo", "noise": Infinity}', 422),
        ("[]", 422),
        ("", 400),  # empty: says what to send
        ('{"model": "solo", ', 400),  # not JSON at all: no field to name (tests/service_http/test_request_errors.py)
    ],
)
def test_non_finite_numbers_and_broken_json_are_4xx(server, raw: str, status: int) -> None:
    base, _ = server
    reply = httpx.post(f"{base}/sample", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text


def test_oversized_body_is_413(server) -> None:
    base, _ = server
    reply = httpx.post(f"{base}/sample", json={"model": "solo", "padding": "x" * 5000})
    assert reply.status_code == 413 and "larger than 4096 bytes" in reply.text

    def chunks():
        yield b'{"model": "solo", "padding": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    chunked = httpx.post(f"{base}/sample", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413


def test_metrics_count_requests_and_steps(server) -> None:
    base, _ = server
    httpx.post(f"{base}/sample", json={"model": "solo", "steps": 4})
    httpx.post(f"{base}/sample", json={"model": "nope"})
    text = httpx.get(f"{base}/metrics").text
    assert 'samplebay_requests_total{model="solo",status="200"} 1.0' in text
    assert 'samplebay_requests_total{model="unknown",status="404"} 1.0' in text
    assert 'samplebay_langevin_steps_total{pool="solo"} 4.0' in text
    for name in (
        "samplebay_request_latency_seconds_bucket",
        "samplebay_queue_seconds_bucket",
        "samplebay_queue_depth",
        "samplebay_chains_per_step_bucket",
        'samplebay_buffer_size{pool="pair"}',
    ):
        assert name in text


def test_api_key_guards_sampling(models_dir: Path, tmp_path: Path) -> None:
    settings = Settings(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu", api_key="s3cret")
    with running_server(settings) as (base, _):
        assert httpx.post(f"{base}/sample", json={"model": "solo"}).status_code == 401
        ok = httpx.post(f"{base}/sample", json={"model": "solo"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(f"{base}/healthz").status_code == 200


def test_odd_headers_and_data_urls_are_4xx_not_500(models_dir: Path, tmp_path: Path) -> None:
    settings = Settings(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu", api_key="k")
    with running_server(settings) as (base, _):
        latin = {"Authorization": "Bearer \xe9".encode("latin-1")}
        odd = httpx.post(f"{base}/sample", json={"model": "solo"}, headers=latin)
        assert odd.status_code == 401
        no_comma = httpx.post(
            f"{base}/sample",
            json={"model": "solo", "init": "image", "image": "data:image/png"},
            headers={"Authorization": "Bearer k"},
        )
        assert no_comma.status_code == 422 and "not a base64 image" in no_comma.text


def test_n_never_exceeds_the_chain_budget(models_dir: Path, tmp_path: Path) -> None:
    settings = Settings(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu", chain_budget=4)
    with running_server(settings) as (base, app):
        reply = httpx.post(f"{base}/sample", json={"model": "solo", "n": 5})
        assert reply.status_code == 422 and "at most 4" in reply.text
        assert app.state.worker.running
        assert httpx.post(f"{base}/sample", json={"model": "solo", "n": 4, "steps": 2}).status_code == 200


def test_unservable_checkpoints_are_refused_and_the_rest_served(models_dir: Path, tmp_path: Path) -> None:
    from conftest import write_tiny_ebm

    from training.runtime.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    (models_dir / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2, 3]       ")
    broken = load_checkpoint(models_dir / "solo.safetensors")
    broken.config.arch = {"name": "no_such_net", "kwargs": {}}
    save_checkpoint(models_dir / "unknown_arch.safetensors", Checkpoint(broken.config, broken.weights))
    toy = load_checkpoint(models_dir / "solo.safetensors")
    toy.config.data = {"shape": [2], "range": [-1, 1], "dataset": "toy2d:moons"}
    save_checkpoint(models_dir / "toy.safetensors", Checkpoint(toy.config, toy.weights))
    write_tiny_ebm(models_dir / "clash_member.safetensors", ensemble="solo")  # ensemble named like a model
    settings = Settings(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu")
    with running_server(settings) as (base, _):
        refused = httpx.get(f"{base}/readyz").json()["refused"]
        assert "not a JSON object" in refused["garbage.safetensors"]
        assert "no_such_net" in refused["unknown_arch.safetensors"]
        assert "not an image" in refused["toy.safetensors"]
        assert "also a checkpoint's name" in refused["clash_member.safetensors"]
        served = {model["name"] for model in httpx.get(f"{base}/models").json()}
        assert served == {"pair", "pair_a", "pair_b"}  # 'solo' is refused with its clashing ensemble


def test_every_setting_is_a_command_line_flag_with_help() -> None:
    from service.__main__ import build_parser

    parser = build_parser()
    flags = {action.dest: action for action in parser._actions if action.dest != "help"}
    assert set(flags) == set(Settings.model_fields)
    assert all(action.help and "default" in action.help for action in flags.values())
    args = parser.parse_args(["--retry-after-s", "7", "--batch-window-ms", "2.5", "--models-dir", "elsewhere"])
    settings = Settings(**{key: value for key, value in vars(args).items() if value is not None})
    assert (settings.retry_after_s, settings.batch_window_ms, settings.models_dir) == (7, 2.5, Path("elsewhere"))
