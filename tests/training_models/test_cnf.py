"""A continuous normalizing flow trained by flow matching: it learns a 2-D mixture, resumes exactly, samples
reproducibly by seed, and the CLI samples and evaluates it: test bits/dim by an adaptive solve, its flags
checked, and the likelihood bench on evaluate's images."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_flow

from training.commands.cli import build_parser, main
from training.families import draw_samples
from training.models.cnf import MLPVelocity, UNetVelocity, guided_velocity
from training.models.energy_unet import UNetEnergy
from training.runtime.checkpoint import load_checkpoint
from training.runtime.load import load_model
from training.sampling.likelihood import cnf_bits_per_dim
from training.sampling.noise import chain_seeds
from training.sampling.ode import FIELD_EVALUATIONS, integrate, ode_step
from training.sampling.sampler_config import FlowSampler
from training.train.data import load_dataset
from training.train.flow import FlowTrainConfig, train_flow

ROOT = Path(__file__).resolve().parents[2]


def tiny_image_run(idx_dir: Path, out: Path, **changes) -> FlowTrainConfig:
    options = dict(
        arch="cnf",
        data_dir=str(idx_dir),
        out=str(out),
        hidden=4,
        epochs=2,
        batch_size=32,
        max_batches=3,
        sample_steps=3,
        validate_batches=1,
        conditional=True,
        threads=1,
    )
    return FlowTrainConfig(**(options | changes))


def test_a_cnf_trained_on_a_2d_mixture_carries_prior_samples_to_the_requested_modes(tmp_path) -> None:
    out = tmp_path / "mixture.safetensors"
    train_flow(
        FlowTrainConfig(
            arch="cnf",
            dataset="toy2d:8gaussians",
            conditional=True,
            label_dropout=0.0,
            hidden=64,
            epochs=4,
            batch_size=256,
            max_batches=75,
            lr=3e-3,
            warmup_steps=20,
            out=str(out),
            autocast="none",
            threads=1,
        )
    )
    model = load_model(out)
    labels = torch.arange(400) % 8
    points = draw_samples(model, chain_seeds(0, 400), labels=labels)  # [400, 2], the checkpoint's 20 midpoint steps
    angles = labels.float() * (math.pi / 4)
    modes = torch.stack([angles.cos(), angles.sin()], dim=1) * 0.75  # the mixture's centres (std 0.05)
    near = (points - modes).norm(dim=1) < 0.2
    assert near.float().mean() > 0.9, f"only {near.float().mean():.2f} of the samples reached their class's mode"


def test_ode_solvers_integrate_a_linear_field_to_their_orders() -> None:
    """dx/dt = -x from x(0) = 1: x(1) = e^-1; Euler's error falls as 1/steps, the RK2 solvers' as 1/steps^2."""
    errors = {}
    for solver in FIELD_EVALUATIONS:
        for steps in (10, 20):
            x = integrate(lambda x, t: -x, torch.ones(1, 1), steps, solver)
            errors[solver, steps] = abs(x.item() - math.exp(-1))
    assert 1.8 < errors["euler", 10] / errors["euler", 20] < 2.2
    for solver in ("midpoint", "heun"):
        assert 3.6 < errors[solver, 10] / errors[solver, 20] < 4.4
    # chains at different times and steps in one batch move as they would alone
    x = torch.tensor([[1.0], [2.0]])
    t, dt = torch.tensor([0.0, 0.5]), torch.tensor([0.1, 0.25])
    together = ode_step(lambda x, t: x * t[:, None], x, t, dt, "heun")
    alone = [ode_step(lambda x, t: x * t[:, None], x[i : i + 1], t[i : i + 1], dt[i : i + 1], "heun") for i in (0, 1)]
    assert torch.equal(together, torch.cat(alone))
    with pytest.raises(ValueError, match="euler, midpoint, heun"):
        ode_step(lambda x, t: x, x, t, dt, "rk45")


def test_guidance_one_is_the_conditional_field_and_null_labelled_chains_are_unguided() -> None:
    torch.manual_seed(0)
    field = MLPVelocity(2, 16, 2, num_classes=3).eval()
    x, t, labels = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, -1, 2])
    with torch.no_grad():
        plain = field(x, t, labels)
        guided = guided_velocity(field, labels, 2.0)(x, t)
        null = field(x, t, None)
    assert torch.equal(guided_velocity(field, labels, 1.0)(x, t), plain)
    assert torch.allclose(guided[2], plain[2])
    assert torch.allclose(guided[0], null[0] + 2.0 * (plain[0] - null[0]), atol=1e-6)


def test_the_energy_unet_is_unchanged_by_the_velocity_field_built_on_it() -> None:
    """UNetEnergy's state dict and outputs are those of before the CNF reused it (the shipped eqm checkpoints)."""
    torch.manual_seed(0)
    energy = UNetEnergy(1, 4, "dot", num_classes=0)
    assert not any("shift" in name for name in energy.state_dict())  # an unconditional energy has no shifts
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(energy.field(x), energy.trunk(x, None))
    velocity = UNetVelocity(1, 4, num_classes=0)
    assert velocity(x, torch.rand(2)).shape == x.shape


