"""The exact likelihood of a continuous normalizing flow: the instantaneous change of variables, integrated.

Along dx/dt = v(x, t), d log p_t(x_t) / dt = -div v(x_t, t) (Chen et al. 2018), so a data point x(1) has
log p_1(x(1)) = log N(x(0); 0, I) - integral_0^1 div v dt: the augmented state (x, log-det) is integrated
backwards from the data (t = 1) to the prior (t = 0) by the adaptive Dormand-Prince solver of
training/sampling/ode.py at a stated tolerance (a fixed-step path near the sharp field at t = 1 gives figures
that are not the model's; see ../shared/notes/cnf-flow-matching.md). The divergence is exact (one
vector-Jacobian product per dimension, batched by vmap) or Hutchinson's estimate (FFJORD, Grathwohl et al.
2019) with Rademacher probes drawn once per sample from its seed and kept for the whole path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from training.models.flows import bits_per_dim, dequantize
from training.sampling.noise import chain_seeds, chain_uniform
from training.sampling.ode import RowsField, dopri5, rms_norm

EXACT_TRACE_CHUNK = 64  # basis vectors per batched vector-Jacobian product of the exact trace
DEFAULT_RTOL = 1e-5  # the stated tolerance; bench/cnf_likelihood.py shows how the figure moves from 1e-3 to 1e-5
DEFAULT_ATOL = 1e-5
DEFAULT_PROBES = 1  # per image: more images buy a smaller standard error than more probes for the same time
# Images per adaptive solve on one CPU core: Hutchinson's batched convolutions cost ~25 % less an image at 10 than
# at 5 and no less beyond; the exact trace's 64-vector products already fill the core (4 cost less an image than 20)
HUTCHINSON_BATCH, EXACT_TRACE_BATCH = 10, 4


def rademacher_probes(seeds: torch.Tensor, probes: int, shape: tuple[int, ...]) -> torch.Tensor:
    """+-1 probes [P, B, *shape], a pure function of each sample's seed (the same alone or batched)."""
    uniform = chain_uniform(seeds, (probes, *shape), 0.0, 1.0)  # [B, P, *shape]
    return torch.where(uniform < 0.5, -1.0, 1.0).transpose(0, 1).contiguous()


