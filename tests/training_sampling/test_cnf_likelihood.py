"""A CNF's exact likelihood: the adaptive dopri5 solve, the exact and Hutchinson traces, a 2-D density that
integrates to one, the figure converging as the tolerance tightens, and `evaluate` reporting it."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from training.models.cnf import MLPVelocity, UNetVelocity
from training.runtime.load import load_model
from training.sampling.likelihood import cnf_log_likelihood, field_and_divergence
from training.sampling.noise import chain_seeds
from training.sampling.ode import dopri5
from training.train.data import toy2d
from training.train.flow import FlowTrainConfig, train_flow

ROOT = Path(__file__).resolve().parents[2]


def test_dopri5_meets_its_tolerance_per_sample_forwards_and_backwards() -> None:
    rates = torch.tensor([[1.0], [5.0], [20.0]], dtype=torch.float64)  # [3, 1]: dy/dt = -k y, y(t) = e^(-k t)

    def decay(y: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return -rates[rows] * y

    errors = []
    for rtol in (1e-3, 1e-5, 1e-8):
        solution = dopri5(decay, torch.ones(3, 1, dtype=torch.float64), 0.0, 1.0, rtol, rtol)
        errors.append((solution.state[:, 0] - torch.exp(-rates[:, 0])).abs().max().item())
        assert solution.evaluations[0] < solution.evaluations[2], "the stiffer sample should take more steps"
    assert errors[0] < 1e-3 and errors[2] < 1e-8 and errors[0] > errors[1] > errors[2]
    back = dopri5(decay, torch.exp(-rates), 1.0, 0.0, 1e-8, 1e-14)
    torch.testing.assert_close(back.state, torch.ones(3, 1, dtype=torch.float64), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="rtol > 0 and atol > 0"):
        dopri5(decay, torch.ones(3, 1, dtype=torch.float64), 0.0, 1.0, 0.0, 1e-5)


def test_the_exact_trace_is_the_jacobians_on_the_unet() -> None:
    torch.manual_seed(0)
    field = UNetVelocity(1, 4, num_classes=3)
    x, t, labels = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 2, -1])
    _, exact = field_and_divergence(field, x, t, labels, None)
    traces = []
    for i in range(3):

        def one(z: torch.Tensor, i: int = i) -> torch.Tensor:
            return field(z[None], t[i : i + 1], labels[i : i + 1])[0]

        traces.append(torch.autograd.functional.jacobian(one, x[i], vectorize=True).reshape(64, 64).trace())
    torch.testing.assert_close(exact, torch.stack(traces), rtol=1e-4, atol=1e-5)


def gaussian_run(out: Path) -> FlowTrainConfig:
    """A CNF on the off-centre 2-D Gaussian, trained in about a second."""
    return FlowTrainConfig(
        arch="cnf", dataset="toy2d:gaussian", hidden=32, epochs=1, batch_size=256, max_batches=100,
        lr=3e-3, warmup_steps=20, out=str(out), autocast="none", threads=1,
    )  # fmt: skip


def test_a_2d_cnfs_density_integrates_to_one_over_the_plane(tmp_path) -> None:
    out = tmp_path / "gaussian.safetensors"
    train_flow(gaussian_run(out))
    field = load_model(out).module
    side = torch.linspace(-3.0, 3.0, 81)  # spacing 0.075
    grid = torch.cartesian_prod(side, side)  # [81^2, 2]
    density = cnf_log_likelihood(field, grid, rtol=1e-4, atol=1e-4, probes=0).log_prob.exp()
    mass = density.sum().item() * 0.075**2
    # Within 0.02: the prior's mass outside [-3, 3]^2 is 0.5 % and the grid's Riemann error is smaller.
    assert abs(mass - 1.0) < 0.02, f"exp(log p) integrates to {mass:.4f} over the grid, not 1"
    data = toy2d("gaussian", 500, torch.Generator().manual_seed(0))  # N((0.4, -0.3), diag(0.3, 0.1)^2)
    fitted = cnf_log_likelihood(field, data, rtol=1e-4, atol=1e-4, probes=0).log_prob.mean().item()
    prior = (-0.5 * data.pow(2).sum(1) - math.log(2 * math.pi)).mean().item()
    best = -0.5 * 2 - math.log(2 * math.pi * 0.3 * 0.1)  # the data's own entropy: no density does better on average
    assert prior + 1.5 < fitted < best + 0.1, f"mean log p {fitted:.3f}: prior {prior:.3f}, true density {best:.3f}"


def tiny_image_field() -> UNetVelocity:
    torch.manual_seed(1)
    return UNetVelocity(1, 4, num_classes=10).eval()


def test_hutchinson_and_exact_traces_agree_within_the_estimators_error_on_a_small_image_model() -> None:
    field = tiny_image_field()
    points = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1  # [2, 1, 8, 8]
    labels = torch.tensor([5, -1])
    exact = cnf_log_likelihood(field, points, labels, rtol=1e-3, atol=1e-3, probes=0).log_prob  # [2]
    draws = torch.stack(  # [6, 2]: one probe a sample, six independent probe seeds
        [
            cnf_log_likelihood(field, points, labels, 1e-3, 1e-3, probes=1, probe_seeds=chain_seeds(d, 2)).log_prob
            for d in range(6)
        ]
    )
    standard_error = draws.std(0) / math.sqrt(len(draws))  # [3]
    assert (standard_error > 0).all(), "different probe seeds should give different estimates"
    gap = (draws.mean(0) - exact).abs()
    assert (gap < 4 * standard_error).all(), f"Hutchinson's mean is {gap} from the exact trace (s.e. {standard_error})"


def test_the_log_density_converges_as_the_tolerance_tightens(tmp_path) -> None:
    out = tmp_path / "gaussian.safetensors"
    train_flow(gaussian_run(out))
    field = load_model(out).module
    data = toy2d("gaussian", 64, torch.Generator().manual_seed(1))
    tolerances = (1e-3, 1e-4, 1e-5, 1e-6)  # float32 fields: 1e-6 is the tightest tolerance worth asking for
    solves = {tol: cnf_log_likelihood(field, data, rtol=tol, atol=tol, probes=0) for tol in tolerances}
    errors = [(solves[tol].log_prob - solves[1e-6].log_prob).abs().max().item() for tol in tolerances[:3]]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, f"errors {errors} at rtol 1e-3, 1e-4, 1e-5"
    assert solves[1e-3].evaluations.float().mean() < solves[1e-5].evaluations.float().mean()


def test_a_samples_likelihood_is_the_same_alone_and_batched() -> None:
    field = MLPVelocity(2, 16)
    points = torch.randn(5, 2)
    seeds = chain_seeds(7, 5)
    batched = cnf_log_likelihood(field, points, probes=2, probe_seeds=seeds, rtol=1e-4, atol=1e-4)
    alone = cnf_log_likelihood(field, points[3:4], probes=2, probe_seeds=seeds[3:4], rtol=1e-4, atol=1e-4)
    # batched matmuls round apart (~4e-5 seen on CI), so within the solve's own tolerance
    torch.testing.assert_close(alone.log_prob, batched.log_prob[3:4], rtol=1e-4, atol=1e-4)
    assert alone.evaluations.item() == batched.evaluations[3].item()


def test_the_likelihood_benchs_estimator_rows_put_hutchinson_within_its_error_of_the_exact_trace() -> None:
    """bench/cnf_likelihood.py's estimator rows on 8-bit 8x8 images: each Hutchinson row's mean error against
    the exact trace is within its own standard error's reach, and 4 probes are less noisy an image than 1."""
    spec = importlib.util.spec_from_file_location("cnf_likelihood", ROOT / "bench" / "cnf_likelihood.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pixels = torch.randint(0, 256, (8, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    exact, one, four = bench.estimator_comparison(tiny_image_field(), pixels / 127.5 - 1, 1e-2, seed=0)
    assert (exact["trace"], exact["probes"], one["probes"], four["probes"]) == ("exact", 0, 1, 4)
    assert exact["n"] == one["n"] == four["n"] == 8
    for row in (one, four):
        assert row["rms_error"] > 0, "an estimate, not the exact trace again"
        assert abs(row["mean_error"]) < 4 * row["error_se"], f"{row['probes']} probe(s): biased? {row}"
    assert four["rms_error"] < one["rms_error"]
