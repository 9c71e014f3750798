"""Flows exported in both directions and velocity fields: `python -m training export` writes NICE and Glow as
NAME.pt2 (noise -> data) and NAME.forward.pt2 (data -> noise), which score data and give test bits/dim as their
checkpoints do, and a CNF's velocity field, which the ODE pool serves as it serves the checkpoint; a user's own
dequantized coupling flow, exported over three data ranges, has its own bits/dim through the server in each; a
forward program that lies about its log det is refused with the reason."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from conftest import CNF_SHAPE, write_tiny_cnf, write_tiny_flow
from payloads import png_b64
from programs import CouplingFlow, blocks, own_bits_per_dim, save_flow_programs, train_dequantized_flow
from server import running_server
from torch import nn

from service.settings import Settings
from training.commands.cli import main
from training.families import draw_samples, family_of
from training.runtime.checkpoint import CheckpointError
from training.runtime.exported import load_exported
from training.runtime.exported_modules import ExportedFlow, ExportedVelocity
from training.runtime.load import load_model
from training.sampling.likelihood import cnf_log_likelihood, field_and_divergence
from training.sampling.noise import chain_seeds
from training.sampling.scoring import one_pass_scores, score_family
from training.train.flow import dataset_bits_per_dim

RANGES = {"unit": (0.0, 1.0), "byte": (0.0, 255.0), "signed": (-1.0, 1.0)}
TOLERANCE = 1e-2  # the CNF likelihood solves here (loose: a few seconds); the same for the checkpoint and its copy


@pytest.fixture(scope="module")
def user_flow() -> tuple[CouplingFlow, torch.Tensor]:
    """A user's coupling flow trained here on 8-bit 1x8x8 images (levels 256, uniform dequantization; ~4 s on one
    core), and its test images' levels."""
    return train_dequantized_flow(blocks(512, seed=0)), blocks(128, seed=1)


def random_images(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """8-bit images [n, *shape] in [-1, 1], as datasets load them."""
    levels = torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed))
    return levels.float() / 127.5 - 1


@pytest.mark.parametrize("arch", ["nice", "glow"])
def test_an_exported_flow_scores_data_and_has_the_test_bits_of_its_checkpoint(arch: str, tmp_path: Path) -> None:
    checkpoint = write_tiny_flow(tmp_path / f"{arch}.safetensors", arch_name=arch)
    copy = tmp_path / "out" / f"{arch}_copy.pt2"
    main(["export", str(checkpoint), "--out", str(copy)])
    assert copy.with_name(f"{arch}_copy.forward.pt2").is_file()
    native, exported = load_model(checkpoint), load_model(copy)
    assert isinstance(exported.module, ExportedFlow) and exported.module.forward_program is not None
    assert exported.config.data["levels"] == 256 and "dequantization" not in exported.config.data
    images = random_images(6, (1, 28, 28), seed=2)
    ours = one_pass_scores(score_family(exported), [exported], images, None)
    theirs = one_pass_scores(score_family(native), [native], images, None)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-3)
    test = SimpleNamespace(images=images, shape=(1, 28, 28))  # evaluate's exact likelihood stage
    expected = dataset_bits_per_dim(native.module, test, 4, torch.device("cpu"))  # type: ignore[arg-type]
    assert dataset_bits_per_dim(exported.module, test, 4, torch.device("cpu")) == pytest.approx(expected, abs=1e-5)  # type: ignore[arg-type]


