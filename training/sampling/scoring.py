"""What a model says about an input: the scores POST /score and `python -m training score` report, and the
out-of-distribution (OOD) verdict built from them.

Every family's scores are here, in one table (`SCORE_FAMILIES`, each family naming its row), so the server's
pools and the CLI compute the same numbers by the same functions:

- an EBM (or an ensemble: the mean of its members' energies) gives its energy E(x), or E(x, y) with a label;
- a flow with an exact inverse (NICE, Glow; i-ResNet with its power-series log-det estimate) gives log p(x) of
  the dequantized image by one pass, and bits/dim (a variationally dequantized flow: the bound
  E_q[log p(x + u) - log q(u | x)] in log p's place, training/sampling/dequantization.py);
- a CNF gives the same by the adaptive ODE solve of training/sampling/likelihood.py at a stated tolerance,
  with the field evaluations it took (the server steps those solves as chains, service/engine/pools/score.py);
- a GAN saved with its critic gives the critic's value d(x).

A score is a pure function of the image: its uniform dequantization noise and a CNF's Hutchinson probes are
counter-based noise (training/sampling/noise.py) seeded by a hash of the image's 8-bit pixels, so an image
scores the same alone, in any batch, over HTTP and on the command line.

`ood` is higher for inputs further out; `ood_p` the fraction of reference scores (the model's own held-out
data, recorded in the checkpoint's metrics under `OOD_METRIC`) at least as high: a p-value. Which score is a
model's `ood` is chosen by measurement (bench/ood.py) and recorded with the reference; beside the raw energy,
bits/dim and critic there are two that hold where a model gives foreign inputs *higher* likelihood:
- `complexity_bits` (flows; Serra et al. 2020): the image's bits under the model minus a lossless
  compressor's (PNG at level 9) bits of the same 8-bit image;
- `typicality` and `reconstruction` (energies): the Mahalanobis distance of several statistics of the image
  (gradient norms at seeded perturbations; one-step denoising errors along the Equilibrium Matching path and the
  image's PNG bits) from their Gaussian fit on the reference images, training/sampling/energy_ood.py.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from training.families import family_of
from training.models.flows import bits_per_dim
from training.runtime.exported_modules import ExportedFlow
from training.runtime.loaded import LoadedModel
from training.sampling.dequantization import variational_log_prob
from training.sampling.energy_ood import (
    FITTED_STATISTICS,
    GaussianFit,
    fitted_statistics,
    gaussian_fit,
    png_bits,
    reconstruction_statistics,
    typicality_statistics,
)
from training.sampling.langevin import frozen_energy
from training.sampling.likelihood import (
    DEFAULT_ATOL,
    DEFAULT_PROBES,
    DEFAULT_RTOL,
    HUTCHINSON_BATCH,
    rademacher_probes,
)
from training.sampling.noise import chain_uniform

OOD_METRIC = "ood"  # checkpoint metrics key: {"score", "reference": sorted floats, "split", "n", ...}
MAX_REFERENCE = 4096  # reference scores a checkpoint may record (a p-value's resolution is 1 / n)
Scores = dict[str, torch.Tensor]  # score name -> [B] per image


@dataclass(frozen=True)
class ScoreFamily:
    """How one kind of model scores an input, and which of its scores is its OOD score by default."""

    name: str  # "energy" | "flow" | "cnf" | "critic"
    fields: tuple[str, ...]  # what each result carries
    default_ood: str  # a key of OOD_SCORES, used when the checkpoint records no reference of its own
    one_pass: bool  # one forward pass (batched across requests); else an adaptive solve stepped as chains
    conditional_label: bool  # whether a label conditions the score (class-conditional energies and CNFs)


SCORE_FAMILIES = {
    "energy": ScoreFamily("energy", ("energy",), "energy", True, True),
    "flow": ScoreFamily("flow", ("log_prob", "bits_per_dim"), "bits_per_dim", True, False),
    "cnf": ScoreFamily("cnf", ("log_prob", "bits_per_dim", "evaluations"), "bits_per_dim", False, True),
    "critic": ScoreFamily("critic", ("critic",), "negative_critic", True, False),
}


def _fitted(score_name: str) -> Callable[[Mapping[str, torch.Tensor], GaussianFit | None], torch.Tensor]:
    """The OOD score that is the distance of `score_name`'s statistics from the reference's Gaussian fit."""

    def distance(scores: Mapping[str, torch.Tensor], fit: GaussianFit | None) -> torch.Tensor:
        if fit is None:
            raise ValueError(f"the {score_name} score needs the Gaussian fit its reference records")
        return fit.distance(fitted_statistics(score_name, scores))

    return distance


# Each OOD score from a result's scores (and the reference's fit, where it has one), higher = more out.
OOD_SCORES: dict[str, Callable[[Mapping[str, torch.Tensor], GaussianFit | None], torch.Tensor]] = {
    "energy": lambda scores, fit: scores["energy"],
    "bits_per_dim": lambda scores, fit: scores["bits_per_dim"],
    "complexity_bits": lambda scores, fit: scores["complexity_bits"],
    "typicality": _fitted("typicality"),
    "reconstruction": _fitted("reconstruction"),
    "negative_critic": lambda scores, fit: -scores["critic"],
}
# The scores only some families give (the others: any family whose scores they read).
OOD_FAMILIES = {"complexity_bits": ("flow", "cnf"), "typicality": ("energy",), "reconstruction": ("energy",)}


@dataclass(frozen=True)
class LikelihoodSettings:
    """How a CNF's likelihood is solved: the tolerances and trace estimator `evaluate` states by default."""

    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    probes: int = DEFAULT_PROBES  # Rademacher probes of Hutchinson's trace an image; 0: the exact trace
    chunk: int = HUTCHINSON_BATCH  # rows per field evaluation, always exactly (likelihood_field): batch-invariant

    def report(self) -> dict[str, Any]:
        trace = "exact" if self.probes == 0 else "hutchinson"
        figures = {"solver": "dopri5", "rtol": self.rtol, "atol": self.atol, "trace": trace, "probes": self.probes}
        return {**figures, "chunk": self.chunk}


