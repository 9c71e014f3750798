"""POST /score's fast paths give what the plain ones gave: a request's images decoded as one batch are the numbers
each decodes to alone (decode_exact, as `python -m training score` reads them); hostile images (bad base64, PNG
bombs, wrong sizes and modes) are 422s that name the image and why; the answer is ScoreResponse as pydantic
renders it, built without it; and a client that leaves a score request waiting is noticed without polling."""

from __future__ import annotations

import base64
import gc
import io
import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from conftest import make_digits, write_tiny_cnf, write_tiny_ebm, write_tiny_eqm, write_tiny_flow, write_tiny_gan
from PIL import Image
from server import metric, running_server, wait_for

from service.catalogue.registry import ServedModel
from service.engine.pools.score import score_pool_name
from service.http.schemas import ScoreResponse
from service.http.score_route import decode_images, scoring_of
from service.settings import Settings
from training.commands.cli import main
from training.runtime.images import decode_exact

KEY = "decode-key"
AUTH = {"authorization": f"Bearer {KEY}"}


def encoded(image: Image.Image, form: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=form)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey_png(width: int, height: int, rows: bytes, *chunks: bytes) -> str:
    """A hand-made 8-bit grey PNG: IHDR as given, `chunks`, then `rows` (filter bytes included) deflated."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    body = header + b"".join(chunks) + png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b"")
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + body).decode("ascii")


def uploads(channels: int) -> list[str]:
    """Images of 20x24 pixels in every mode an upload of `channels` channels may come in."""
    rng = np.random.default_rng(channels)
    grey = Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), "L")
    colour = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "RGB")
    if channels == 1:
        opaque = Image.merge("LA", [grey, Image.new("L", grey.size, 255)])
        return [encoded(grey), encoded(grey, "JPEG"), encoded(opaque), encoded(grey.convert("P"))]
    return [encoded(colour), encoded(colour, "JPEG"), encoded(colour.convert("RGBA")), encoded(colour.quantize(64))]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_a_batch_decodes_to_the_numbers_and_layout_of_its_images_decoded_alone(channels, data_range) -> None:
    texts = uploads(channels)
    shape = (channels, 20, 24)
    model = SimpleNamespace(members=[SimpleNamespace(shape=shape, data_range=data_range)])
    batch = decode_images(texts, model)  # type: ignore[arg-type]
    alone = torch.stack([decode_exact(base64.b64decode(text), shape, data_range) for text in texts])
    assert torch.equal(batch, alone)
    # A grey batch's strides are a stacked batch's, not the channels-last ones a convolution reads differently.
    assert batch.stride() == alone.stride() and batch.dtype == torch.float32


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, idx_dir: Path) -> Iterator[str]:
    """A server with a model of every family; the flow with a recorded reference (so `ood_p` is a number)."""
    root = tmp_path_factory.mktemp("decoding")
    models = root / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors")
    write_tiny_eqm(models / "digits.safetensors")
    write_tiny_gan(models / "gan.safetensors")
    write_tiny_flow(models / "nice.safetensors")
    write_tiny_cnf(models / "cnf.safetensors")
    reference = ["--record-reference", "--data-dir", str(idx_dir), "--dataset", "mnist", "--reference-n", "128"]
    main(["score", str(models / "nice.safetensors"), *reference])
    settings = Settings(
        models_dir=models,
        state_dir=root / "state",
        device="cpu",
        api_key=KEY,
        max_score_images=8,
        max_score_body_bytes=512 * 1024,
        score_rtol=1e-2,
        score_atol=1e-2,
    )
    with running_server(settings) as (base, _):
        yield base


def score(base: str, model: str, images: list[str], **fields) -> httpx.Response:
    return httpx.post(f"{base}/score", json={"model": model, "images": images, **fields}, headers=AUTH, timeout=120)


def digit_pngs(n: int, side: int = 28) -> list[str]:
    images, _ = make_digits(n, seed=5)
    return [encoded(Image.fromarray(image[:side, :side], "L")) for image in images]


def test_hostile_images_are_422s_that_name_the_image_and_why(served) -> None:
    good = digit_pngs(1)[0]
    huge = grey_png(60_000, 60_000, b"\0" * 100)  # 69 bytes that claim 3.6 billion pixels
    text_bomb = grey_png(28, 28, b"\0" * 29 * 28, png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 50_000_000)))
    transparent = Image.merge("LA", [Image.new("L", (28, 28), 9), Image.new("L", (28, 28), 0)])
    wide = np.zeros((28, 28), dtype=np.uint16) + 300
    cases = [
        ([good, "not base64!"], "images[1] is not base64"),
        ([good, good[:-3]], "images[1] is not base64"),  # cut mid-way: a length no base64 has
        ([good, base64.b64encode(b"GIF89a" + b"\0" * 40).decode()], "images[1]: not a readable image"),
        ([huge], "images[0]: not a readable image (DecompressionBombError)"),
        ([good, good, text_bomb], "images[2]: not a readable image"),
        ([good, digit_pngs(1, side=20)[0]], "images[1]: image is 20x20 pixels (L); the model scores 28x28"),
        ([encoded(transparent)], "images[0]: image has transparent pixels (LA)"),
        ([encoded(Image.new("RGB", (28, 28), (200, 0, 0)))], "images[0]: image is in colour (RGB)"),
        ([encoded(Image.fromarray(wide))], "images[0]: image has I;16 pixels, not 8-bit levels"),  # was clipped at 255
    ]
    for images, words in cases:
        response = score(served, "digits", images)
        assert response.status_code == 422, (words, response.text)
        assert words in response.json()["detail"], response.text


def test_a_deflate_bomb_behind_a_true_header_decodes_only_the_pixels_it_declares(served) -> None:
    """50 MB of zeros deflated behind a 28x28 header: the decoder stops at the 28 rows it declares (tens of ms),
    and the image scores as those rows do (each alone: rows of one batch may differ in their last bits)."""
    bomb = grey_png(28, 28, b"\0" * 50_000_000)
    plain = grey_png(28, 28, b"\0" * 29 * 28)
    started = time.monotonic()
    bombed = score(served, "digits", [bomb])
    assert bombed.status_code == 200, bombed.text
    assert time.monotonic() - started < 10
    assert bombed.json()["results"] == score(served, "digits", [plain]).json()["results"]


def test_data_urls_and_wrapped_base64_score_as_the_plain_image(served) -> None:
    plain = digit_pngs(1)[0]
    wrapped = "\n".join(plain[start : start + 76] for start in range(0, len(plain), 76))  # MIME's line length
    answers = [
        score(served, "digits", [text]).json()["results"] for text in (plain, f"data:image/png;base64,{plain}", wrapped)
    ]
    assert answers[1] == answers[0] and answers[2] == answers[0]


@pytest.mark.parametrize("model", ["solo", "digits", "gan", "nice", "cnf"])
def test_the_answer_is_the_response_schema_as_pydantic_renders_it(served, model: str) -> None:
    """What the route used to send: ScoreResponse dumped without nulls, `ood` and `ood_p` put back (null where
    unknown), key for key in the schema's order."""
    images = digit_pngs(3, side=16 if model == "cnf" else 28)
    answer = score(served, model, images)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    schema = ScoreResponse.model_validate(body)
    rendered = schema.model_dump(exclude_none=True)
    for item, result in zip(rendered["results"], schema.results, strict=True):
        item["ood"], item["ood_p"] = result.ood, result.ood_p
    assert json.dumps(body) == json.dumps(rendered)
    assert all(set(result) >= {"ood", "ood_p"} for result in body["results"])
    if model == "nice":
        assert all(isinstance(result["ood_p"], float) for result in body["results"])


