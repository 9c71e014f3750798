"""Flows with variational dequantization (Ho et al. 2019, Flow++): a user's coupling flow and dequantizer q(u | x)
trained together here, exported by `training.convert.export_flow(..., dequantizer=)`. Its served bits/dim are the
variational bound computed in-process with the same noise, the same alone and batched, over HTTP and on the command
line (`score`, `evaluate`); hostile dequantizers are refused with the reason."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import httpx
import pytest
import torch
from conftest import write_tiny_flow
from PIL import Image
from programs import (
    SHAPE,
    CouplingFlow,
    DecodedFlow,
    TinyDequantizer,
    blocks,
    save_flow_programs,
    train_variational_flow,
)
from server import running_server
from torch import nn

from service.settings import Settings
from training.commands.cli import main
from training.convert import ConversionError, export_flow
from training.families import draw_samples
from training.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.runtime.exported import load_exported
from training.runtime.load import load_model
from training.sampling.dequantization import dequantizer_noise
from training.sampling.noise import chain_seeds
from training.sampling.scoring import image_seeds, one_pass_scores, score_family

DRAWS = 4  # the exported model's data.dequantization_samples: K draws of q(u | x) a score averages


@pytest.fixture(scope="module")
def user_flow() -> tuple[CouplingFlow, TinyDequantizer, torch.Tensor]:
    """The flow and its dequantizer trained together on 8-bit 1x8x8 images (~7 s on one core), and test levels."""
    flow, dequantizer = train_variational_flow(blocks(512, seed=0))
    return flow, dequantizer, blocks(128, seed=1)


def convert(flow: CouplingFlow, out: Path, dequantizer: nn.Module | None = None, draws: int | None = None) -> Path:
    """The user's conversion, served over [0, 255]: variationally dequantized with `dequantizer`, else uniformly."""
    export_flow(
        DecodedFlow(flow), out, SHAPE, forward=flow.encode, dequantizer=dequantizer, dequantization_samples=draws,
        range=(0.0, 255.0), trained_range=(0.0, 1.0), flat=True, quiet=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def models(user_flow, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder: the flow with its dequantizer (`variational`), and the same flow uniformly dequantized."""
    flow, dequantizer, _ = user_flow
    folder = tmp_path_factory.mktemp("variational")
    convert(flow, folder / "variational.pt2", dequantizer, DRAWS)
    convert(flow, folder / "uniform.pt2")
    return folder


def in_process_bits(flow: CouplingFlow, dequantizer: TinyDequantizer, levels: torch.Tensor, draws: int) -> torch.Tensor:
    """[N] bits/dim by the bound computed here from the user's own modules, with the noise the server draws (its
    counter-based eps of each image's seed and draw): -(mean_k [log p((k + u) / 256) - log q(u | x)] + D log(1/256))
    / (D log 2), the flow's density over [0, 1)."""
    seeds = image_seeds(levels.to(torch.uint8))[0]
    data, dim = levels.flatten(1).float(), levels[0].numel()
    bounds = []
    with torch.no_grad():
        for draw in range(draws):
            u, log_q = dequantizer(data / 255, dequantizer_noise(seeds, draw, SHAPE).flatten(1))
            bounds.append(flow.log_prob((data + u) / 256) - log_q)
    return -(torch.stack(bounds).mean(0) + dim * math.log(1 / 256)) / (dim * math.log(2))


def served_bits(path: Path, images: torch.Tensor) -> torch.Tensor:
    model = load_model(path)
    return one_pass_scores(score_family(model), [model], images, None)["bits_per_dim"]


def test_its_bits_per_dim_are_the_bound_with_the_same_noise_alone_and_batched(user_flow, models: Path) -> None:
    flow, dequantizer, test = user_flow
    sidecar = json.loads((models / "variational.json").read_text())["data"]
    assert sidecar["dequantization"] == "variational" and sidecar["dequantization_samples"] == DRAWS
    served = served_bits(models / "variational.pt2", test.float())  # levels k at k over [0, 255]
    torch.testing.assert_close(served, in_process_bits(flow, dequantizer, test, DRAWS), atol=1e-4, rtol=0)
    alone = served_bits(models / "variational.pt2", test[5:6].float())
    assert alone.item() == served[5].item()


def test_its_bound_is_no_worse_than_uniform_dequantization_of_the_same_flow(user_flow, models: Path) -> None:
    """Both are upper bounds on the flow's bits/dim (uniform is q = U[0, 1), log q = 0, where this dequantizer starts).
    A flow this small is nearly flat within each of its 256 bins: its true bits/dim (importance sampling, 512 draws)
    are 6.526 against uniform's 6.530, so no q could gain more than 0.004, and the one trained with it is close to
    uniform (measured 6.5301 with K = 4 against 6.5299); the bound must not be worse beyond the noise of the draws."""
    _, _, test = user_flow
    variational = served_bits(models / "variational.pt2", test.float()).mean().item()
    uniform = served_bits(models / "uniform.pt2", test.float()).mean().item()
    assert variational <= uniform + 0.01, (variational, uniform)


def test_its_samples_are_quantized_to_the_levels_like_a_uniform_flows(models: Path) -> None:
    levels = draw_samples(load_model(models / "variational.pt2"), chain_seeds(3, 16))  # [16, 1, 8, 8] in [0, 255]
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)


def write_pngs(levels: torch.Tensor, folder: Path) -> list[Path]:
    folder.mkdir()
    paths = [folder / f"{index:03d}.png" for index in range(len(levels))]
    for level, path in zip(levels, paths, strict=True):
        Image.fromarray(level[0].numpy().astype("uint8")).save(path)
    return paths


def test_score_over_http_agrees_with_the_score_command(
    user_flow, models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_pngs(user_flow[2][:12], tmp_path / "images")
    main(["score", str(models / "variational.pt2"), str(tmp_path / "images"), "--json"])
    command = [row["bits_per_dim"] for row in json.loads(capsys.readouterr().out)["results"]]
    images = [base64.b64encode(path.read_bytes()).decode() for path in paths]
    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu")
    with running_server(settings) as (base, _):
        batched = httpx.post(f"{base}/score", json={"model": "variational", "images": images}, timeout=60)
        alone = httpx.post(f"{base}/score", json={"model": "variational", "images": images[3:4]}, timeout=60)
    assert batched.status_code == 200, batched.text
    served = [row["bits_per_dim"] for row in batched.json()["results"]]
    assert served == pytest.approx(command, abs=1e-6)
    assert alone.json()["results"][0]["bits_per_dim"] == pytest.approx(served[3], abs=1e-6)


def test_evaluate_gives_the_mean_bound_of_the_test_images_that_score_gives(
    tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On 1x28x28 images, as evaluate's classifiers read: an untrained flow and a dequantizer moved off uniform."""
    torch.manual_seed(2)
    flow, dequantizer = CouplingFlow(dim=784, hidden=16, couplings=2).eval(), TinyDequantizer(dim=784, hidden=16)
    nn.init.normal_(dequantizer.net[2].weight, std=0.05)
    export_flow(
        DecodedFlow(flow), tmp_path / "mnist.pt2", (1, 28, 28), forward=flow.encode, dequantizer=dequantizer.eval(),
        trained_range=(0.0, 1.0), range=(-1.0, 1.0), flat=True, quiet=True,
    )  # fmt: skip
    main(["evaluate", str(tmp_path / "mnist.pt2"), "--data-dir", str(idx_dir), "--n", "8", "--device", "cpu"])
    figures = json.loads(capsys.readouterr().out)["model"]
    assert figures["test_bits_per_dim_estimator"].startswith("variational bound, 1 draw(s) of q(u | x) an image")
    main(["score", str(tmp_path / "mnist.pt2"), str(idx_dir / "t10k-images-idx3-ubyte.gz"), "--json"])
    rows = json.loads(capsys.readouterr().out)["results"]
    assert len(rows) == 256
    assert figures["test_bits_per_dim"] == pytest.approx(math.fsum(r["bits_per_dim"] for r in rows) / 256, abs=1e-4)


class NotFiniteDequantizer(nn.Module):
    """A dequantizer whose u (or log q) is NaN."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, log_q = torch.sigmoid(eps), torch.zeros(x.shape[0])
        return (u * float("nan"), log_q) if self.what == "u" else (u, log_q + float("nan"))


class Escaping(nn.Module):
    """A dequantizer whose u leaves [0, 1]: eps itself."""

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return eps, torch.zeros(x.shape[0])


@pytest.mark.parametrize(
    ("dequantizer", "reason"),
    [
        (NotFiniteDequantizer("u"), r"hostile.dequantizer.pt2: the u of its dequantizer is not finite"),
        (NotFiniteDequantizer("log_q"), r"hostile.dequantizer.pt2: the log q\(u \| x\) of its dequantizer is not fin"),
        (Escaping(), r"hostile.dequantizer.pt2: its u spans \[-\d.*\]; u is the offset within each level's bin"),
    ],
    ids=["nan-u", "nan-log-q", "u-outside-the-bin"],
)
def test_a_dequantizer_that_returns_nan_or_leaves_the_bin_is_refused_with_the_reason(
    user_flow, tmp_path: Path, dequantizer: nn.Module, reason: str
) -> None:
    path = save_flow_programs(user_flow[0], tmp_path / "hostile.pt2", (0.0, 1.0), dequantizer=dequantizer)
    with pytest.raises(CheckpointError, match=reason):
        load_exported(path)


def test_a_dequantizer_beside_a_uniform_sidecar_or_without_its_forward_is_refused(user_flow, tmp_path: Path) -> None:
    flow, dequantizer, _ = user_flow
    path = save_flow_programs(flow, tmp_path / "mixed.pt2", (0.0, 1.0), dequantizer=dequantizer)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    sidecar["data"]["dequantization"] = "uniform"
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match=r'mixed.dequantizer.pt2: a dequantizer serves .*"variational"; mixed'):
        load_exported(path)
    path = save_flow_programs(flow, tmp_path / "alone.pt2", (0.0, 1.0), dequantizer=dequantizer)
    (tmp_path / "alone.forward.pt2").unlink()
    with pytest.raises(CheckpointError, match=r"needs alone.forward.pt2 beside alone.pt2"):
        load_exported(path)


def test_the_conversion_helper_refuses_a_dequantizer_it_cannot_serve_and_writes_nothing(
    user_flow, tmp_path: Path
) -> None:
    flow, dequantizer, _ = user_flow
    with pytest.raises(ConversionError, match=r'^a dequantizer serves dequantization="variational" \(implied\), not'):
        export_flow(DecodedFlow(flow), tmp_path / "f.pt2", SHAPE, forward=flow.encode, dequantizer=dequantizer,
                    dequantization="uniform", flat=True, quiet=True)  # fmt: skip
    with pytest.raises(ConversionError, match=r"^the server would refuse f.pt2: f.dequantizer.pt2: the u of its"):
        export_flow(DecodedFlow(flow), tmp_path / "f.pt2", SHAPE, forward=flow.encode, flat=True, quiet=True,
                    dequantizer=NotFiniteDequantizer("u"))  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_velocity_field_or_a_checkpoint_stating_variational_dequantization_is_refused(tmp_path: Path) -> None:
    """Only an exported invertible flow brings a dequantizer: the others say why, at load."""
    field = tmp_path / "field.pt2"
    field.write_bytes(b"not read: the sidecar is refused first")
    data = {"shape": list(SHAPE), "dequantization": "variational"}
    sampler = {"solver": "euler", "steps": 2}
    field.with_suffix(".json").write_text(json.dumps({"family": "flow", "data": data, "sampler": sampler}))
    with pytest.raises(CheckpointError, match=r"field.json: .*\"variational\" is served for invertible flows with a"):
        load_model(field)
    checkpoint = load_checkpoint(write_tiny_flow(tmp_path / "nice.safetensors"))
    checkpoint.config.data["dequantization"] = "variational"
    save_checkpoint(tmp_path / "nice.safetensors", checkpoint)
    with pytest.raises(CheckpointError, match=r"\"variational\" is served for exported flows with their dequantizer"):
        load_model(tmp_path / "nice.safetensors")