def test_evaluate_gives_an_exported_flows_test_bits_and_says_why_a_copy_without_its_forward_has_none(
    tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = write_tiny_flow(tmp_path / "nice.safetensors")
    copy = tmp_path / "nice_copy.pt2"
    main(["export", str(checkpoint), "--out", str(copy)])
    capsys.readouterr()
    words = ["--data-dir", str(idx_dir), "--n", "8", "--device", "cpu"]
    main(["evaluate", str(checkpoint), *words])
    native = json.loads(capsys.readouterr().out)["model"]
    main(["evaluate", str(copy), *words])
    exported = json.loads(capsys.readouterr().out)["model"]
    assert exported["test_bits_per_dim"] == pytest.approx(native["test_bits_per_dim"], abs=1e-4)
    copy.with_name("nice_copy.forward.pt2").unlink()
    main(["evaluate", str(copy), *words])  # samples and their figures; no test bits/dim, and why
    captured = capsys.readouterr()
    assert "test_bits_per_dim" not in json.loads(captured.out)["model"]
    assert "no test bits/dim: the exported flow has no nice_copy.forward.pt2" in captured.err


class FlatForward(nn.Module):
    """A forward program returning z flat, [B, D]: not the data's shape."""

    def __init__(self, flow: CouplingFlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow.encode(x.flatten(1))


def test_a_forward_program_that_lies_about_its_log_det_or_shape_is_refused_with_the_reason(
    user_flow, tmp_path: Path
) -> None:
    flow, _ = user_flow
    save_flow_programs(flow, tmp_path / "liar.pt2", (0.0, 255.0), lie=5.0)  # log det 5 nats too high
    with pytest.raises(CheckpointError, match=r"liar.forward.pt2: its log p\(x\) .* disagrees .* by up to 5"):
        load_exported(tmp_path / "liar.pt2")
    flat = save_flow_programs(flow, tmp_path / "flat.pt2", (0.0, 1.0))
    batch = torch.export.Dim("batch")
    program = torch.export.export(FlatForward(flow), (torch.rand(2, 1, 8, 8),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, tmp_path / "flat.forward.pt2")
    with pytest.raises(CheckpointError, match=r"flat.forward.pt2: the z of its forward program has shape \[2, 64\]"):
        load_exported(flat)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"levels": 255}, "data.levels is 255; this server draws and scores 8-bit images"),
        ({"dequantization": "learned"}, "data.dequantization must be one of uniform, variational, none, not 'learned'"),
        (
            {"dequantization": "variational"},
            r"stated.json: data.dequantization \"variational\" .* needs stated.dequantizer.pt2 beside stated.pt2",
        ),
        ({"dequantization_samples": 4}, 'state it only with data.dequantization "variational"'),
    ],
)
def test_a_flow_sidecar_with_levels_or_a_dequantization_not_served_is_refused(
    user_flow, tmp_path: Path, data: dict, reason: str
) -> None:
    path = save_flow_programs(user_flow[0], tmp_path / "stated.pt2", (0.0, 1.0), **data)
    with pytest.raises(CheckpointError, match=reason):
        load_exported(path)


def test_a_dequantized_flows_samples_are_quantized_to_its_levels_by_the_server(user_flow, tmp_path: Path) -> None:
    for name, (low, high) in RANGES.items():
        model = load_exported(save_flow_programs(user_flow[0], tmp_path / f"{name}.pt2", (low, high)))
        levels = (draw_samples(model, chain_seeds(3, 16)) - low) / (high - low) * 255  # [16, 1, 8, 8]
        torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)
        assert levels.min() >= 0 and levels.max() <= 255


def test_a_flow_stated_without_dequantization_scores_the_levels_values_and_samples_continuously(
    user_flow, tmp_path: Path
) -> None:
    flow, test = user_flow
    model = load_exported(save_flow_programs(flow, tmp_path / "plain.pt2", (0.0, 1.0), dequantization="none"))
    values = test[:8].float() / 255  # level k at k / 255: no noise
    scored = one_pass_scores(score_family(model), [model], values, None)["bits_per_dim"]
    with torch.no_grad():
        log_prob = flow.log_prob(values.flatten(1))
    torch.testing.assert_close(scored, -(log_prob + 64 * math.log(1 / 256)) / (64 * math.log(2)))
    levels = draw_samples(model, chain_seeds(3, 4)) * 255
    assert (levels - levels.round()).abs().max() > 0.01  # not quantized: continuous samples


def test_a_cnf_is_exported_as_its_velocity_field_with_the_checkpoints_samples_and_likelihood(tmp_path: Path) -> None:
    checkpoint = write_tiny_cnf(tmp_path / "cnf.safetensors")
    main(["export", str(checkpoint), "--out", str(tmp_path / "cnf_copy.pt2")])
    sidecar = json.loads((tmp_path / "cnf_copy.json").read_text())
    assert sidecar["family"] == "flow" and sidecar["sampler"]["solver"] == "midpoint"  # a CNF, as checkpoints say
    native, exported = load_model(checkpoint), load_model(tmp_path / "cnf_copy.pt2")
    assert isinstance(exported.module, ExportedVelocity) and family_of(exported) is family_of(native)
    assert exported.classes == native.classes and exported.sampler == native.sampler
    seeds, labels = chain_seeds(5, 4), torch.tensor([0, 3, 7, 9])
    for asked in (labels, None):  # guided labelled chains, and each chain's seeded class
        expected = draw_samples(native, seeds, labels=asked)
        torch.testing.assert_close(draw_samples(exported, seeds, labels=asked), expected, atol=1e-5, rtol=1e-5)
    points, times = random_images(2, CNF_SHAPE, seed=4), torch.tensor([0.3, 0.9])
    _, exact = field_and_divergence(exported.module, points, times, labels[:2], None)  # vector-Jacobian products
    torch.testing.assert_close(exact, field_and_divergence(native.module, points, times, labels[:2], None)[1])
    ours = cnf_log_likelihood(exported.module, points, labels[:2], TOLERANCE, TOLERANCE)  # Hutchinson's trace
    theirs = cnf_log_likelihood(native.module, points, labels[:2], TOLERANCE, TOLERANCE)
    torch.testing.assert_close(ours.log_prob, theirs.log_prob, atol=1e-3, rtol=1e-5)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, user_flow):
    """A server with a tiny CNF and NICE beside their exports, one copy without its forward program, and the user's
    dequantized flow exported over three data ranges."""
    models = tmp_path_factory.mktemp("flows")
    write_tiny_cnf(models / "cnf.safetensors")
    write_tiny_flow(models / "nice.safetensors")
    for name in ("cnf", "nice"):
        main(["export", str(models / f"{name}.safetensors"), "--out", str(models / f"{name}_copy.pt2")])
    main(["export", str(models / "nice.safetensors"), "--out", str(models / "one_way.pt2")])
    (models / "one_way.forward.pt2").unlink()
    for name, data_range in RANGES.items():
        save_flow_programs(user_flow[0], models / f"{name}.pt2", data_range)
    # float32 steps: under bfloat16 (auto, on a CPU with bfloat16 arithmetic) a checkpoint's field runs in autocast
    # and an exported program in the float32 it was traced in, so their images differ by design.
    settings = Settings(
        models_dir=models,
        state_dir=models / "state",
        device="cpu",
        score_rtol=TOLERANCE,
        score_atol=TOLERANCE,
        sampling_dtype="float32",
    )
    with running_server(settings) as (base, _):
        yield base


