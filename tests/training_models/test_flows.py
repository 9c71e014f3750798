"""One round-trip check reused for every flow layer and model, plus exactness of the log-determinant."""

import itertools
import math
import shlex
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from conftest import write_tiny_gan

from training.models.flows import (
    NICE,
    ActNorm,
    AdditiveCoupling,
    DiagonalScaling,
    Flow,
    FlowLayer,
    LogitTransform,
    Squeeze,
    bits_per_dim,
    dequantize,
)
from training.models.glow import AffineCoupling, Glow, InvertibleConv1x1, OnChannels
from training.models.iresnet import IResNet, LipschitzConv, ResidualBlock
from training.train.flow import FlowTrainConfig

Module = TypeVar("Module", bound=torch.nn.Module)


def randomize(module: Module, scale: float = 0.3) -> Module:
    """Flows start as the identity; perturb every parameter so the checks see a real transform."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
        for layer in module.modules():
            if isinstance(layer, ActNorm):
                layer.initialized.fill_(True)  # keep the perturbed values, not a data-dependent start
    return module


def iresnet_block(shape: tuple[int, int, int], **options) -> ResidualBlock:
    block = randomize(ResidualBlock(shape, hidden=8, tolerance=1e-12, max_iterations=500, **options))
    for module in block.modules():
        if isinstance(module, LipschitzConv):
            module.refresh(200)  # the perturbed weights need their spectral norms re-estimated
    return block.eval()  # in training mode every forward advances power iteration, a (slightly) new map


def iresnet(shape: tuple[int, ...], **options) -> IResNet:
    flow = randomize(IResNet(shape, blocks=2, hidden=8, tolerance=1e-12, max_iterations=500, **options))
    flow.refresh_spectral_norms(200)
    return flow.eval()


# name -> (a fresh, perturbed layer or model; the shape of one input)
CASES: dict[str, tuple[Callable[[], FlowLayer | Flow], tuple[int, ...]]] = {
    "additive coupling (even)": (lambda: randomize(AdditiveCoupling(6, hidden=16, depth=2, parity=0)), (6,)),
    "additive coupling (odd)": (lambda: randomize(AdditiveCoupling(7, hidden=16, depth=2, parity=1)), (7,)),
    "diagonal scaling": (lambda: randomize(DiagonalScaling(6)), (6,)),
    "squeeze": (Squeeze, (2, 4, 2)),
    "logit": (lambda: LogitTransform(0.05), (5,)),
    "actnorm": (lambda: randomize(ActNorm(3)), (3, 2, 2)),
    "invertible 1x1 conv": (lambda: randomize(InvertibleConv1x1(3)), (3, 2, 2)),
    "affine coupling": (lambda: randomize(AffineCoupling(3, hidden=8)), (3, 2, 2)),
    "affine coupling on active channels": (lambda: OnChannels(randomize(AffineCoupling(2, hidden=8)), 2), (4, 2, 1)),
    "i-resnet block (exact log-det)": (lambda: iresnet_block((2, 2, 2)), (2, 2, 2)),
    "NICE (logistic)": (lambda: randomize(NICE((1, 2, 3), couplings=4, hidden=16, depth=2)), (1, 2, 3)),
    "NICE (gaussian)": (lambda: randomize(NICE((6,), couplings=3, hidden=16, depth=2, base="gaussian")), (6,)),
    "glow (2 levels)": (lambda: randomize(Glow((1, 4, 4), levels=2, steps=2, hidden=8)), (1, 4, 4)),
    "glow on vectors": (lambda: randomize(Glow((3,), levels=1, steps=2, hidden=8)), (3,)),
    "i-resnet": (lambda: iresnet((1, 2, 4)), (1, 2, 4)),
    "i-resnet with logit preprocessing": (lambda: iresnet((1, 2, 2), logit_alpha=0.05), (1, 2, 2)),
    "i-resnet (2 scales)": (lambda: iresnet((1, 4, 4), scales=2), (1, 4, 4)),
}


def test_a_multiscale_iresnet_shares_its_blocks_among_the_squeezed_resolutions() -> None:
    flow = IResNet((1, 28, 28), blocks=5, hidden=4, scales=2)
    resolutions = [tuple(layer.convs[0].u.shape[2:]) for layer in flow.layers if isinstance(layer, ResidualBlock)]
    assert resolutions == [(14, 14)] * 2 + [(7, 7)] * 3
    assert flow.latent_shape == (16, 7, 7)
    with pytest.raises(ValueError, match="1 <= scales <= blocks"):
        IResNet((1, 28, 28), blocks=2, scales=3)


def inputs(n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Points inside (-1, 1), the data range every model sees (the logit layer needs it)."""
    return (torch.rand(n, *shape, dtype=torch.float64) * 2 - 1) * 0.99