def score_family(model: LoadedModel) -> ScoreFamily:
    """How a model scores, as its family says (training/families/); ValueError (the reason) for one that cannot
    score images: a GAN saved without its critic, or a model of 2-D points."""
    if len(model.shape) != 3:
        raise ValueError(f"{model.name} models {len(model.shape)}-D points, not images; only image models score")
    return SCORE_FAMILIES[family_of(model).score_kind(model)]


def pixel_levels(x: torch.Tensor, data_range: tuple[float, float]) -> torch.Tensor:
    """Images [B, *shape] in the data range -> their 8-bit levels [B, *shape] uint8."""
    low, high = data_range
    return ((x - low) / (high - low) * 255).round().clamp(0, 255).to(torch.uint8)


def image_seeds(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantization seeds [B], probe seeds [B]) int64, two 32-bit halves of a hash of each image's levels."""
    words = [
        int.from_bytes(hashlib.blake2b(image.numpy().tobytes(), digest_size=8).digest(), "little")
        for image in levels.cpu()
    ]
    low = torch.tensor([word & 0xFFFFFFFF for word in words], dtype=torch.int64)
    high = torch.tensor([word >> 32 for word in words], dtype=torch.int64)
    return low, high


def dequantized(levels: torch.Tensor, seeds: torch.Tensor, data_range: tuple[float, float]) -> torch.Tensor:
    """Uniform dequantization (levels + u) / 256 in the data range, u ~ U[0, 1) from each image's seed:
    `dequantize` of training/models/flows.py with counter-based noise."""
    low, high = data_range
    noise = chain_uniform(seeds, tuple(levels.shape[1:]), 0.0, 1.0)  # [B, *shape]
    return (levels.float() + noise) / 256 * (high - low) + low