def scores(base: str, model: str, images: list[str]) -> list[dict]:
    response = httpx.post(f"{base}/score", json={"model": model, "images": images}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_the_exported_cnf_is_served_by_the_ode_pool_as_its_checkpoint(served) -> None:
    base = served
    for request in ({"label": 3}, {}, {"format": "json", "trajectory_every": 2}):
        body = {"n": 3, "seed": 7, "format": "json", **request}
        native = httpx.post(f"{base}/sample", json={"model": "cnf", **body}, timeout=60).json()
        exported = httpx.post(f"{base}/sample", json={"model": "cnf_copy", **body}, timeout=60).json()
        assert exported["images"] == native["images"], request
    models = {model["name"]: model for model in httpx.get(f"{base}/models").json()}
    assert models["cnf_copy"]["classes"] == models["cnf"]["classes"]
    images = [png_b64(level.numpy()[0]) for level in blocks(2, seed=5, side=CNF_SHAPE[1])]
    for ours, theirs in zip(scores(base, "cnf_copy", images), scores(base, "cnf", images), strict=True):
        assert ours["bits_per_dim"] == pytest.approx(theirs["bits_per_dim"], abs=1e-4)


def test_an_exported_flow_scores_over_http_as_its_checkpoint_and_one_without_its_forward_says_why(served) -> None:
    base = served
    images = [png_b64(((image[0] + 1) * 127.5).round().numpy()) for image in random_images(3, (1, 28, 28), seed=6)]
    for ours, theirs in zip(scores(base, "nice_copy", images), scores(base, "nice", images), strict=True):
        assert ours["bits_per_dim"] == pytest.approx(theirs["bits_per_dim"], abs=1e-4)
    refused = httpx.post(f"{base}/score", json={"model": "one_way", "images": images[:1]})
    assert refused.status_code == 422 and "one_way.forward.pt2 (x -> (z, log det))" in refused.text


@pytest.mark.parametrize("name", RANGES)
def test_a_dequantized_flow_exported_over_any_range_has_its_own_bits_per_dim_through_the_server(
    served, user_flow, name: str
) -> None:
    """The units: its log p in nats over the stated range, bins (high - low) / 256 wide; a whole number of bits
    off (the range's scale) would be a unit error."""
    base = served
    flow, test = user_flow
    own = own_bits_per_dim(flow, test)
    images = [png_b64(level.numpy()[0]) for level in test]
    bits = [
        row["bits_per_dim"]
        for start in range(0, len(images), 32)
        for row in scores(base, name, images[start : start + 32])
    ]
    assert math.fsum(bits) / len(bits) == pytest.approx(own, abs=0.01)


def test_a_dequantized_flows_samples_have_the_same_bits_per_dim_over_every_range(served) -> None:
    """A seeded sample's bits/dim in JSON (its continuous point's, from the inverse program's log p) do not depend
    on the range the flow was exported over; its PNG neither."""
    base = served
    answers = [
        httpx.post(f"{base}/sample", json={"model": name, "n": 4, "seed": 9, "format": "json"}).json()
        for name in RANGES
    ]
    for answer in answers[1:]:
        assert answer["images"] == answers[0]["images"]
        assert answer["bits_per_dim"] == pytest.approx(answers[0]["bits_per_dim"], abs=1e-4)