@pytest.mark.parametrize("name", CASES)
def test_round_trip_keeps_shape_dtype_and_cancels_log_dets(name: str) -> None:
    make, shape = CASES[name]
    flow = make().double()
    x = inputs(5, shape)
    y, forward_log_det = flow(x)
    back, inverse_log_det = flow.inverse(y)
    assert back.shape == x.shape and back.dtype == x.dtype
    assert forward_log_det.shape == (5,) and forward_log_det.device == x.device
    assert torch.allclose(back, x, atol=1e-9)
    assert torch.allclose(forward_log_det + inverse_log_det, torch.zeros(5, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("name", CASES)
def test_log_det_equals_the_autograd_jacobian(name: str) -> None:
    make, shape = CASES[name]
    flow = make().double()
    for x in inputs(3, shape):
        jacobian = torch.autograd.functional.jacobian(lambda point: flow(point.unsqueeze(0))[0].reshape(-1), x)
        expected = torch.linalg.slogdet(jacobian.reshape(jacobian.shape[0], -1))[1]
        assert flow(x.unsqueeze(0))[1].item() == pytest.approx(expected.item(), abs=1e-8)


TWO_D_MODELS: dict[str, Callable[[], Flow]] = {
    "NICE": lambda: randomize(NICE((2,), couplings=4, hidden=16, depth=2, base="gaussian")),
    "glow": lambda: randomize(Glow((2,), levels=1, steps=3, hidden=16), scale=0.1),  # keeps its mass on the grid
    "i-resnet": lambda: iresnet((2,)),
}


@pytest.mark.parametrize("name", TWO_D_MODELS)
def test_a_2d_density_integrates_to_one(name: str) -> None:
    torch.manual_seed(0)
    flow = TWO_D_MODELS[name]().double()
    side = torch.linspace(-15, 15, 751, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum() * (side[1] - side[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=0.02)


def test_iresnet_inverse_converges_within_its_cap_on_mnist_sized_images() -> None:
    flow = IResNet((1, 28, 28), blocks=2, hidden=16, max_iterations=100, tolerance=1e-5).eval()
    flow.initialize(torch.rand(64, 1, 28, 28) * 2 - 1)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        z, _ = flow(x)
        back, _ = flow.inverse(z)
    blocks = [layer for layer in flow.layers if isinstance(layer, ResidualBlock)]
    assert all(0 < block.last_iterations.max() < 100 for block in blocks)
    assert (back - x).abs().max() < 1e-3
    frames = flow.inverse_states(z[:2])
    assert len(frames) > len(flow.layers)  # every fixed-point iterate is a frame
    assert all(frame.shape == (2, 1, 28, 28) for frame in frames)


def test_power_series_with_hutchinson_estimates_the_exact_log_det() -> None:
    torch.manual_seed(0)
    exact = iresnet_block((2, 2, 2), log_det="exact").double()
    series = iresnet_block((2, 2, 2), log_det="series", series_terms=30).double()
    series.load_state_dict(exact.state_dict())
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        truth = exact(x)[1].item()
        # Scoring draws each sample's probe from its bits: offsets far below the log-det's scale give 4000 probes.
        nudged = x + 1e-12 * torch.arange(4000, dtype=torch.float64).view(-1, 1, 1, 1)
        estimates = series(nudged)[1]
    assert estimates.mean().item() == pytest.approx(truth, abs=4 * estimates.std().item() / 4000**0.5 + 1e-6)
    assert abs(truth) > 0.05  # the check is not trivially about zero


def test_a_scored_iresnet_log_det_is_the_same_alone_in_a_batch_and_on_every_call() -> None:
    """The power series' Hutchinson probe comes from each image's own bits when scoring (no gradient kept), so the
    served bits/dim of an image do not depend on its batch or on the run; training keeps fresh random probes."""
    torch.manual_seed(0)
    flow = iresnet((1, 6, 6), log_det="series")
    images = torch.rand(5, 1, 6, 6)
    with torch.no_grad():
        batch, again = flow.log_prob(images), flow.log_prob(images)
        alone = torch.cat([flow.log_prob(image[None]) for image in images])
    assert torch.equal(batch, again)
    torch.testing.assert_close(alone, batch, rtol=0, atol=1e-5)
    block = iresnet_block((2, 2, 2), log_det="series")
    x = torch.rand(3, 2, 2, 2, requires_grad=True)
    first, second = block(x)[1], block(x)[1]
    assert not torch.equal(first, second)  # with a graph kept (training): a fresh probe each time


def test_spectral_normalization_holds_the_residual_branch_under_its_coefficient() -> None:
    block = iresnet_block((3, 6, 6), coefficient=0.7).double()
    x, other = torch.randn(2, 64, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        ratios = (block.residual(x) - block.residual(other)).flatten(1).norm(dim=1) / (x - other).flatten(1).norm(dim=1)
    assert ratios.max().item() <= 0.7 + 1e-6


def test_actnorm_starts_from_the_data() -> None:
    layer = ActNorm(3)
    x = torch.randn(256, 3, 5, 5) * torch.tensor([0.1, 1.0, 7.0]).view(1, 3, 1, 1) + 4
    y, _ = layer(x)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(y.std((0, 2, 3)), torch.ones(3), atol=1e-2)
    again, _ = layer(x * 2)  # the start happens once
    assert not torch.allclose(again.std((0, 2, 3)), torch.ones(3), atol=1e-1)


def test_samples_follow_the_temperature_and_shape() -> None:
    flow = NICE((1, 4, 4), couplings=2, hidden=8, depth=1)
    cold, warm = flow.sample(2000, 0.5), flow.sample(2000, 1.0)  # identity at init: samples are the base
    assert cold.shape == (2000, 1, 4, 4)
    assert cold.std().item() == pytest.approx(0.5 * warm.std().item(), rel=0.1)
    assert len(flow.inverse_states(torch.zeros(3, 16))) == 3  # two couplings and the scaling


def test_dequantized_uniform_density_is_8_bits_per_dim() -> None:
    pixels = torch.randint(0, 256, (1000, 10)).float() / 127.5 - 1
    noisy = dequantize(pixels)
    assert ((noisy - pixels).abs() <= 4 / 256).all() and (noisy >= -1).all() and (noisy < 1).all()
    uniform_log_prob = torch.full((1000,), 10 * math.log(1 / 2))  # density 1/2 per dim on [-1, 1]
    assert bits_per_dim(uniform_log_prob, 10).mean().item() == pytest.approx(8.0)


def test_data_dependent_start_scales_each_dimension_to_the_base() -> None:
    flow = NICE((4,), couplings=2, hidden=8, depth=1, base="gaussian")
    x = torch.randn(4000, 4) * torch.tensor([0.5, 1.0, 2.0, 0.001])
    flow.initialize(x)
    z, _ = flow(x)
    assert torch.allclose(z.std(0)[:3], torch.ones(3), rtol=0.05)
    assert z.std(0)[3] < 0.1  # a near-constant dimension is capped (min_std), not blown up


@pytest.mark.parametrize("arch", ["nice", "glow", "iresnet"])
def test_every_flow_trains_on_toy_2d_data_with_default_settings(arch: str, tmp_path) -> None:
    from training.commands.cli import main

    out = tmp_path / f"{arch}.safetensors"
    main(
        [
            "flow",
            "--arch",
            arch,
            "--dataset",
            "toy2d:moons",
            "--epochs",
            "1",
            "--max-batches",
            "3",
            "--test-batches",
            "1",
            "--hidden",
            "16",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    from training.runtime.load import load_model

    model = load_model(out)
    assert isinstance(model.module, Flow)
    assert model.shape == (2,) and model.module.sample(5).shape == (5, 2)


@pytest.mark.parametrize("arch", ["nice", "glow", "iresnet"])
def test_flow_training_writes_a_checkpoint_with_test_bits_per_dim_and_resumes(arch: str, tmp_path, idx_dir) -> None:
    from training.commands.cli import build_parser
    from training.commands.flags import config_from
    from training.families import draw_samples
    from training.runtime.checkpoint import load_checkpoint
    from training.runtime.load import load_model
    from training.sampling.noise import chain_seeds
    from training.train.flow import train_flow

    config: dict[str, Any] = dict(
        arch=arch,
        data_dir=str(idx_dir),
        out=str(tmp_path / "nice.safetensors"),
        epochs=1,
        batch_size=64,
        hidden=16,
        depth=1,
        couplings=2,
        steps=1,
        blocks=1,
        warmup_steps=3,
        max_grad_norm=10.0,
        device="cpu",
        save_dtype="float16",
    )
    first = load_checkpoint(train_flow(FlowTrainConfig(**config)))
    assert first.config.family == "flow" and math.isfinite(first.config.metrics["test_bits_per_dim"])
    assert first.config.metrics["test_bits_per_dim"] > 0
    assert {tensor.dtype for tensor in first.weights.values() if tensor.is_floating_point()} == {torch.float16}
    resumed = load_checkpoint(train_flow(FlowTrainConfig(**config | {"epochs": 2, "resume": True})))
    assert resumed.config.training["epochs_done"] == 2 and resumed.config.arch["name"] == arch
    command = shlex.split(resumed.config.training["command"])  # the recorded command rebuilds the same run
    parsed = config_from(build_parser().parse_args(command[3:]), FlowTrainConfig)
    assert parsed == FlowTrainConfig(**config | {"epochs": 2})
    samples = draw_samples(load_model(tmp_path / "nice.safetensors"), chain_seeds(0, 4))
    assert samples.shape == (4, 1, 28, 28) and samples.min() >= -1 and samples.max() <= 1


@pytest.mark.parametrize("name", TWO_D_MODELS)
def test_decode_gives_the_density_of_what_it_samples(name: str) -> None:
    torch.manual_seed(1)
    flow = TWO_D_MODELS[name]().double()
    z = torch.randn(16, 2, dtype=torch.float64)
    with torch.no_grad():
        x, log_prob, states = flow.decode(z)
        assert states == [] and torch.allclose(log_prob, flow.log_prob(x), atol=1e-8)


def tiny_run(arch: str, data_dir: Path, out: Path, **changes: Any) -> FlowTrainConfig:
    """The smallest real flow run on the fixture digits: 3 updates an epoch, one test batch, float32 saves."""
    options: dict[str, Any] = dict(
        arch=arch,
        data_dir=str(data_dir),
        out=str(out),
        epochs=1,
        batch_size=64,
        max_batches=3,
        test_batches=1,
        hidden=16,
        depth=1,
        couplings=2,
        steps=1,
        blocks=1,
        warmup_steps=2,
        device="cpu",
    )
    return FlowTrainConfig(**options | changes)


def assert_same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    different = [name for name in left if not torch.equal(left[name], right[name])]
    assert different == [], f"tensors differ: {different}"


@pytest.mark.parametrize("arch", ["nice", "glow", "iresnet"])
def test_the_checkpoint_ships_and_serves_the_weight_average_not_the_online_weights(
    arch: str, tmp_path, idx_dir
) -> None:
    """The average is what the checkpoint holds, what `load_model` (and so the server) runs and what the
    recorded test bits/dim measure; the online weights live only in the resume state."""
    from training.runtime.checkpoint import load_checkpoint
    from training.runtime.load import load_model
    from training.train.data import load_dataset
    from training.train.flow import dataset_bits_per_dim, train_flow
    from training.train.run import ResumeState

    config = tiny_run(arch, idx_dir, tmp_path / "flow.safetensors", ema_decay=0.9)
    shipped = load_checkpoint(train_flow(config))
    resume = load_checkpoint(ResumeState.path(config.resolved_run_dir()))
    assert_same_tensors(shipped.weights, resume.extras["ema"])
    served = load_model(config.out).module
    assert isinstance(served, Flow)
    assert_same_tensors(served.state_dict(), shipped.weights)
    parameters = [name for name, _ in served.named_parameters()]
    moved = [name for name in parameters if not torch.equal(shipped.weights[name], resume.weights[name])]
    assert len(moved) > len(parameters) // 2  # the average lags the online weights after 3 updates

    test = load_dataset("mnist", idx_dir, "test")
    recorded = shipped.config.metrics["test_bits_per_dim"]
    assert dataset_bits_per_dim(served, test, 500, torch.device("cpu"), 1) == pytest.approx(recorded, abs=1e-4)
    served.load_state_dict(resume.weights)
    assert dataset_bits_per_dim(served, test, 500, torch.device("cpu"), 1) != pytest.approx(recorded, abs=1e-3)


@pytest.mark.parametrize("arch", ["nice", "glow", "iresnet"])
def test_without_averaging_the_checkpoint_ships_the_online_weights(arch: str, tmp_path, idx_dir) -> None:
    from training.runtime.checkpoint import load_checkpoint
    from training.train.flow import train_flow
    from training.train.run import ResumeState

    config = tiny_run(arch, idx_dir, tmp_path / "flow.safetensors", ema_decay=0.0)
    shipped = load_checkpoint(train_flow(config)).weights
    online = load_checkpoint(ResumeState.path(config.resolved_run_dir())).weights
    assert shipped.keys() == online.keys()
    # i-ResNet: the shipped copy's power-iteration vectors `u` are refreshed at each epoch end; all else is equal
    same = [name for name in online if not (arch == "iresnet" and name.endswith(".u"))]
    assert_same_tensors({name: shipped[name] for name in same}, {name: online[name] for name in same})


@pytest.mark.parametrize("arch", ["nice", "glow", "iresnet"])
def test_a_run_stopped_after_one_epoch_and_resumed_equals_the_uninterrupted_run(arch: str, tmp_path, idx_dir) -> None:
    """The cosine schedule spans --epochs even when --stop-after-minutes ends the first part early, and the
    resume state carries the online weights, their average, Adam's moments and the RNG on from there."""
    from training.runtime.checkpoint import load_checkpoint
    from training.train.flow import train_flow
    from training.train.run import ResumeState

    whole = tiny_run(arch, idx_dir, tmp_path / "whole" / "flow.safetensors", epochs=2, ema_decay=0.9)
    uninterrupted = load_checkpoint(train_flow(whole))
    parts = tiny_run(arch, idx_dir, tmp_path / "parts" / "flow.safetensors", epochs=2, ema_decay=0.9)
    first = load_checkpoint(train_flow(replace(parts, stop_after_minutes=0)))
    assert first.config.training["epochs_done"] == 1
    resumed = load_checkpoint(train_flow(replace(parts, resume=True)))
    assert resumed.config.training["epochs_done"] == 2 and resumed.config.training["updates"] == 6
    assert_same_tensors(resumed.weights, uninterrupted.weights)
    online = [load_checkpoint(ResumeState.path(config.resolved_run_dir())).weights for config in (whole, parts)]
    assert_same_tensors(*online)


def test_the_learning_rate_warms_up_linearly_then_decays_by_cosine_to_its_floor() -> None:
    from training.train.run import scheduled_learning_rate

    def lr(update: int, schedule: str = "cosine", total: int = 110) -> float:
        return scheduled_learning_rate(1e-3, update, total, 10, schedule, 0.05)

    assert [lr(update) for update in range(10)] == pytest.approx([1e-4 * (step + 1) for step in range(10)])
    assert lr(10) == pytest.approx(1e-3)  # the peak right after warm-up
    assert lr(60) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))  # halfway down the cosine
    assert lr(109) == pytest.approx(0.05 * 1e-3, abs=1e-6)  # the last of 110 updates is at the floor (to 0.1%)
    assert lr(110) == pytest.approx(0.05 * 1e-3) and lr(500) == pytest.approx(0.05 * 1e-3)  # and stays there
    decaying = [lr(update) for update in range(10, 111)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(decaying))
    assert [lr(update, "constant") for update in (0, 9, 10, 109, 500)] == pytest.approx([1e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    assert lr(5, total=8) == pytest.approx(6e-4) and lr(20, total=8) == pytest.approx(1e-3)  # all warm-up: no decay
    assert scheduled_learning_rate(1e-3, 0, 100, 0, "cosine", 0.05) == pytest.approx(1e-3)  # no warm-up
    with pytest.raises(ValueError, match="cosine or constant"):
        scheduled_learning_rate(1e-3, 0, 100, 10, "linear", 0.05)


def test_more_power_series_terms_bring_the_log_det_estimate_to_the_exact_value_within_the_tail_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behrmann et al. 2019: K terms of sum (-1)^(k+1) tr(J^k) / k miss log det(I + J) by at most
    sum_{k>K} D Lip^k / k. With the D scaled basis vectors as Hutchinson probes (one per copy of the input) the
    mean estimate is the truncated series itself, free of probe noise: its error must shrink with K."""
    torch.manual_seed(0)
    exact = iresnet_block((2, 2, 2), log_det="exact", coefficient=0.97).double()
    series = iresnet_block((2, 2, 2), log_det="series", coefficient=0.97).double()
    series.load_state_dict(exact.state_dict())
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    basis = (8**0.5 * torch.eye(8, dtype=torch.float64)).reshape(8, 2, 2, 2)  # mean of v^T A v over them: tr(A)
    lipschitz = 0.97**3  # three convolutions, each at most 0.97, and 1-Lipschitz ELUs between them
    with torch.no_grad():
        truth = exact(x)[1].item()
    monkeypatch.setattr(torch, "randn_like", lambda like: basis)
    errors = {}
    with torch.enable_grad():  # training's random probes (scoring seeds them by the input's bits), here the basis
        for terms in (1, 2, 4, 8, 16):
            series.series_terms = terms
            errors[terms] = abs(series(x.expand(8, -1, -1, -1))[1].mean().item() - truth)
            tail = sum(8 * lipschitz**k / k for k in range(terms + 1, 2000))
            assert errors[terms] <= tail, f"{terms} terms: error {errors[terms]:.3g} over the bound {tail:.3g}"
    assert errors[1] > errors[2] > errors[4] > errors[8] > errors[16]
    assert errors[16] < 1e-6 * abs(truth)


def test_the_flow_series_terms_reach_every_block_and_reject_zero() -> None:
    flow = IResNet((1, 4, 4), blocks=3, hidden=4, series_terms=4)
    assert flow.series_terms == 4
    flow.series_terms = 12
    assert [layer.series_terms for layer in flow.layers if isinstance(layer, ResidualBlock)] == [12, 12, 12]
    with pytest.raises(ValueError, match="at least 1 term"):
        flow.series_terms = 0


def test_the_inverse_convergence_report_flags_samples_that_hit_the_cap_and_passes_the_rest() -> None:
    from training.models.iresnet import InverseConvergence

    torch.manual_seed(0)
    flow = iresnet((1, 4, 4)).double()  # tolerance 1e-12, cap 500
    z = torch.randn(6, 16, dtype=torch.float64) * torch.tensor([0.01, 0.1, 1, 3, 10, 30], dtype=torch.float64)[:, None]
    x, convergence = flow.invert(z)
    assert torch.equal(x, flow.inverse(z)[0])  # the same iterates as the inverse that samples
    assert convergence.converged.all() and (convergence.residual <= 1e-12).all()
    report = convergence.report()
    assert report["not_converged"] == 0 and report["not_converged_samples"] == [] and report["max_residual"] <= 1e-12
    needed = convergence.iterations
    assert needed.min() < needed.max()  # the inputs' scales make some samples need more iterations than others

    cap = int(needed.min())  # the fastest sample still converges; the slower ones run out of iterations
    for block in flow.layers:
        if isinstance(block, ResidualBlock):
            block.max_iterations = cap
    _, capped = flow.invert(z)
    assert capped.converged.tolist() == (needed <= cap).tolist()
    assert (capped.residual[~capped.converged] > 1e-12).all()
    report = capped.report()
    assert report["not_converged"] == int((needed > cap).sum()) > 0 and report["max_iterations"] == cap
    assert report["not_converged_samples"] == (needed > cap).nonzero().squeeze(1).tolist()
    assert report["max_residual"] == pytest.approx(capped.residual.max().item()) and report["max_residual"] > 1e-12

    both = InverseConvergence.concatenate([convergence, convergence])  # batches in sample order
    assert len(both) == 12 and both.report()["not_converged"] == 0
    with pytest.raises(ValueError, match="cannot be merged"):
        InverseConvergence.concatenate([convergence, capped])


def test_a_single_iteration_cap_leaves_every_sample_of_a_real_block_unconverged() -> None:
    torch.manual_seed(0)
    block = iresnet_block((2, 2, 2))
    block.max_iterations = 1
    y = torch.randn(5, 2, 2, 2)
    _, convergence = block.solve(y)
    assert not convergence.converged.any() and convergence.iterations.tolist() == [1] * 5
    assert block.last_convergence is convergence and convergence.report()["not_converged_samples"] == [0, 1, 2, 3, 4]


def write_tiny_flow(path: Path, arch_name: str) -> Path:
    """An untrained, perturbed flow checkpoint on 28x28 images (the i-ResNet with the default 5 series terms)."""
    from training.models import build_model
    from training.runtime.checkpoint import Checkpoint, ModelConfig, save_checkpoint

    torch.manual_seed(0)
    kwargs = {"iresnet": {"blocks": 2, "hidden": 8}, "nice": {"couplings": 2, "hidden": 8, "depth": 1}}[arch_name]
    arch = {"name": arch_name, "kwargs": {"shape": [1, 28, 28], "base": "gaussian", **kwargs}}
    flow = build_model(arch)
    assert isinstance(flow, Flow)
    flow.initialize(torch.rand(64, 1, 28, 28) * 2 - 1)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    if isinstance(flow, IResNet):
        flow.refresh_spectral_norms(200)  # the perturbed convolutions rescaled to Lipschitz 0.9 again
    config = ModelConfig(
        family="flow",
        arch=arch,
        data={"shape": [1, 28, 28], "range": [-1.0, 1.0], "dataset": "fake"},
        sampler={"temperature": 0.8, "base": "gaussian"},
    )
    save_checkpoint(path, Checkpoint(config, flow.state_dict()))
    return path


def test_evaluate_reports_the_series_terms_and_every_sample_whose_inverse_did_not_converge(
    tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from training.commands.cli import main
    from training.models.iresnet import EVALUATION_SERIES_TERMS
    from training.runtime.checkpoint import load_checkpoint, save_checkpoint
    from training.runtime.load import load_model
    from training.train.data import load_dataset
    from training.train.flow import dataset_bits_per_dim

    converging = write_tiny_flow(tmp_path / "iresnet.safetensors", arch_name="iresnet")
    words = ["--data-dir", str(idx_dir), "--n", "24", "--batch", "10", "--device", "cpu"]
    main(["evaluate", str(converging), *words])
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["series_terms"] == EVALUATION_SERIES_TERMS and report["model"]["series_terms_trained"] == 5
    assert report["sampler"]["temperature"] == 0.8
    inverse = report["inverse"]
    assert inverse["n"] == 24 and inverse["not_converged"] == 0 and report["model"]["inverse_not_converged"] == 0
    assert 0 <= inverse["max_residual"] <= inverse["tolerance"] and inverse["most_iterations"] < 100

    main(["evaluate", str(converging), *words, "--series-terms", "1"])
    fewer = json.loads(capsys.readouterr().out)["model"]
    flow = load_model(converging).module
    assert isinstance(flow, IResNet)
    flow.series_terms = 1
    one_term = dataset_bits_per_dim(flow, load_dataset("mnist", idx_dir, "test"), 500, torch.device("cpu"))
    assert fewer["series_terms"] == 1 and fewer["test_bits_per_dim"] == pytest.approx(one_term, abs=1e-4)
    assert fewer["test_bits_per_dim"] < report["model"]["test_bits_per_dim"] - 1e-4  # the trace alone: too few bits

    checkpoint = load_checkpoint(converging)
    checkpoint.config.arch["kwargs"]["max_iterations"] = 1  # one fixed-point step cannot reach 1e-5
    capped = tmp_path / "capped.safetensors"
    save_checkpoint(capped, checkpoint)
    main(["evaluate", str(capped), *words])
    captured = capsys.readouterr()
    inverse = json.loads(captured.out)["inverse"]
    assert inverse["not_converged"] == 24 and inverse["not_converged_samples"] == list(range(20))
    assert inverse["max_residual"] > inverse["tolerance"] and inverse["max_iterations"] == 1
    assert "WARNING: the fixed-point inverse of 24 of 24 samples did not reach tolerance" in captured.err


def test_evaluate_refuses_series_terms_before_sampling_a_model_without_a_power_series(
    tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.commands.cli import main

    nice = write_tiny_flow(tmp_path / "nice.safetensors", arch_name="nice")
    with pytest.raises(SystemExit):
        main(["evaluate", str(nice), "--data-dir", str(idx_dir), "--n", "8", "--device", "cpu", "--series-terms", "8"])
    err = capsys.readouterr().err
    assert "--series-terms sets the i-ResNet's log-det power series; nice is a nice flow" in err
    assert "samples" not in err  # refused before any was drawn
    gan = write_tiny_gan(tmp_path / "gan.safetensors")
    with pytest.raises(SystemExit):
        main(["evaluate", str(gan), "--data-dir", str(idx_dir), "--n", "8", "--device", "cpu", "--series-terms", "8"])
    assert "gan is a gan, which has no log-det" in capsys.readouterr().err