def test_a_tiny_image_cnf_resumes_exactly_and_samples_reproducibly_by_seed(tmp_path, idx_dir) -> None:
    straight = tmp_path / "straight" / "cnf.safetensors"
    train_flow(tiny_image_run(idx_dir, straight))
    resumed = tmp_path / "resumed" / "cnf.safetensors"
    train_flow(tiny_image_run(idx_dir, resumed, epochs=1))
    train_flow(tiny_image_run(idx_dir, resumed, epochs=2, resume=True))
    one, two = load_checkpoint(straight), load_checkpoint(resumed)
    assert one.weights.keys() == two.weights.keys()
    for name in one.weights:
        assert torch.equal(one.weights[name], two.weights[name]), name
    assert (straight.parent / "cnf.run" / "samples_epoch002.png").is_file()
    metrics = [json.loads(line) for line in (straight.parent / "cnf.run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in metrics] == [1, 2]
    assert all(math.isfinite(record["val_flow_matching"]) for record in metrics)

    model = load_model(straight)
    sampler = model.sampler_as(FlowSampler)
    assert (sampler.steps, sampler.solver, sampler.unlabelled) == (3, "midpoint", "random")
    assert model.classes == [str(k) for k in range(10)]
    seeds = chain_seeds(7, 6)
    first = draw_samples(model, seeds)
    assert first.shape == (6, 1, 28, 28) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, draw_samples(model, seeds))
    # a chain starts from the same point in any batch; its path differs by float rounding of batched convolutions
    assert torch.allclose(first[2:4], draw_samples(model, seeds[2:4]), atol=1e-4)
    assert not torch.equal(first, draw_samples(model, chain_seeds(8, 6)))
    with pytest.raises(ValueError, match="out of range"):
        draw_samples(model, seeds, labels=torch.full((6,), 10))


@pytest.fixture(scope="module")
def tiny_cnf(tmp_path_factory: pytest.TempPathFactory, idx_dir: Path) -> Path:
    """A tiny class-conditional image CNF, trained once for this module's CLI tests (copy it before --record)."""
    out = tmp_path_factory.mktemp("cnf") / "cnf.safetensors"
    train_flow(tiny_image_run(idx_dir, out, epochs=1))
    return out


def test_sample_and_evaluate_work_on_a_cnf_checkpoint_and_evaluate_records_its_test_bits_per_dim(
    tmp_path, idx_dir, tiny_cnf, capsys
) -> None:
    out = tmp_path / "cnf.safetensors"
    shutil.copy(tiny_cnf, out)
    grid = tmp_path / "grid.png"
    command = ("sample", out, "--n", 4, "--label", "3", "--steps", 2, "--trajectory", 1, "--out", grid)
    main([str(part) for part in command])
    assert grid.is_file() and grid.with_suffix(".gif").is_file()
    assert "midpoint ODE steps" in capsys.readouterr().out
    main(
        [str(part) for part in ("evaluate", out, "--data-dir", idx_dir, "--n", 16, "--batch", 8, "--label", "all")]
        + ["--guidance", "1.5", "--likelihood-n", "6", "--ode-rtol", "1e-3", "--ode-atol", "1e-3", "--record"]
    )
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["sampler"]["solver"] == "midpoint" and report["sampler"]["guidance"] == 1.5
    assert "label_accuracy" in report["model"]
    likelihood = report["model"]["likelihood"]
    assert {key: likelihood[key] for key in ("n", "solver", "rtol", "atol", "trace", "probes", "label")} == {
        "n": 6, "solver": "dopri5", "rtol": 1e-3, "atol": 1e-3, "trace": "hutchinson", "probes": 1, "label": "null"
    }  # fmt: skip
    assert likelihood["nfe_mean"] >= 8 and likelihood["standard_error"] > 0  # dopri5: 2 to start, 6 a step
    # the figure is log p(x) (the null label) of 6 images of a seeded random test subset, by the library's solve
    test = load_dataset("mnist", str(idx_dir), "test")
    subset = test.images[torch.randperm(len(test.images), generator=torch.Generator().manual_seed(1))[:6]]
    field = load_model(out).module
    assert isinstance(field, torch.nn.Module)
    expected = cnf_bits_per_dim(field, subset, None, 1e-3, 1e-3, 1, seed=0).report()
    assert report["model"]["test_bits_per_dim"] == expected["bits_per_dim"]
    assert likelihood["standard_error"] == expected["standard_error"]
    assert "test bits/dim of 6 test images by dopri5 (rtol 0.001, atol 0.001)" in captured.err
    assert f"test bits/dim {expected['bits_per_dim']} +- {expected['standard_error']}" in captured.err
    recorded = load_checkpoint(out).config.metrics["evaluate_label_all_guidance_1.5"]
    assert recorded["test_bits_per_dim"] == expected["bits_per_dim"] and recorded["likelihood"] == likelihood
    with pytest.raises(SystemExit):
        main(["sample", str(out), "--noise", "0.1", "--out", str(grid)])
    capsys.readouterr()
    main(["export", str(out), "--out", str(tmp_path / "cnf_copy.pt2")])  # its velocity field (test_exported_flows.py)
    assert (
        "wrote" in capsys.readouterr().out and load_model(tmp_path / "cnf_copy.pt2").classes == load_model(out).classes
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ode-rtol", "0"], "argument --ode-rtol: must be a finite number > 0, not 0"),
        (["--ode-atol=-1e-5"], "argument --ode-atol: must be a finite number > 0, not -1e-5"),
        (["--ode-rtol", "tight"], "argument --ode-rtol: must be a number > 0, not 'tight'"),
        (["--probes", "0"], "argument --probes: must be >= 1, not 0"),
        (["--likelihood-n", "-1"], "argument --likelihood-n: must be >= 0, not -1"),
        (["--exact-trace", "--probes", "2"], "--probes sets Hutchinson's estimate and --exact-trace replaces it"),
    ],
)
def test_evaluate_refuses_bad_likelihood_flags_with_exit_2_before_sampling(
    flags, message, idx_dir, tiny_cnf, capsys
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", str(tiny_cnf), "--data-dir", str(idx_dir), "--n", "8", *flags])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "samples" not in err


def test_evaluate_refuses_likelihood_flags_for_a_model_without_an_ode(tmp_path, idx_dir, capsys) -> None:
    nice = write_tiny_flow(tmp_path / "nice.safetensors", arch_name="nice")
    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", str(nice), "--data-dir", str(idx_dir), "--n", "8", "--probes", "4", "--ode-rtol", "1e-4"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--ode-rtol, --probes set a CNF's likelihood solve; nice is a nice flow, whose log-det is exact" in err
    assert "samples" not in err


def test_the_likelihood_bench_sweeps_tolerances_on_evaluates_images(idx_dir, tiny_cnf, capsys) -> None:
    """Its figures are evaluate's on the same images, dequantization and probes (the estimator rows, whose exact
    trace takes minutes on 28x28 images, are tested on a small image model in
    tests/training_sampling/test_cnf_likelihood.py)."""
    command = [sys.executable, "bench/cnf_likelihood.py", str(tiny_cnf), "--data-dir", str(idx_dir), "--n", "3"]
    printed = subprocess.run(
        [*command, "--rtols", "1e-2", "1e-3", "--exact-n", "0", "--json"], capture_output=True, text=True, cwd=ROOT
    )
    assert printed.returncode == 0, printed.stderr
    result = json.loads(printed.stdout)
    sweep = {row["rtol"]: row for row in result["tolerances"]}
    assert list(sweep) == [1e-2, 1e-3] and sweep[1e-3]["max_abs_change"] == 0 and result["estimators"] == []
    assert sweep[1e-2]["nfe_mean"] < sweep[1e-3]["nfe_mean"] and sweep[1e-2]["n"] == 3
    tolerance = ["--ode-rtol", "1e-3", "--ode-atol", "1e-3"]
    evaluate = ["evaluate", str(tiny_cnf), "--data-dir", str(idx_dir), "--n", "8", "--likelihood-n", "3"]
    main([*evaluate, *tolerance, "--threads", "1"])  # the bench's one thread: the same sums in the same order
    likelihood = json.loads(capsys.readouterr().out)["model"]
    assert likelihood["test_bits_per_dim"] == sweep[1e-3]["bits_per_dim"]
    assert likelihood["likelihood"]["nfe_mean"] == sweep[1e-3]["nfe_mean"]


def test_every_cnf_flag_has_help() -> None:
    parser = build_parser()
    flow = parser._subparsers._group_actions[0].choices["flow"]  # type: ignore[union-attr]
    text = flow.format_help()
    for flag in ("--conditional", "--label-dropout", "--ot-pairing", "--autocast", "--sample-steps", "--solver"):
        assert flag in text
    for action in flow._actions:
        assert action.help, f"{action.option_strings} has no help"
    assert "cnf" in text
    evaluate = parser._subparsers._group_actions[0].choices["evaluate"]  # type: ignore[union-attr]
    helps = {action.option_strings[0]: action.help for action in evaluate._actions if action.option_strings}
    assert "(default 1e-5)" in helps["--ode-rtol"] and "(default 1e-5)" in helps["--ode-atol"]
    assert "default 1:" in helps["--probes"] and "default 200" in helps["--likelihood-n"]
    assert "784" in helps["--exact-trace"]


def test_minibatch_ot_pairing_is_a_permutation_of_the_noise_that_shortens_the_paths(tmp_path) -> None:
    from training.train.losses import optimal_transport_pairing

    generator = torch.Generator().manual_seed(0)
    noise, data = torch.randn(64, 2, generator=generator), torch.randn(64, 2, generator=generator) + 3
    paired = optimal_transport_pairing(noise, data)
    assert torch.equal(paired[paired[:, 0].argsort()], noise[noise[:, 0].argsort()])  # the same rows, reordered
    assert (paired - data).pow(2).sum() < (noise - data).pow(2).sum()
    out = tmp_path / "ot.safetensors"
    train_flow(
        FlowTrainConfig(
            arch="cnf", dataset="toy2d:moons", ot_pairing=True, hidden=16, epochs=1, max_batches=3, out=str(out)
        )
    )
    assert load_model(out).sampler_as(FlowSampler).solver == "midpoint"
