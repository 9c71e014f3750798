"""Energies trained by Equilibrium Matching: noise goes to the data under the checkpoint's own sampler,
labels pick the class, training resumes exactly, and bfloat16 gradients stay close to float32."""

import math
from pathlib import Path

import pytest
import torch

from training.commands.cli import main
from training.families import draw_samples
from training.models.energy_unet import UNetEnergy
from training.runtime.checkpoint import load_checkpoint
from training.runtime.load import load_model
from training.sampling.noise import chain_seeds
from training.train.ebm_eqm import perturbed

CENTERS = torch.stack([torch.cos(torch.arange(8) * math.pi / 4), torch.sin(torch.arange(8) * math.pi / 4)], 1) * 0.75


def train_toy(tmp_path: Path, *flags: str, epochs: int = 15) -> Path:
    """A tiny EqM energy on the 8-Gaussian ring through the real command line (about 10 s on one core)."""
    out = tmp_path / "eqm.safetensors"
    main([
        "ebm", "--objective", "eqm", "--dataset", "toy2d:8gaussians", "--out", str(out), "--epochs", str(epochs),
        "--batch-size", "256", "--max-batches", "78", "--lr", "5e-3", "--warmup-steps", "20", "--autocast", "none",
        "--prior-std", "0.4", "--sample-steps", "100", "--validate-batches", "2", "--device", "cpu", *flags,
    ])  # fmt: skip
    return out