def bits_of(
    log_prob: torch.Tensor, shape: tuple[int, ...], data_range: tuple[float, float], levels: int = 256
) -> torch.Tensor:
    """Bits/dim [B] of discrete images from the density log p [B] (nats over the data space as `data_range` states
    it) of their dequantized points: training/models/flows.py `bits_per_dim`, bins (high - low) / levels wide."""
    return bits_per_dim(log_prob, math.prod(shape), data_range, levels)


def scored_points(x: torch.Tensor, data_range: tuple[float, float], uniform: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the points a density scores images x [B, *shape] at, probe seeds [B]): uniformly dequantized with noise
    seeded by each image's pixels, or (`uniform` False: a sidecar's dequantization "none") the images' level
    values themselves."""
    levels = pixel_levels(x, data_range)
    dequantization, probe_seeds = image_seeds(levels)
    if not uniform:
        low, high = data_range
        return levels.float() / 255 * (high - low) + low, probe_seeds
    return dequantized(levels, dequantization, data_range), probe_seeds


@dataclass
class LikelihoodInputs:
    """What a CNF's likelihood solve of some images starts from."""

    points: torch.Tensor  # [B, *shape] dequantized, at t = 1
    probe_seeds: torch.Tensor  # [B] int64: what each image's Hutchinson probes are drawn from
    probe_vectors: torch.Tensor | None  # [P, B, *shape] Rademacher probes; None: the exact trace


def likelihood_inputs(
    x: torch.Tensor, data_range: tuple[float, float], probes: int, uniform: bool = True
) -> LikelihoodInputs:
    """Images [B, *shape] in the data range -> their dequantized points (`scored_points`) and probes, seeded by
    their pixels."""
    points, probe_seeds = scored_points(x, data_range, uniform)
    vectors = rademacher_probes(probe_seeds, probes, tuple(x.shape[1:])) if probes else None
    return LikelihoodInputs(points, probe_seeds, vectors)


def cnf_scores(
    log_prob: torch.Tensor,
    evaluations: torch.Tensor,
    shape: tuple[int, ...],
    data_range: tuple[float, float],
    levels: int = 256,
) -> Scores:
    return {
        "log_prob": log_prob.cpu(),
        "bits_per_dim": bits_of(log_prob, shape, data_range, levels).cpu(),
        "evaluations": evaluations.cpu(),
    }


@torch.no_grad()
def one_pass_scores(
    family: ScoreFamily,
    members: list[LoadedModel],  # one model, or an ensemble's members
    x: torch.Tensor,  # [B, *shape] images in the data range, on the members' device
    labels: torch.Tensor | None,  # [B] class per image (-1: the null label), or None
) -> Scores:
    """The scores of one batch of images [B] each, on the CPU (an ensemble's energy: its members' mean)."""
    model = members[0]
    if family.name == "energy":
        energies = [frozen_energy(member.module, labels)(x) for member in members]  # [B] each
        return {"energy": torch.stack(energies).mean(0).float().cpu()}
    if family.name == "critic":
        assert model.critic is not None
        return {"critic": model.critic(x).reshape(-1).float().cpu()}
    if family.name == "flow":
        if model.variational:  # its log_prob: the bound E_q[log p(x + u) - log q(u | x)], in log p's units
            levels = pixel_levels(x, model.data_range)
            flow = model.module
            assert isinstance(flow, ExportedFlow)  # the loader serves a dequantizer with exported flows only
            log_prob = variational_log_prob(
                flow.log_prob,
                flow.dequantize,
                levels,
                image_seeds(levels)[0],
                model.data_range,
                model.levels,
                model.dequantization_samples,
                x.device,
            )
        else:
            points = scored_points(x, model.data_range, model.dequantized)[0].to(x.device)
            log_prob = model.module.log_prob(points).float()  # type: ignore[operator]
        bits = bits_of(log_prob, model.shape, model.data_range, model.levels)
        return {"log_prob": log_prob.cpu(), "bits_per_dim": bits.cpu()}
    raise ValueError(f"{model.name} scores by an ODE solve, not one pass")


