"""How well a model's OOD score tells its own data from another set's: AUROC, AUPR and FPR at 95 % TPR, for
`evaluate --ood-data` and bench/ood.py."""

from __future__ import annotations

import numpy as np
import torch

from training.commands.score import compute_scores
from training.runtime.loaded import LoadedModel
from training.sampling.scoring import OOD_SCORES, LikelihoodSettings, ood_reference, ood_score_name, score_family
from training.train.data import load_dataset


def roc_figures(inside: torch.Tensor, outside: torch.Tensor) -> dict[str, float]:
    """AUROC (ties count half), AUPR with the out-of-distribution images as positives, FPR at 95 % TPR."""
    values = torch.cat([inside, outside]).double()
    truth = torch.cat([torch.zeros(len(inside)), torch.ones(len(outside))])
    ranks = torch.from_numpy(np.argsort(np.argsort(values.numpy(), kind="stable"), kind="stable")).double() + 1
    # Mid-ranks for ties:
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    rank_sum = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (rank_sum / counts)[inverse]
    n_in, n_out = len(inside), len(outside)
    auroc = (ranks[truth == 1].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out)
    order = torch.argsort(values, descending=True)
    hits = truth[order]
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    aupr = (precision * hits).sum() / hits.sum()
    threshold = torch.quantile(outside.double(), 0.05)  # 95 % of the out images score at least this
    fpr95 = (inside.double() >= threshold).double().mean()
    return {"auroc": round(float(auroc), 4), "aupr": round(float(aupr), 4), "fpr95": round(float(fpr95), 4)}


def recorded_figures(
    members: list[LoadedModel], inside: torch.Tensor, outside: torch.Tensor, device: torch.device, rtol: float = 1e-5
) -> dict:
    """The figures of the model's OOD score (the one its reference records, else its family's), computed by the
    code the server and `score` run; inside/outside [N, *shape] in the model's data range. An ensemble's
    members score as it is served: their mean energy, under the first member's recorded score."""
    model = members[0]
    reference = ood_reference(model.config.metrics)
    name = ood_score_name(model, score_family(model))
    settings = LikelihoodSettings(rtol, rtol)
    values = []
    for what, images in (("in", inside), ("out", outside)):
        scores = compute_scores(members, images, None, device, f"{model.name}: {what} images' {name}", settings, name)
        fit = reference.fit if reference is not None and reference.score == name else None
        values.append(OOD_SCORES[name](scores, fit).double())
    return {"score": name, "n_in": len(inside), "n_out": len(outside), **roc_figures(values[0], values[1])}


def ood_against(members: list[LoadedModel], test: torch.Tensor, data_dir: str, n: int, device: torch.device) -> dict:
    """`evaluate --ood-data`: the model's OOD score on its first `n` test images (the reference recorded by
    `score --record-reference` holds the last ones) against the first `n` test images of the IDX files in
    `data_dir`; images [N, *shape] in [-1, 1] as datasets load."""
    outside = load_dataset("idx", data_dir, "test").images[:n]
    if outside.shape[1:] != test.shape[1:]:
        raise ValueError(
            f"--ood-data {data_dir} holds {list(outside.shape[1:])} images; the model's are {list(test.shape[1:])}"
        )
    low, high = members[0].data_range
    inside, outside = ((images + 1) / 2 * (high - low) + low for images in (test[:n], outside))
    return {**recorded_figures(members, inside, outside, device), "ood_data": str(data_dir)}
