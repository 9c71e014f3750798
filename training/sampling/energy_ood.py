"""An energy's out-of-distribution statistics, which a Gaussian fitted on held-out data turns into one score.

Two scores read several statistics of each image and measure their Mahalanobis distance from the Gaussian fit of
the same statistics over the model's reference images (recorded in the checkpoint):

- `typicality` (a typicality test of several statistics, as MSMA, Mahadevan et al. 2021, does of score norms):
  E(x) and log ||dE/dx|| at x and at x + sigma eps for each sigma of NOISE_SCALES;
- `reconstruction` (a one-step form of DDPM-OOD, Graham et al. 2023, with Serra et al. 2020's complexity beside):
  each image is noised along the Equilibrium Matching path, x_s = (1 - s) x + s eps for each noise share s of
  RECONSTRUCTION_LEVELS, and denoised by one step down the energy, x^_s = x_s - dE/dx(x_s) s / c(s), where
  c(s) = scale min(1, s / cutoff) is the size of the gradient EqM trains, so that x^_s estimates E[x | x_s]
  (Tweedie's formula read off the EqM target). The statistics are the log of mean |x^_s - x| at each s (averaged
  over RECONSTRUCTION_DRAWS draws of eps) and the image's PNG bits: an image of the training data comes back
  near itself, a foreign one is pulled towards the data, and the PNG bits hold what an image's simplicity alone
  does to the error (a digit's empty background denoises easily), so that the distance asks whether the error is
  typical *for an image that complex*.

eps is counter-based noise (training/sampling/noise.py) seeded by a hash of the image's pixels, so the
statistics are a pure function of the image, as every served score is.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from training.runtime.loaded import LoadedModel
from training.sampling.langevin import frozen_energy
from training.sampling.noise import chain_gaussian

NOISE_SCALES = (0.1, 0.3, 0.6)  # typicality's perturbations, in units of the data range's half width
TYPICALITY_STATISTICS = ("energy", "log_grad_norm", *(f"log_grad_norm@{sigma}" for sigma in NOISE_SCALES))
RECONSTRUCTION_LEVELS = (0.05, 0.1, 0.7)  # noise shares s of x_s = (1 - s) x + s eps (chosen: docs/scoring.md)
RECONSTRUCTION_DRAWS = 2  # noise draws a level; the error is their mean
RECONSTRUCTION_STATISTICS = (*(f"log_denoising_error@{share}" for share in RECONSTRUCTION_LEVELS), "png_bits")
RECONSTRUCTION_COUNTER = 10  # reconstruction's noise counters: 10 + draws * level index + draw (typicality: 0..3)
FITTED_STATISTICS = {"typicality": TYPICALITY_STATISTICS, "reconstruction": RECONSTRUCTION_STATISTICS}
EQM_DEFAULTS = {"eqm_scale": 4.0, "eqm_cutoff": 0.2, "prior_std": 1.0}  # training/train/ebm_config.py's
Statistics = dict[str, torch.Tensor]  # statistic name -> [B] per image


@dataclass(frozen=True)
class GaussianFit:
    """The reference images' statistics as a Gaussian: what `typicality` and `reconstruction` measure from."""

    mean: torch.Tensor  # [K] float64
    precision: torch.Tensor  # [K, K] float64, the inverse covariance

    @classmethod
    def of(cls, statistics: torch.Tensor) -> GaussianFit:  # statistics [N, K]
        data = statistics.double()
        covariance = torch.cov(data.T) + 1e-9 * torch.eye(data.shape[1], dtype=torch.float64)
        return cls(data.mean(0), torch.linalg.inv(covariance))

    def distance(self, statistics: torch.Tensor) -> torch.Tensor:  # [N, K] -> [N]
        centred = statistics.double() - self.mean
        return (centred @ self.precision * centred).sum(1).clamp(min=0).sqrt().float()

    def record(self) -> dict[str, list]:
        return {"mean": self.mean.tolist(), "precision": self.precision.tolist()}


def fitted_statistics(score_name: str, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, K] the statistics a fitted score reads, in FITTED_STATISTICS' order."""
    return torch.stack([scores[name].double() for name in FITTED_STATISTICS[score_name]], dim=1)