def ood_statistics(
    score_name: str, members: list[LoadedModel], x: torch.Tensor, labels: torch.Tensor | None, scores: Scores
) -> Scores:
    """What the OOD score `score_name` reads beyond the family's scores, for images x [B, *shape] in the data
    range: a flow's complexity-corrected bits, an energy's gradient norms at x and at seeded perturbations
    (typicality), or its denoising errors and the images' PNG bits (reconstruction)."""
    model = members[0]
    levels = pixel_levels(x, model.data_range)
    if score_name == "complexity_bits":
        bits = scores["bits_per_dim"].double() * math.prod(model.shape)
        return {"complexity_bits": (bits - png_bits(levels)).float()}
    seeds, _ = image_seeds(levels)
    if score_name == "typicality":
        return typicality_statistics(members, x, labels, seeds)
    if score_name == "reconstruction":
        return reconstruction_statistics(members, x, labels, seeds) | {"png_bits": png_bits(levels)}
    return {}


@dataclass(frozen=True)
class OodReference:
    """Reference OOD scores a checkpoint recorded from held-out data: what `ood_p` compares with."""

    score: str  # a key of OOD_SCORES
    reference: list[float]  # sorted ascending
    split: str
    fit: GaussianFit | None = None  # typicality's or reconstruction's Gaussian of the reference statistics

    def p_value(self, value: float) -> float:
        """The fraction of reference scores at least as high as `value`."""
        return (len(self.reference) - bisect.bisect_left(self.reference, value)) / len(self.reference)


def ood_reference(metrics: Mapping[str, Any]) -> OodReference | None:
    """The checkpoint's recorded reference, or None when it has none or one this code cannot trust (a file
    may be hostile: every field is checked, never evaluated)."""
    record = metrics.get(OOD_METRIC)
    if not isinstance(record, Mapping):
        return None
    score, reference, split = record.get("score"), record.get("reference"), record.get("split", "")
    if score not in OOD_SCORES or not isinstance(reference, list) or not 0 < len(reference) <= MAX_REFERENCE:
        return None
    if not all(isinstance(value, int | float) and math.isfinite(value) for value in reference):
        return None
    fit = gaussian_fit(score, record.get("fit")) if score in FITTED_STATISTICS else None
    if score in FITTED_STATISTICS and fit is None:
        return None
    return OodReference(str(score), sorted(float(value) for value in reference), str(split), fit)


def ood_score_name(model: LoadedModel, family: ScoreFamily) -> str:
    """The model's OOD score: the one its recorded reference was made with (if its family gives it), else its
    family's default."""
    recorded = ood_reference(model.config.metrics)
    usable = recorded is not None and family.name in OOD_FAMILIES.get(recorded.score, (family.name,))
    return recorded.score if recorded is not None and usable else family.default_ood


def ood_verdicts(scores: Scores, score_name: str, reference: OodReference | None) -> list[tuple[float, float | None]]:
    """(ood, ood_p) per image; ood_p is None without a reference recorded for this score."""
    usable = reference if reference is not None and reference.score == score_name else None
    values = OOD_SCORES[score_name](scores, None if usable is None else usable.fit).tolist()
    return [(value, None if usable is None else usable.p_value(value)) for value in values]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def result_rows(
    scores: Scores, family: ScoreFamily, score_name: str, reference: OodReference | None
) -> list[dict[str, float | int | None]]:
    """One result per image as POST /score and `score --json` give it: ood, ood_p and the family's scores
    (a value that is not finite is None: JSON has no NaN)."""
    values = {name: scores[name].tolist() for name in family.fields}
    rows: list[dict[str, float | int | None]] = []
    for index, (ood, p_value) in enumerate(ood_verdicts(scores, score_name, reference)):
        row: dict[str, float | int | None] = {"ood": _finite(ood), "ood_p": p_value}
        for name in family.fields:
            value = values[name][index]
            row[name] = int(value) if name == "evaluations" else _finite(float(value))
        rows.append(row)
    return rows