def field_and_divergence(
    field: nn.Module,
    x: torch.Tensor,  # [b, *shape]
    t: torch.Tensor,  # [b]
    labels: torch.Tensor | None,  # [b], -1 = the null label
    probes: torch.Tensor | None,  # [P, b, *shape] Rademacher probes, or None for the exact trace
) -> tuple[torch.Tensor, torch.Tensor]:
    """v(x, t, y) [b, *shape] and its divergence [b]: exactly, as the sum of the Jacobian's diagonal read by
    EXACT_TRACE_CHUNK basis vectors at a time, or mean_p e_p^T (dv/dx) e_p over the probes (unbiased)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        velocity = field(x, t, labels)
        if probes is not None:
            (products,) = torch.autograd.grad(velocity, x, probes, is_grads_batched=True)  # [P, b, *shape]
            return velocity.detach(), (products * probes).flatten(2).sum(2).mean(0)
        dim = x[0].numel()
        divergence = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for start in range(0, dim, EXACT_TRACE_CHUNK):
            count = min(EXACT_TRACE_CHUNK, dim - start)
            basis = torch.zeros(count, *x.shape, dtype=x.dtype, device=x.device)  # [k, b, *shape]
            basis.view(count, x.shape[0], dim)[torch.arange(count), :, start + torch.arange(count)] = 1.0
            last = start + count >= dim
            (rows,) = torch.autograd.grad(velocity, x, basis, retain_graph=not last, is_grads_batched=True)
            divergence += torch.diagonal(rows.flatten(2)[:, :, start : start + count], dim1=0, dim2=2).sum(1)
        return velocity.detach(), divergence


@dataclass
class CNFLikelihood:
    """Per-sample log-densities and what the solve cost."""

    log_prob: torch.Tensor  # [B] log p_1(x) in nats, in the data space
    prior_log_prob: torch.Tensor  # [B] log N(x(0); 0, I)
    delta_log_prob: torch.Tensor  # [B] -integral_0^1 div v dt
    evaluations: torch.Tensor  # [B] field evaluations (each with its divergence) per sample: NFE
    batch_evaluations: int


def likelihood_norm(scaled_error: torch.Tensor) -> torch.Tensor:
    """The larger of the x part's RMS and the log-det's own error: the log-det is one number among D, and an
    RMS over all of them would barely control it (torchdiffeq's mixed norm over (x, log p) does the same)."""
    return torch.maximum(rms_norm(scaled_error[:, :-1]), scaled_error[:, -1].abs())


def likelihood_field(
    field: nn.Module,
    shape: tuple[int, ...],
    labels: torch.Tensor | None,  # [B], -1 = the null label; None: the null label for all
    probe_vectors: torch.Tensor | None,  # [P, B, *shape] Rademacher probes, or None for the exact trace
    chunk: int | None = None,  # evaluate in batches of exactly this many rows (the last padded); None: all at once
) -> RowsField:
    """The augmented field (x, log-det) -> (v, div v) [b, D + 1] of rows `rows` of a batch of B samples.

    The backward solve amplifies rounding: a convolution's last-bit differences between batch sizes move
    log p by up to ~1e-3 of itself. With `chunk`, every evaluation runs in batches of exactly `chunk` rows (the
    last one padded with copies of its first row), so a sample's numbers do not depend on what shares its
    batch: the server's score of an image is the same alone, batched and on the command line."""
    dim = math.prod(shape)

    def augmented(state: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [b, D + 1]
        points = state[:, :dim].reshape(-1, *shape)
        rows_labels = None if labels is None else labels[rows]
        rows_probes = None if probe_vectors is None else probe_vectors[:, rows]
        if chunk is None:
            velocity, divergence = field_and_divergence(field, points, t, rows_labels, rows_probes)
            return torch.cat([velocity.flatten(1), divergence[:, None]], dim=1)
        parts = []
        for start in range(0, len(rows), chunk):
            count = min(chunk, len(rows) - start)
            pick = torch.arange(start, start + chunk, device=rows.device).clamp(max=start + count - 1)
            pick[count:] = start  # padding: copies of the chunk's first row, dropped below
            velocity, divergence = field_and_divergence(
                field,
                points[pick],
                t[pick],
                None if rows_labels is None else rows_labels[pick],
                None if rows_probes is None else rows_probes[:, pick],
            )
            parts.append(torch.cat([velocity.flatten(1), divergence[:, None]], dim=1)[:count])
        return torch.cat(parts)

    return augmented


def augmented_start(x: torch.Tensor) -> torch.Tensor:
    """Data points [B, *shape] at t = 1 -> the augmented state [B, D + 1] with log-det 0."""
    return torch.cat([x.flatten(1), torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def prior_and_delta(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented state [B, D + 1] at t = 0 -> (log N(x(0); 0, I) [B], integral_1^0 div v dt [B])."""
    dim = state.shape[1] - 1
    prior_point, delta = state[:, :dim], state[:, dim]
    return -0.5 * (prior_point.pow(2).sum(1) + dim * math.log(2 * math.pi)), delta


@torch.no_grad()
def cnf_log_likelihood(
    field: nn.Module,
    x: torch.Tensor,  # [B, *shape] data points (at t = 1)
    labels: torch.Tensor | None = None,  # [B] true labels, -1 or None = the null label
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    probes: int = DEFAULT_PROBES,  # Rademacher probes of the Hutchinson trace; 0 = the exact trace
    probe_seeds: torch.Tensor | None = None,  # [B] seeds of each sample's probes (default 0..B-1)
    chunk: int | None = None,  # field evaluations in batches of exactly this many rows (see likelihood_field)
) -> CNFLikelihood:
    """log p(x | y) of a CNF with prior N(0, I) (the prior flow matching trained on), integrating (x, log-det)
    from t = 1 to t = 0 by dopri5 with per-sample error control."""
    if probes < 0:
        raise ValueError(f"probes must be >= 1 for Hutchinson's trace or 0 for the exact trace, not {probes}")
    batch, shape = x.shape[0], tuple(x.shape[1:])
    seeds = chain_seeds(0, batch) if probe_seeds is None else probe_seeds
    probe_vectors = rademacher_probes(seeds, probes, shape).to(x.device, x.dtype) if probes else None
    augmented = likelihood_field(field, shape, labels, probe_vectors, chunk)
    solution = dopri5(augmented, augmented_start(x), 1.0, 0.0, rtol, atol, likelihood_norm)
    prior_log_prob, delta = prior_and_delta(solution.state)
    log_prob = prior_log_prob + delta
    return CNFLikelihood(log_prob, prior_log_prob, delta, solution.evaluations, solution.batch_evaluations)


@dataclass
class CNFBitsPerDim:
    """Test bits/dim of a CNF and how they were computed (what `evaluate` prints and records)."""

    bits_per_dim: torch.Tensor  # [N] per image
    evaluations: torch.Tensor  # [N] NFE per image
    rtol: float
    atol: float
    probes: int  # 0: exact trace
    conditional: bool  # log p(x | true label) rather than log p(x) (the null label)
    seconds: float  # wall time of the solves

    def report(self) -> dict[str, float | int | str]:
        """The figure, its standard error over images (which holds the probes' noise too) and its cost."""
        n = len(self.bits_per_dim)
        return {
            "bits_per_dim": round(self.bits_per_dim.mean().item(), 4),
            "standard_error": round(self.bits_per_dim.std().item() / math.sqrt(n), 4) if n > 1 else 0.0,
            "n": n,
            "solver": "dopri5",
            "rtol": self.rtol,
            "atol": self.atol,
            "trace": "exact" if self.probes == 0 else "hutchinson",
            "probes": self.probes,
            "nfe_mean": round(self.evaluations.double().mean().item(), 1),
            "nfe_max": int(self.evaluations.max().item()),
            "label": "true" if self.conditional else "null",
            "seconds_per_image": round(self.seconds / max(n, 1), 3),
        }


def cnf_bits_per_dim(
    field: nn.Module,
    images: torch.Tensor,  # [N, *shape] 8-bit images in [-1, 1], as datasets load
    labels: torch.Tensor | None = None,  # [N] true labels (conditional figure), None = the null label
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    probes: int = DEFAULT_PROBES,
    batch_size: int | None = None,  # images per solve (default HUTCHINSON_BATCH or EXACT_TRACE_BATCH)
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,  # called with each batch's image count as it finishes
    data_range: tuple[float, float] = (-1.0, 1.0),  # the field's data space (an exported field's sidecar range)
) -> CNFBitsPerDim:
    """Bits/dim of 8-bit images under a CNF, on the other flows' footing: one uniform dequantization draw
    (training/models/flows.py `dequantize`, seeded, the global RNG left as it was) and `bits_per_dim`, which
    adds the D log(2/256) of the scaling from [0, 256) to [-1, 1] (or to `data_range`'s bins). Probes are seeded per
    image."""
    started = time.perf_counter()
    batch_size = batch_size or (HUTCHINSON_BATCH if probes else EXACT_TRACE_BATCH)
    device = next(field.parameters()).device
    was_training = field.training
    field.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        points = dequantize(images)  # [N, *shape], the whole set at once: independent of batch_size
    if data_range != (-1.0, 1.0):
        points = (points + 1) / 2 * (data_range[1] - data_range[0]) + data_range[0]
    seeds = chain_seeds(seed, len(images))
    dim = math.prod(images.shape[1:])
    bits, evaluations = [], []
    for rows in torch.split(torch.arange(len(images)), batch_size):
        chunk_labels = None if labels is None else labels[rows].to(device)
        result = cnf_log_likelihood(field, points[rows].to(device), chunk_labels, rtol, atol, probes, seeds[rows])
        bits.append(bits_per_dim(result.log_prob, dim, data_range).cpu())
        evaluations.append(result.evaluations.cpu())
        if on_batch is not None:
            on_batch(len(rows))
    field.train(was_training)
    seconds = time.perf_counter() - started
    return CNFBitsPerDim(torch.cat(bits), torch.cat(evaluations), rtol, atol, probes, labels is not None, seconds)