def gaussian_fit(score_name: str, record: object) -> GaussianFit | None:
    """A recorded fit of the score's statistics (its size, finite numbers, and the same names where it lists
    them), else None: a checkpoint may be hostile, so every field is checked, never evaluated."""
    names = FITTED_STATISTICS[score_name]
    size = len(names)
    if not isinstance(record, Mapping):
        return None
    mean, precision, listed = record.get("mean"), record.get("precision"), record.get("statistics")
    if listed is not None and listed != list(names):
        return None
    if not (isinstance(mean, list) and isinstance(precision, list) and len(precision) == size):
        return None
    rows: list[Any] = [mean, *precision]
    if not all(isinstance(row, list) and len(row) == size for row in rows):
        return None
    if not all(isinstance(value, int | float) and math.isfinite(value) for row in rows for value in row):
        return None
    return GaussianFit(torch.tensor(mean, dtype=torch.float64), torch.tensor(precision, dtype=torch.float64))


def png_bits(levels: torch.Tensor) -> torch.Tensor:
    """[B] bits of each 8-bit image [B, C, H, W] as a PNG at compression level 9: Serra et al.'s L(x)."""
    sizes = []
    for image in levels.cpu().numpy():
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        if pixels.ndim == 3 and pixels.shape[2] not in (3, 4):
            pixels = pixels.reshape(pixels.shape[0], -1)  # 2 channels: side by side, still lossless
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=9)
        sizes.append(8 * buffer.tell())
    return torch.tensor(sizes, dtype=torch.float32)


def _energy_gradient(members: list[LoadedModel], labels: torch.Tensor | None, point: torch.Tensor) -> torch.Tensor:
    """dE/dx [B, *shape] at `point` of the members' mean energy (E(x, y) with labels)."""
    point = point.detach().requires_grad_(True)
    with torch.enable_grad():
        energy = torch.stack([frozen_energy(member.module, labels)(point) for member in members]).mean(0)
        (gradient,) = torch.autograd.grad(energy.sum(), point)
    return gradient


def typicality_statistics(
    members: list[LoadedModel], x: torch.Tensor, labels: torch.Tensor | None, seeds: torch.Tensor
) -> Statistics:
    """log ||dE/dx|| [B] at x and at x + sigma eps for each sigma of NOISE_SCALES (the energy is the family's)."""
    model = members[0]
    half_width = (model.data_range[1] - model.data_range[0]) / 2
    extra: Statistics = {}
    for index, sigma in enumerate((0.0, *NOISE_SCALES)):
        noise = chain_gaussian(seeds, torch.full_like(seeds, index), tuple(model.shape)).to(x.device)
        gradient = _energy_gradient(members, labels, x + sigma * half_width * noise)
        name = "log_grad_norm" if sigma == 0 else f"log_grad_norm@{sigma}"
        extra[name] = gradient.flatten(1).norm(dim=1).clamp(min=1e-12).log().float().cpu()
    return extra


def eqm_settings(model: LoadedModel) -> dict[str, float]:
    """The Equilibrium Matching target's scale and cutoff and the prior's std the model was trained with (the
    trainer's defaults where the checkpoint does not say)."""
    training = model.config.training
    arguments = training.get("args") if isinstance(training, Mapping) else None
    settings = dict(EQM_DEFAULTS)
    if isinstance(arguments, Mapping):
        for name in settings:
            value = arguments.get(name)
            if isinstance(value, int | float) and math.isfinite(value) and value > 0:
                settings[name] = float(value)
    return settings


def reconstruction_statistics(
    members: list[LoadedModel], x: torch.Tensor, labels: torch.Tensor | None, seeds: torch.Tensor
) -> Statistics:
    """log mean |x^_s - x| [B] for each noise share s of RECONSTRUCTION_LEVELS, the mean over RECONSTRUCTION_DRAWS
    draws of the noise (module docstring)."""
    model = members[0]
    settings = eqm_settings(model)
    extra: Statistics = {}
    for index, share in enumerate(RECONSTRUCTION_LEVELS):
        target_size = settings["eqm_scale"] * min(1.0, share / settings["eqm_cutoff"])  # c(s)
        error = torch.zeros(len(x), dtype=torch.float64)
        for draw in range(RECONSTRUCTION_DRAWS):
            counter = torch.full_like(seeds, RECONSTRUCTION_COUNTER + RECONSTRUCTION_DRAWS * index + draw)
            noise = chain_gaussian(seeds, counter, tuple(model.shape)).to(x.device) * settings["prior_std"]
            noised = (1 - share) * x + share * noise
            denoised = noised - _energy_gradient(members, labels, noised) * (share / target_size)
            error += (denoised - x).abs().flatten(1).mean(1).double().cpu() / RECONSTRUCTION_DRAWS
        extra[f"log_denoising_error@{share}"] = error.clamp(min=1e-12).log().float()
    return extra