def test_a_models_scoring_facts_are_worked_out_once_and_forgotten_with_it(tmp_path: Path) -> None:
    from training.runtime.load import load_model

    member = load_model(write_tiny_flow(tmp_path / "nice.safetensors"), torch.device("cpu"))
    model = ServedModel(name="nice", family="flow", members=[member], version="a")
    assert scoring_of(model) is scoring_of(model)
    again = ServedModel(name="nice", family="flow", members=[member], version="b")  # a reload: its own
    assert scoring_of(again) == scoring_of(model) and scoring_of(again) is not scoring_of(model)
    from service.http import score_route

    keys = {id(model), id(again)}
    assert keys <= set(score_route._scorings)
    del model, again
    gc.collect()  # other tests' models may go with them: only these two entries are this test's
    assert not keys & set(score_route._scorings)


def test_a_client_that_leaves_a_waiting_score_request_frees_its_chains(tmp_path: Path) -> None:
    """A CNF's solves at a tight tolerance outlast the client's 0.5 s: its leaving is seen (no polling: the
    server's receive says so) and its images leave the pool."""
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_cnf(models / "cnf.safetensors")
    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu", score_rtol=1e-7, score_atol=1e-7)
    with running_server(settings) as (base, app):
        images = digit_pngs(4, side=16)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/score", json={"model": "cnf", "images": images}, timeout=0.5)
        pool = app.state.worker.pools[score_pool_name(app.state.registry.models["cnf"])]
        wait_for(lambda: pool.scheduler.running_chains == 0 and not pool.scheduler.waiting, 30, "chains freed")
        wait_for(lambda: metric(base, 'samplebay_requests_total{model="cnf",status="499"}') == 1, 10, "a 499")