def nearest_mode(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    distances = torch.cdist(points, CENTERS)  # [N, 8]
    return distances.min(1).values, distances.argmin(1)


@pytest.fixture(scope="module")
def toy_energy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_toy(tmp_path_factory.mktemp("eqm"))


def test_checkpoint_declares_gradient_descent_from_a_gaussian_prior(toy_energy: Path) -> None:
    sampler = load_model(toy_energy).sampler
    assert (sampler.prior, sampler.prior_std, sampler.noise, sampler.clamp) == ("gaussian", 0.4, 0.0, False)
    assert sampler.grad_clip is None and sampler.init == "noise" and sampler.steps == 100
    checkpoint = load_checkpoint(toy_energy)
    assert "--objective eqm" in checkpoint.config.training["command"]
    assert set(checkpoint.extras) == {"online"}  # the training weights; `weights` are the averaged ones


def test_noise_descends_to_the_modes_under_the_checkpoints_sampler(toy_energy: Path) -> None:
    model = load_model(toy_energy)
    seeds = chain_seeds(0, 1000)
    start = draw_samples(model, seeds, steps=0)
    samples = draw_samples(model, seeds)
    near_at_start = (nearest_mode(start)[0] < 0.15).float().mean().item()
    near = (nearest_mode(samples)[0] < 0.15).float().mean().item()
    assert near > 0.4 and near > 3 * near_at_start, (
        f"{near:.0%} of the samples within 0.15 of a mode ({near_at_start:.0%} at the start)"
    )


def test_a_conditional_energy_draws_the_class_it_is_asked_for(tmp_path: Path) -> None:
    model = load_model(train_toy(tmp_path, "--conditional", epochs=6))
    assert model.classes == [str(k) for k in range(8)] and model.sampler.guidance == 1.25  # --sample-guidance
    labels = torch.arange(400) % 8
    samples = draw_samples(model, chain_seeds(1, 400), labels=labels)
    hits = (nearest_mode(samples)[1] == labels).float().mean().item()
    assert hits > 0.5, f"only {hits:.0%} of the samples went to the mode of their label (chance: 12.5%)"
    with pytest.raises(ValueError, match=r"0\.\.7"):
        draw_samples(model, chain_seeds(1, 2), labels=torch.tensor([0, 8]))


def test_an_unconditional_energy_refuses_labels(toy_energy: Path) -> None:
    with pytest.raises(ValueError, match="not class-conditional"):
        draw_samples(load_model(toy_energy), chain_seeds(0, 2), labels=torch.tensor([0, 1]))


def test_training_resumes_exactly(tmp_path: Path) -> None:
    """A run stopped after epoch 1 and resumed ends where the uninterrupted run ends (constant schedule:
    a cosine one is laid over --epochs, which a resumed run may extend)."""
    whole = load_checkpoint(train_toy(tmp_path / "whole", "--lr-schedule", "constant", epochs=2))
    train_toy(tmp_path / "parts", "--lr-schedule", "constant", epochs=1)
    parts = load_checkpoint(train_toy(tmp_path / "parts", "--lr-schedule", "constant", "--resume", epochs=2))
    for name, tensor in whole.weights.items():
        torch.testing.assert_close(parts.weights[name], tensor)
    assert parts.config.training["updates"] == whole.config.training["updates"] == 2 * 78


def test_bfloat16_energy_gradient_stays_close_to_float32() -> None:
    """The tolerance the training speed-up rests on: cosine similarity above 0.99, relative error below 10 %."""
    torch.manual_seed(0)
    model = UNetEnergy(width=8, num_classes=10)
    x = torch.randn(16, 1, 28, 28).requires_grad_(True)
    labels = torch.arange(16) % 10
    (exact,) = torch.autograd.grad(model(x, labels).sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (fast,) = torch.autograd.grad(model(x, labels).sum(), x)
    cosine = torch.nn.functional.cosine_similarity(exact.flatten(), fast.float().flatten(), dim=0).item()
    relative = ((fast.float() - exact).norm() / exact.norm()).item()
    assert cosine > 0.99 and relative < 0.1, (cosine, relative)


def test_guidance_composes_the_conditional_and_unconditional_energies_per_chain() -> None:
    from training.sampling.langevin import conditioned_energy

    torch.manual_seed(0)
    model = UNetEnergy(width=4, num_classes=10).eval()
    x = torch.randn(3, 1, 28, 28)
    labels = torch.tensor([1, 5, -1])
    with torch.no_grad():
        labelled, unconditional = model(x, labels), model(x)
        torch.testing.assert_close(conditioned_energy(model, labels, 1.0)(x), labelled)
        torch.testing.assert_close(conditioned_energy(model, labels, 0.0)(x), unconditional)
        weights = torch.tensor([3.0, 1.0, 3.0])  # per chain, in one batch
        expected = unconditional + weights * (labelled - unconditional)
        torch.testing.assert_close(conditioned_energy(model, labels, weights)(x), expected)
        torch.testing.assert_close(expected[2], unconditional[2])  # an unlabelled chain ignores its weight


def test_a_conditional_energy_asked_for_no_label_draws_a_seeded_class_per_chain(tmp_path: Path) -> None:
    """`unlabelled: random` samples p(x) as the mixture of its classes: each chain's class comes from its seed."""
    from training.sampling.noise import chain_classes

    classes = chain_classes(chain_seeds(0, 5000), 10)
    assert torch.equal(classes, chain_classes(chain_seeds(0, 5000), 10))
    counts = torch.bincount(classes, minlength=10)
    assert counts.min() > 400 and counts.max() < 600  # about 500 each
    model = load_model(train_toy(tmp_path, "--conditional", epochs=1))
    assert model.sampler.unlabelled == "random"
    seeds = chain_seeds(3, 8)
    torch.testing.assert_close(draw_samples(model, seeds), draw_samples(model, seeds, labels=chain_classes(seeds, 8)))


def test_evaluate_reports_how_often_the_classifier_reads_the_drawn_class(tmp_path: Path, idx_dir: Path, capsys) -> None:
    import json

    checkpoint = tmp_path / "digits.safetensors"
    main([
        "ebm", "--objective", "eqm", "--conditional", "--data-dir", str(idx_dir), "--epochs", "1",
        "--max-batches", "2", "--batch-size", "16", "--width", "4", "--out", str(checkpoint), "--device", "cpu",
    ])  # fmt: skip
    classifier = tmp_path / "classifier.safetensors"
    main(["classifier", "--data-dir", str(idx_dir), "--epochs", "1", "--out", str(classifier), "--device", "cpu"])
    default_noise = str(load_checkpoint(checkpoint).config.sampler["noise"])
    for flags, key in (
        (["--noise", default_noise, "--step-size", "0.125"], "evaluate_noise_step_size_0.125"),  # the default noise
        ([], "evaluate_noise"),
        (["--label", "all", "--guidance", "1.5"], "evaluate_noise_label_all"),
    ):
        capsys.readouterr()
        main([
            "evaluate", str(checkpoint), "--data-dir", str(idx_dir), "--n", "40", "--steps", "2",
            "--classifier", str(classifier), "--device", "cpu", "--record", *flags,
        ])  # fmt: skip
        report = json.loads(capsys.readouterr().out)
        assert 0.0 <= report["model"]["label_accuracy"] <= 1.0
        recorded = load_checkpoint(checkpoint).config.metrics[key]
        assert recorded["label_accuracy"] == report["model"]["label_accuracy"] and recorded["steps"] == 2
    assert recorded["guidance"] == 1.5 and recorded["label"] == "all"


def test_the_bridge_fine_tunes_by_contrastive_divergence_and_ships_its_replay_buffer(
    toy_energy: Path, tmp_path: Path
) -> None:
    """Energy Matching's phase 2 from a warm start: the persistent chains stay on the modes, the fine-tuned
    energy still carries noise there, and the whole buffer ships so the server can start from it."""
    bridged = train_toy(tmp_path, "--init-from", str(toy_energy), "--cd-weight", "0.05", "--buffer-capacity", "200",
                        "--cd-chains", "32", epochs=17)  # fmt: skip
    checkpoint = load_checkpoint(bridged)
    buffer = checkpoint.extras["replay_buffer"]
    assert buffer["samples"].shape == (200, 2) and int(buffer["capacity"]) == 200
    distance, _ = nearest_mode(buffer["samples"].float())
    assert distance.median() < 0.15
    training = checkpoint.config.training
    assert training["updates"] == 17 * 78 and "--cd-weight 0.05" in training["command"]
    model = load_model(bridged)
    samples = draw_samples(model, chain_seeds(0, 500))
    distance, modes = nearest_mode(samples)
    assert (distance < 0.15).float().mean() > 0.4 and len(modes.unique()) == 8  # as the plain energy's test asks


def test_the_bridge_resumes_exactly_with_its_buffer(toy_energy: Path, tmp_path: Path) -> None:
    flags = ("--init-from", str(toy_energy), "--cd-weight", "0.05", "--buffer-capacity", "64", "--cd-chains", "16",
             "--lr-schedule", "constant")  # fmt: skip
    whole = load_checkpoint(train_toy(tmp_path / "whole", *flags, epochs=17))
    train_toy(tmp_path / "parts", *flags, epochs=16)
    parts = load_checkpoint(train_toy(tmp_path / "parts", *flags, "--resume", epochs=17))
    for name, tensor in whole.weights.items():
        torch.testing.assert_close(parts.weights[name], tensor)
    torch.testing.assert_close(parts.extras["replay_buffer"]["samples"], whole.extras["replay_buffer"]["samples"])


def test_perturbed_training_images_replace_the_asked_share_of_pixels_by_uniform_noise(tmp_path: Path, capsys) -> None:
    """--perturb (Ren et al.'s background model): that share of values replaced by uniforms in [-1, 1], none at 0;
    a share outside [0, 1) is refused before the run starts."""
    images = torch.full((64, 1, 28, 28), 0.25)
    torch.manual_seed(0)
    noisy = perturbed(images, 0.2)
    changed = noisy != images
    assert 0.18 < changed.float().mean() < 0.22
    assert noisy.min() >= -1 and noisy.max() <= 1 and noisy[changed].std() > 0.5  # uniform over the range
    assert perturbed(images, 0.0) is images
    with pytest.raises(SystemExit):
        train_toy(tmp_path, "--perturb", "1.0", epochs=1)
    assert "--perturb is a share of pixels, in [0, 1), not 1.0" in capsys.readouterr().err
    assert not (tmp_path / "eqm.run").exists()
