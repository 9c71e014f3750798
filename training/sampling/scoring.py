"""What a model says about an input: the scores POST /score and `python -m training score` report, and the
out-of-distribution (OOD) verdict built from them.

Every family's scores are here, in one table (`SCORE_FAMILIES`, chosen once by `score_family`), so the server's
pools and the CLI compute the same numbers by the same functions:

- an EBM (or an ensemble: the mean of its members' energies) gives its energy E(x), or E(x, y) with a label;
- a flow with an exact inverse (NICE, Glow; i-ResNet with its power-series log-det estimate) gives log p(x) of
  the dequantized image by one pass, and bits/dim;
- a CNF gives the same by the adaptive ODE solve of training/sampling/likelihood.py at a stated tolerance,
  with the field evaluations it took (the server steps those solves as chains, service/score_pools.py);
- a GAN saved with its critic gives the critic's value d(x).

A score is a pure function of the image: its uniform dequantization noise and a CNF's Hutchinson probes are
counter-based noise (training/sampling/noise.py) seeded by a hash of the image's 8-bit pixels, so an image
scores the same alone, in any batch, over HTTP and on the command line.

`ood` is higher for inputs further out; `ood_p` the fraction of reference scores (the model's own held-out
data, recorded in the checkpoint's metrics under `OOD_METRIC`) at least as high: a p-value.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from training.models.cnf import is_velocity_field
from training.models.flows import bits_per_dim
from training.runtime.loaded import LoadedModel
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

# Each OOD score from a result's scores, higher = more out of distribution.
OOD_SCORES: dict[str, Callable[[Mapping[str, torch.Tensor]], torch.Tensor]] = {
    "energy": lambda scores: scores["energy"],
    "bits_per_dim": lambda scores: scores["bits_per_dim"],
    "negative_critic": lambda scores: -scores["critic"],
}


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
    """The one place a model's family picks how it scores; ValueError (the reason) for one that cannot score
    images: a GAN saved without its critic, or a model of 2-D points."""
    if len(model.shape) != 3:
        raise ValueError(f"{model.name} models {len(model.shape)}-D points, not images; only image models score")
    family = model.config.family
    if family == "ebm":
        return SCORE_FAMILIES["energy"]
    if family == "flow":
        return SCORE_FAMILIES["cnf" if is_velocity_field(model.module) else "flow"]
    if family == "gan" and model.critic is not None:
        return SCORE_FAMILIES["critic"]
    if family == "gan":
        raise ValueError(f"{model.name} is a GAN saved without its critic: it has no score for an image")
    raise ValueError(f"{model.name} is a {family} model; scores exist for EBMs, flows and GANs with a critic")


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


def bits_of(log_prob: torch.Tensor, shape: tuple[int, ...], data_range: tuple[float, float]) -> torch.Tensor:
    """Bits/dim [B] of 8-bit images from the density log p [B] (nats) of their dequantized points."""
    dim = math.prod(shape)
    width = data_range[1] - data_range[0]
    return bits_per_dim(log_prob + dim * math.log(width / 2), dim)  # bits_per_dim's bins are 2 / 256 wide


@dataclass
class LikelihoodInputs:
    """What a CNF's likelihood solve of some images starts from."""

    points: torch.Tensor  # [B, *shape] dequantized, at t = 1
    probe_seeds: torch.Tensor  # [B] int64: what each image's Hutchinson probes are drawn from
    probe_vectors: torch.Tensor | None  # [P, B, *shape] Rademacher probes; None: the exact trace


def likelihood_inputs(x: torch.Tensor, data_range: tuple[float, float], probes: int) -> LikelihoodInputs:
    """Images [B, *shape] in the data range -> their dequantized points and probes, seeded by their pixels."""
    levels = pixel_levels(x, data_range)
    dequantization, probe_seeds = image_seeds(levels)
    points = dequantized(levels, dequantization, data_range)
    vectors = rademacher_probes(probe_seeds, probes, tuple(x.shape[1:])) if probes else None
    return LikelihoodInputs(points, probe_seeds, vectors)


def cnf_scores(
    log_prob: torch.Tensor, evaluations: torch.Tensor, shape: tuple[int, ...], data_range: tuple[float, float]
) -> Scores:
    return {
        "log_prob": log_prob.cpu(),
        "bits_per_dim": bits_of(log_prob, shape, data_range).cpu(),
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
        levels = pixel_levels(x, model.data_range)
        seeds, _ = image_seeds(levels)
        points = dequantized(levels, seeds, model.data_range).to(x.device)
        log_prob = model.module.log_prob(points).float()  # type: ignore[operator]
        return {"log_prob": log_prob.cpu(), "bits_per_dim": bits_of(log_prob, model.shape, model.data_range).cpu()}
    raise ValueError(f"{model.name} scores by an ODE solve, not one pass")


@dataclass(frozen=True)
class OodReference:
    """Reference OOD scores a checkpoint recorded from held-out data: what `ood_p` compares with."""

    score: str  # a key of OOD_SCORES
    reference: list[float]  # sorted ascending
    split: str

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
    return OodReference(str(score), sorted(float(value) for value in reference), str(split))


def ood_score_name(model: LoadedModel, family: ScoreFamily) -> str:
    """The model's OOD score: the one its recorded reference was made with, else its family's default."""
    recorded = ood_reference(model.config.metrics)
    return recorded.score if recorded is not None else family.default_ood


def ood_verdicts(scores: Scores, score_name: str, reference: OodReference | None) -> list[tuple[float, float | None]]:
    """(ood, ood_p) per image; ood_p is None without a reference recorded for this score."""
    values = OOD_SCORES[score_name](scores).tolist()
    usable = reference if reference is not None and reference.score == score_name else None
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
