"""POST /score as a client meets it: real HTTP with real PNG bytes, every family's scores, the same number for an
image alone and batched (a CNF's solve beside sampling chains too), 4xx for every bad input, the OOD verdict from
a recorded reference, and `python -m training score` giving the server's numbers."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    make_digits,
    write_idx,
    write_tiny_cnf,
    write_tiny_ebm,
    write_tiny_eqm,
    write_tiny_flow,
    write_tiny_gan,
)
from engine_bench import FakeClock
from payloads import png_b64
from PIL import Image
from server import running_server

from service.catalogue.buffer_store import BufferStore
from service.catalogue.registry import load_registry
from service.engine.messages import CancelledByClient, ScoreOrder
from service.engine.pools.score import score_pool_name
from service.engine.worker import Worker
from service.metrics import Metrics
from service.settings import Settings
from training.commands.cli import main
from training.sampling.scoring import LikelihoodSettings

KEY = "score-key"
TOLERANCE = 1e-2  # the tiny CNF's likelihood solves: loose, so that they take a second, not a minute
MAX_IMAGES = 8
AUTH = {"authorization": f"Bearer {KEY}"}
RED = np.stack([np.full((28, 28), 255), np.zeros((28, 28)), np.zeros((28, 28))], -1)  # a colour image


def digits(n: int, seed: int, side: int = 28) -> list[np.ndarray]:
    images, _ = make_digits(n, seed)
    return [image[:side, :side] for image in images]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, idx_dir: Path) -> Iterator[tuple[str, Path]]:
    """A server with one model of every family (a NICE flow trained here, its reference recorded first)."""
    from training.train.flow import FlowTrainConfig, train_flow

    root = tmp_path_factory.mktemp("score")
    models = root / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors")
    write_tiny_eqm(models / "digits.safetensors")
    write_tiny_eqm(models / "denoise.safetensors", seed=1)  # its OOD score: reconstruction
    write_tiny_gan(models / "gan.safetensors")
    write_tiny_flow(models / "nice.safetensors")
    write_tiny_cnf(models / "cnf.safetensors")
    trained = models / "trained.safetensors"
    config = FlowTrainConfig(
        arch="nice", data_dir=str(idx_dir), out=str(trained), epochs=2, batch_size=64, hidden=32, depth=1,
        couplings=4, device="cpu",
    )  # fmt: skip
    train_flow(config)
    main(["score", str(trained), "--record-reference", "--data-dir", str(idx_dir), "--reference-n", "128"])
    write_tiny_flow(models / "nice_png.safetensors")  # the same flow's OOD score corrected by PNG's bits
    for name, ood in (("digits", "typicality"), ("denoise", "reconstruction"), ("nice_png", "complexity_bits")):
        reference = ["--data-dir", str(idx_dir), "--dataset", "mnist", "--reference-n", "128", "--ood-score", ood]
        main(
            ["score", str(models / f"{name}.safetensors"), "--record-reference", "--data-dir", str(idx_dir), *reference]
        )
    settings = Settings(
        models_dir=models,
        state_dir=root / "state",
        device="cpu",
        api_key=KEY,
        max_score_images=MAX_IMAGES,
        max_score_body_bytes=256 * 1024,
        score_rtol=TOLERANCE,
        score_atol=TOLERANCE,
        max_n=4,
        max_steps=200,
    )
    with running_server(settings) as (base, _):
        yield base, models


def score(base: str, model: str, images: list[str], **fields) -> httpx.Response:
    return httpx.post(f"{base}/score", json={"model": model, "images": images, **fields}, headers=AUTH, timeout=120)


def results(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["results"]


FAMILIES = {
    "solo": ["energy"],
    "digits": ["energy"],
    "denoise": ["energy"],
    "gan": ["critic"],
    "nice": ["log_prob", "bits_per_dim"],
}


@pytest.mark.parametrize("model", [*FAMILIES, "cnf"])
def test_an_image_scores_the_same_alone_and_in_a_batch_beside_other_requests(served, model: str) -> None:
    base, _ = served
    side = 16 if model == "cnf" else 28
    images = [png_b64(image) for image in digits(4, seed=3, side=side)]
    alone = results(score(base, model, [images[1]]))[0]
    answers: dict[int, httpx.Response] = {}

    def send(index: int, batch: list[str]) -> None:
        answers[index] = score(base, model, batch)

    threads = [threading.Thread(target=send, args=(0, [images[0], images[1], images[2]]))]
    threads += [threading.Thread(target=send, args=(1, [images[3], images[1]]))]  # joins the same batch or solve
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for batched in (results(answers[0])[1], results(answers[1])[1]):
        assert batched.keys() == alone.keys()
        fields = FAMILIES.get(model, ["log_prob", "bits_per_dim", "evaluations"])
        recorded = model in ("digits", "denoise")  # their typicality and reconstruction references; others none
        assert set(alone) == {"ood", "ood_p", *fields} and (alone["ood_p"] is None) != recorded
        for name in [*fields, "ood"]:  # typicality's gradient norms and reconstruction's errors at seeded noise too
            assert batched[name] == pytest.approx(alone[name], rel=1e-5, abs=1e-5), name
    body = score(base, model, images[:2]).json()
    assert body["model"] == model and len(body["model_version"]) == 12 and len(body["results"]) == 2
    if model == "cnf":
        assert body["likelihood"] == LikelihoodSettings(TOLERANCE, TOLERANCE).report()
        assert all(result["evaluations"] > 6 for result in body["results"])


def test_a_cnf_likelihood_beside_sampling_chains_equals_it_alone(served) -> None:
    base, _ = served
    images = [png_b64(image) for image in digits(2, seed=5, side=16)]
    alone = results(score(base, "cnf", images))
    sampled: list[int] = []

    def sample() -> None:
        answer = httpx.post(
            f"{base}/sample", json={"model": "cnf", "n": 4, "steps": 40, "seed": 1}, headers=AUTH, timeout=120
        )
        sampled.append(answer.status_code)

    threads = [threading.Thread(target=sample) for _ in range(3)]
    for thread in threads:
        thread.start()
    beside = results(score(base, "cnf", images))
    for thread in threads:
        thread.join()
    assert sampled == [200, 200, 200]
    for one, other in zip(alone, beside, strict=True):
        assert other["bits_per_dim"] == pytest.approx(one["bits_per_dim"], rel=1e-5)
        assert other["evaluations"] == one["evaluations"]


def test_every_bad_input_is_a_4xx_that_says_what_is_wrong(served) -> None:
    base, _ = served
    good = png_b64(digits(1, seed=1)[0])
    cases = [
        (score(base, "digits", [good, png_b64(np.zeros((32, 32)))]), 422, "images[1]: image is 32x32"),
        (score(base, "digits", [png_b64(RED, "RGB")]), 422, "colour"),
        (score(base, "digits", [base64.b64encode(base64.b64decode(good)[:60]).decode()]), 422, "not a readable"),
        (score(base, "digits", ["not base64!"]), 422, "images[0] is not base64"),
        (score(base, "digits", [good] * (MAX_IMAGES + 1)), 422, f"at most {MAX_IMAGES}"),
        (score(base, "digits", []), 422, "images"),
        (score(base, "solo", [good], label=1), 422, "solo takes no label"),
        (score(base, "digits", [good], label=10), 422, "out of range"),
        (score(base, "nice", [good], label=0), 422, "takes no label"),
        (score(base, "nope", [good]), 404, "unknown model 'nope'"),
        (score(base, "digits", ["A" * 300_000]), 413, "larger than"),
        (httpx.post(f"{base}/score", json={"model": "digits", "images": [good]}), 401, ""),
        (httpx.post(f"{base}/score", content=b"model=digits", headers=AUTH), 415, "POST /score reads a JSON body"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (status, response.text)
        assert words in response.text, response.text


def test_a_flow_trained_here_scores_its_own_data_lower_than_shuffled_pixels_with_a_p_value(served) -> None:
    base, _ = served
    images, _ = make_digits(MAX_IMAGES, seed=9)
    shuffled = np.stack([np.random.default_rng(index).permutation(image.ravel()).reshape(28, 28) for index, image in
                         enumerate(images)])  # fmt: skip
    own = results(score(base, "trained", [png_b64(image) for image in images]))
    noise = results(score(base, "trained", [png_b64(image) for image in shuffled]))
    assert max(result["bits_per_dim"] for result in own) < min(result["bits_per_dim"] for result in noise)
    assert all(result["ood"] == result["bits_per_dim"] for result in own)
    own_p, noise_p = [result["ood_p"] for result in own], [result["ood_p"] for result in noise]
    assert np.median(own_p) > 0.1 and np.median(noise_p) < 0.05, (own_p, noise_p)  # typical / beyond the reference
    listed = {model["name"]: model["limits"]["score"] for model in httpx.get(f"{base}/models").json()}
    assert (
        listed["trained"]["ood_reference"]["n"] == 128
        and "test images 128..255" in listed["trained"]["ood_reference"]["split"]
    )
    assert listed["nice"]["ood_reference"] is None and listed["nice"]["ood_p"].startswith("null")
    assert listed["digits"]["max_images"] == MAX_IMAGES and listed["digits"]["max_body_bytes"] == 256 * 1024


def test_the_recorded_ood_scores_typicality_and_complexity_bits_are_what_they_say(served) -> None:
    """typicality: a distance from the reference statistics' Gaussian, with a p-value against the reference's
    distances; complexity_bits: the flow's bits of the image minus PNG's bits of it (level 9)."""
    base, _ = served
    images = digits(8, seed=5)
    listed = {model["name"]: model["limits"]["score"] for model in httpx.get(f"{base}/models").json()}
    assert listed["digits"]["ood_score"] == "typicality" and listed["digits"]["ood_reference"]["n"] == 128
    assert listed["nice_png"]["ood_score"] == "complexity_bits"
    assert listed["denoise"]["ood_score"] == "reconstruction" and listed["denoise"]["ood_reference"]["n"] == 128
    typical = results(score(base, "digits", [png_b64(image) for image in images]))
    assert all(row["ood"] >= 0 and 0 <= row["ood_p"] <= 1 for row in typical)
    corrected = results(score(base, "nice_png", [png_b64(image) for image in images]))
    plain = results(score(base, "nice", [png_b64(image) for image in images]))
    for image, row, same in zip(images, corrected, plain, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=9)
        assert row["bits_per_dim"] == same["bits_per_dim"]
        assert row["ood"] == pytest.approx(row["bits_per_dim"] * 784 - 8 * buffer.tell(), rel=1e-5)
        assert 0 <= row["ood_p"] <= 1 and same["ood_p"] is None


def test_the_python_client_scores_as_the_http_api_answers(served) -> None:
    """Client.score takes uint8 arrays, PIL images or PNG bytes, and hands back typed results equal to the JSON."""
    from samplebay_client import BadRequest, Client, ScoreResult

    base, _ = served
    images = digits(3, seed=21)
    answer = score(base, "nice_png", [png_b64(image) for image in images]).json()
    with Client(base, api_key=KEY) as client:
        scores = client.score("nice_png", [images[0], Image.fromarray(images[1]), base64.b64decode(png_b64(images[2]))])
        assert scores.model == "nice_png" and scores.ood_score == "complexity_bits"
        assert scores.model_version == answer["model_version"]
        assert scores.results == [ScoreResult.from_json(row) for row in answer["results"]]
        assert scores.results[0].bits_per_dim is not None and scores.results[0].energy is None
        with pytest.raises(BadRequest, match="label"):
            client.score("digits", [images[0]], label=True)  # type: ignore[arg-type]
        with pytest.raises(BadRequest, match="99 is out of range for digits"):
            client.score("digits", [images[0]], label=99)


@pytest.mark.parametrize("model", ["digits", "denoise", "trained", "cnf"])
def test_the_cli_gives_the_servers_numbers(served, model: str, tmp_path: Path, capsys) -> None:
    base, models = served
    side = 16 if model == "cnf" else 28
    folder = tmp_path / "pngs"
    folder.mkdir()
    encoded = []
    for index, image in enumerate(digits(3, seed=11, side=side)):
        encoded.append(png_b64(image))
        (folder / f"{index}.png").write_bytes(base64.b64decode(encoded[-1]))
    labelled = model in ("digits", "denoise")  # E(x, y): the OOD statistics under the label too
    server = score(base, model, encoded, **({"label": 2} if labelled else {})).json()
    capsys.readouterr()
    tolerance = ["--ode-rtol", str(TOLERANCE), "--ode-atol", str(TOLERANCE)] if model == "cnf" else []
    label = ["--label", "2"] if labelled else []
    main(["score", str(models / f"{model}.safetensors"), str(folder), "--json", *tolerance, *label])
    cli = json.loads(capsys.readouterr().out)
    assert cli["model_version"] == server["model_version"] and cli["ood_score"] == server["ood_score"]
    for mine, theirs in zip(cli["results"], server["results"], strict=True):
        assert mine.keys() == theirs.keys()
        for name, value in theirs.items():
            assert mine[name] == (None if value is None else pytest.approx(value, rel=1e-5, abs=1e-6)), name


def test_a_cancelled_likelihood_job_frees_its_chains_at_the_next_step(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_cnf(models / "cnf.safetensors")
    clock = FakeClock()
    registry = load_registry(models, torch.device("cpu"))
    worker = Worker(
        registry, BufferStore(tmp_path / "state"), torch.device("cpu"), Metrics(), 8, 16, 1e9, 0.0, clock=clock,
        likelihood=LikelihoodSettings(1e-3, 1e-3),
    )  # fmt: skip
    model = registry.models["cnf"]
    pool = worker.pools[score_pool_name(model)]
    answers: list = []
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    handle = worker.submit(ScoreOrder(model, images), answers.append, clock.now + 60)
    waiting: list = []
    worker.submit(ScoreOrder(model, images[:4]), waiting.append, clock.now + 60)  # 6 + 4 > the budget of 8
    worker.run_once()
    worker.run_once()
    assert pool.scheduler.running_chains == 6 and len(pool.scheduler.waiting) == 1 and not answers
    handle.cancel()
    worker.run_once()
    assert isinstance(answers[0], CancelledByClient)
    assert [job.n for job in pool.scheduler.running] == [4]  # the waiting request took the freed places


def test_one_pass_scores_run_inside_the_workers_score_memory_and_give_the_same_numbers(
    tmp_path: Path, idx_dir: Path
) -> None:
    """The app hands the worker `heap_blocks` (service/http/memory.py): a score pass's blocks come from the heap,
    not fresh mappings; where they come from changes no number (an energy's typicality gradient norms included)."""
    from service.http.memory import heap_blocks, map_large_blocks

    models = tmp_path / "models"
    models.mkdir()
    eqm = write_tiny_eqm(models / "digits.safetensors")
    reference = ["--data-dir", str(idx_dir), "--dataset", "mnist", "--reference-n", "32", "--ood-score", "typicality"]
    main(["score", str(eqm), "--record-reference", *reference])
    registry = load_registry(models, torch.device("cpu"))
    model = registry.models["digits"]
    images = torch.tensor(np.stack(digits(6, seed=3)), dtype=torch.float32)[:, None] / 127.5 - 1
    entered: list[int] = []

    @contextlib.contextmanager
    def recorded() -> Iterator[None]:
        entered.append(len(entered))
        with heap_blocks():
            yield

    map_large_blocks()  # as the app does first
    scores = []
    for memory in (None, recorded):
        clock = FakeClock()
        worker = Worker(
            registry, BufferStore(tmp_path / "state"), torch.device("cpu"), Metrics(), 8, 16, 1e9, 0.0, clock=clock,
            score_memory=memory,
        )  # fmt: skip
        answers: list = []
        worker.submit(ScoreOrder(model, images), answers.append, clock.now + 60)
        worker.run_once()
        scores.append(answers[0].scores)
    assert entered == [0]  # one pass of 6 images, inside it
    assert "log_grad_norm@0.6" in scores[0]
    for name, values in scores[0].items():
        torch.testing.assert_close(scores[1][name], values, rtol=1e-6, atol=1e-6)


def test_evaluate_reports_how_the_ood_score_tells_the_models_data_from_another_set(
    served, idx_dir: Path, tmp_path: Path, capsys
) -> None:
    """evaluate --ood-data: AUROC, AUPR and FPR95 of the recorded OOD score, its own test images against another
    IDX set's (here the same kind of images with their pixels shuffled, which the NICE gives more bits)."""
    _, models = served
    noise = tmp_path / "noise"
    noise.mkdir()
    images, _ = make_digits(64, seed=7)
    rng = np.random.default_rng(0)
    pixels = np.stack([rng.permutation(image.ravel()).reshape(28, 28) for image in images])
    write_idx(noise / "t10k-images-idx3-ubyte.gz", pixels)
    write_idx(noise / "t10k-labels-idx1-ubyte.gz", np.zeros(64, dtype=np.uint8))
    capsys.readouterr()
    flags = ["--data-dir", str(idx_dir), "--n", "32", "--ood-data", str(noise), "--ood-n", "64", "--device", "cpu"]
    main(["evaluate", str(models / "trained.safetensors"), *flags])
    report = json.loads(capsys.readouterr().out)
    figures = report["ood"]
    assert figures["score"] == "bits_per_dim" and figures["n_in"] == 64 and figures["n_out"] == 64
    assert figures["auroc"] > 0.9 and figures["aupr"] > 0.8 and 0 <= figures["fpr95"] < 1, figures


def test_evaluate_scores_an_ensemble_as_it_is_served_by_its_members_mean_energy(
    idx_dir: Path, tmp_path: Path, capsys
) -> None:
    """evaluate of an ensemble's members with --ood-data reports the ensemble's OOD figures (the mean energy the
    server scores it by), not its first member's."""
    from training.commands.ood_figures import roc_figures
    from training.runtime.load import load_model
    from training.train.data import load_dataset

    members = [write_tiny_ebm(tmp_path / f"pair_{seed}.safetensors", seed=seed, ensemble="pair") for seed in (0, 1)]
    other = tmp_path / "other"
    other.mkdir()
    images, _ = make_digits(48, seed=11)
    write_idx(other / "t10k-images-idx3-ubyte.gz", images[:, ::-1].copy())  # upside down
    write_idx(other / "t10k-labels-idx1-ubyte.gz", np.zeros(48, dtype=np.uint8))
    capsys.readouterr()
    flags = ["--data-dir", str(idx_dir), "--n", "16", "--ood-data", str(other), "--ood-n", "48", "--device", "cpu"]
    main(["evaluate", *map(str, members), *flags])
    figures = json.loads(capsys.readouterr().out)["ood"]
    inside = load_dataset("idx", str(idx_dir), "test").images[:48]
    outside = load_dataset("idx", str(other), "test").images[:48]
    loaded = [load_model(path) for path in members]
    with torch.no_grad():
        mean = [torch.stack([member.module(x) for member in loaded]).mean(0) for x in (inside, outside)]
        first = [loaded[0].module(x) for x in (inside, outside)]
    assert figures["score"] == "energy" and figures["n_in"] == 48 and figures["n_out"] == 48
    expected = roc_figures(*mean)
    assert {key: figures[key] for key in expected} == expected
    assert expected != roc_figures(*first)  # what evaluate reported before: the first member's energies
