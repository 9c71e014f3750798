"""One round-trip check reused for every flow layer and model, plus exactness of the log-determinant."""

import math

import pytest
import torch

from training.losses import bits_per_dim, dequantize
from training.models.flows import NICE, AdditiveCoupling, DiagonalScaling, Flow


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Flows start as the identity; perturb every parameter so the checks see a real transform."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return module


CASES = {
    "additive coupling (even)": lambda: randomize(AdditiveCoupling(6, hidden=16, depth=2, parity=0)),
    "additive coupling (odd)": lambda: randomize(AdditiveCoupling(7, hidden=16, depth=2, parity=1)),
    "diagonal scaling": lambda: randomize(DiagonalScaling(6)),
    "NICE (logistic)": lambda: randomize(NICE((1, 2, 3), couplings=4, hidden=16, depth=2)),
    "NICE (gaussian)": lambda: randomize(NICE((6,), couplings=3, hidden=16, depth=2, base="gaussian")),
}


@pytest.mark.parametrize("name", CASES)
def test_round_trip_keeps_shape_dtype_and_cancels_log_dets(name: str) -> None:
    flow = CASES[name]()
    dim = 7 if "odd" in name else 6
    shape = flow.shape if isinstance(flow, Flow) else (dim,)
    x = torch.randn(5, *shape, dtype=torch.float64)
    flow = flow.double()
    y, forward_log_det = flow(x)
    back, inverse_log_det = flow.inverse(y)
    assert back.shape == x.shape and back.dtype == x.dtype
    assert forward_log_det.shape == (5,) and forward_log_det.device == x.device
    assert torch.allclose(back, x, atol=1e-10)
    assert torch.allclose(forward_log_det + inverse_log_det, torch.zeros(5, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_log_det_equals_the_autograd_jacobian(name: str) -> None:
    flow = CASES[name]().double()
    dim = 7 if "odd" in name else 6
    shape = flow.shape if isinstance(flow, Flow) else (dim,)
    for x in torch.randn(3, *shape, dtype=torch.float64):
        jacobian = torch.autograd.functional.jacobian(lambda point: flow(point.unsqueeze(0))[0].reshape(-1), x)
        expected = torch.linalg.slogdet(jacobian.reshape(jacobian.shape[0], -1))[1]
        assert flow(x.unsqueeze(0))[1].item() == pytest.approx(expected.item(), abs=1e-8)


def test_a_2d_density_integrates_to_one() -> None:
    flow = randomize(NICE((2,), couplings=4, hidden=16, depth=2, base="gaussian")).double()
    side = torch.linspace(-12, 12, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum() * (side[1] - side[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=0.02)


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


def test_flow_training_writes_a_checkpoint_with_test_bits_per_dim_and_resumes(tmp_path, idx_dir) -> None:
    from training.checkpoint import load_checkpoint
    from training.sampling import draw_samples, load_model
    from training.train_flow import FlowTrainConfig, train_flow

    config = dict(data_dir=str(idx_dir), out=str(tmp_path / "nice.safetensors"), epochs=1, batch_size=64,
                  hidden=16, depth=1, couplings=2, device="cpu")
    first = load_checkpoint(train_flow(FlowTrainConfig(**config)))
    assert first.config.family == "flow" and math.isfinite(first.config.metrics["test_bits_per_dim"])
    assert first.config.metrics["test_bits_per_dim"] > 0
    resumed = load_checkpoint(train_flow(FlowTrainConfig(**config | {"epochs": 2, "resume": True})))
    assert resumed.config.training["epochs_done"] == 2
    samples = draw_samples(load_model(tmp_path / "nice.safetensors"), 4)
    assert samples.shape == (4, 1, 28, 28) and samples.min() >= -1 and samples.max() <= 1
