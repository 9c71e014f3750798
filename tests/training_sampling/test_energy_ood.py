"""An energy's `reconstruction` OOD score (training/sampling/energy_ood.py): one step down the energy from each
noised image estimates the image (Equilibrium Matching's target read as a denoiser), and the Mahalanobis distance
of the errors and the image's PNG bits from the reference's Gaussian is the score; it is finite, a pure function
of the image, recorded with its fit, and higher for shuffled pixels than for the images it was fitted on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_digits, write_idx, write_tiny_eqm

from training.commands.cli import main
from training.runtime.checkpoint import load_checkpoint, save_checkpoint
from training.runtime.load import load_model
from training.sampling.energy_ood import (
    RECONSTRUCTION_COUNTER,
    RECONSTRUCTION_DRAWS,
    RECONSTRUCTION_LEVELS,
    RECONSTRUCTION_STATISTICS,
    png_bits,
)
from training.sampling.langevin import frozen_energy
from training.sampling.noise import chain_gaussian
from training.sampling.scoring import (
    OOD_METRIC,
    image_seeds,
    one_pass_scores,
    ood_reference,
    ood_score_name,
    ood_statistics,
    ood_verdicts,
    pixel_levels,
    score_family,
)
from training.train.data import load_dataset


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, idx_dir: Path) -> Path:
    """A tiny EqM energy (untrained: its PNG bits alone set shuffled pixels apart), its reconstruction reference
    recorded from the last 96 test digits."""
    checkpoint = write_tiny_eqm(tmp_path_factory.mktemp("energy_ood") / "digits.safetensors")
    reference = ["--data-dir", str(idx_dir), "--dataset", "mnist", "--reference-n", "96"]
    main(["score", str(checkpoint), "--record-reference", *reference, "--ood-score", "reconstruction"])
    return checkpoint


def scores_of(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    family = score_family(model)
    scores = one_pass_scores(family, [model], images, None)
    return scores | ood_statistics("reconstruction", [model], images, None, scores)


def test_the_statistics_are_one_denoising_step_along_the_eqm_path_and_png_bits(recorded: Path, idx_dir: Path) -> None:
    model = load_model(recorded)
    images = load_dataset("mnist", str(idx_dir), "test").images[:5]
    scores = scores_of(model, images)
    levels = pixel_levels(images, model.data_range)
    seeds, _ = image_seeds(levels)
    energy = frozen_energy(model.module, None)
    for index, share in enumerate(RECONSTRUCTION_LEVELS):
        step = 1 / 20 if share < 0.2 else share / 4  # s / c(s), c(s) = 4 min(1, s / 0.2): the trainer's defaults
        errors = []
        for draw in range(RECONSTRUCTION_DRAWS):
            counter = torch.full_like(seeds, RECONSTRUCTION_COUNTER + RECONSTRUCTION_DRAWS * index + draw)
            noised = ((1 - share) * images + share * chain_gaussian(seeds, counter, (1, 28, 28))).requires_grad_(True)
            (gradient,) = torch.autograd.grad(energy(noised).sum(), noised)
            errors.append((noised.detach() - step * gradient - images).abs().flatten(1).mean(1))
        expected = torch.stack(errors).mean(0).log()
        torch.testing.assert_close(scores[f"log_denoising_error@{share}"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores["png_bits"], png_bits(levels))


def test_the_score_is_finite_deterministic_and_higher_for_shuffled_pixels(recorded: Path, idx_dir: Path) -> None:
    model = load_model(recorded)
    record = load_checkpoint(recorded).config.metrics[OOD_METRIC]
    assert record["score"] == "reconstruction" and record["n"] == 96
    assert record["fit"]["statistics"] == list(RECONSTRUCTION_STATISTICS)
    reference = ood_reference(model.config.metrics)
    assert reference is not None and reference.fit is not None
    assert ood_score_name(model, score_family(model)) == "reconstruction"
    fitted = load_dataset("mnist", str(idx_dir), "test").images[-96:]  # the images the fit was made from
    rng = np.random.default_rng(0)
    flat = fitted.flatten(1).numpy()
    shuffled = torch.from_numpy(np.stack([rng.permutation(row) for row in flat])).reshape(fitted.shape)
    inside = [ood for ood, _ in ood_verdicts(scores_of(model, fitted), "reconstruction", reference)]
    outside = [ood for ood, _ in ood_verdicts(scores_of(model, shuffled), "reconstruction", reference)]
    assert all(np.isfinite(inside)) and all(np.isfinite(outside))
    assert min(outside) > max(inside)
    again = scores_of(model, torch.cat([shuffled[:3].flip(0), fitted[:2]]))  # other neighbours, another batch size
    batch = scores_of(model, fitted[:2])
    for name in RECONSTRUCTION_STATISTICS:
        torch.testing.assert_close(again[name][3:], batch[name], rtol=1e-5, atol=1e-5)
    p_values = [p for _, p in ood_verdicts(scores_of(model, fitted[:8]), "reconstruction", reference)]
    assert all(p is not None and 0 < p <= 1 for p in p_values)


def test_a_fit_of_other_statistics_or_size_is_not_trusted(recorded: Path, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(recorded)
    record = checkpoint.config.metrics[OOD_METRIC]
    for broken in (
        {**record["fit"], "statistics": ["energy", *record["fit"]["statistics"][1:]]},  # another statistic
        {**record["fit"], "mean": record["fit"]["mean"][:-1]},  # one statistic short
        {**record["fit"], "precision": [[float("nan")] * len(RECONSTRUCTION_STATISTICS)] * len(record["fit"]["mean"])},
    ):
        checkpoint.config.metrics[OOD_METRIC] = {**record, "fit": broken}
        save_checkpoint(tmp_path / "broken.safetensors", checkpoint)
        model = load_model(tmp_path / "broken.safetensors")
        assert ood_reference(model.config.metrics) is None
        assert ood_score_name(model, score_family(model)) == "energy"  # the family's default, without a reference


def test_an_idx_of_shuffled_pixels_reads_as_out_of_distribution_in_evaluate(
    recorded: Path, idx_dir: Path, tmp_path: Path, capsys
) -> None:
    import json

    images, _ = make_digits(48, seed=9)
    rng = np.random.default_rng(1)
    write_idx(
        tmp_path / "t10k-images-idx3-ubyte.gz", np.stack([rng.permutation(i.ravel()).reshape(28, 28) for i in images])
    )
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(48, dtype=np.uint8))
    capsys.readouterr()
    flags = ["--data-dir", str(idx_dir), "--n", "8", "--ood-data", str(tmp_path), "--ood-n", "48", "--device", "cpu"]
    main(["evaluate", str(recorded), *flags, "--steps", "1"])
    figures = json.loads(capsys.readouterr().out)["ood"]
    assert figures["score"] == "reconstruction" and figures["auroc"] == 1.0
