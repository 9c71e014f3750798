"""How a CNF's test bits/dim moves with the ODE tolerance and with the trace estimator, on a small test subset.

`evaluate` (training/commands/evaluate.py) integrates the divergence by dopri5 at rtol = atol = 1e-5 with one
Rademacher probe an image (training/sampling/likelihood.py). On the first --n images of evaluate's own test
subset, with its seeded dequantization and probes, this prints:
- the tolerance sweep: bits/dim with its standard error over images, the NFE an image, seconds an image, and
  each image's change from the tightest tolerance (the same probes at every tolerance, so the change is the
  solver's error alone);
- the estimators: the exact trace on the first --exact-n images beside Hutchinson's estimate with 1 and 4
  probes on the same images at --estimator-rtol: each one's mean error against the exact figure (its bias,
  ~0 for an unbiased estimator, +- its standard error) and its RMS error an image (the probes' noise, which
  evaluate's standard error over images already holds).

The exact trace costs one backward pass per dimension (784 on MNIST) at every field evaluation, some 350 times
a one-probe evaluation on a CPU core (~3.7 s against ~11 ms for a 345k-parameter field): at ~100-200 evaluations
an image that is several minutes an image, so the defaults give it 3 images at rtol 1e-4.

    python bench/cnf_likelihood.py checkpoints/cnf_mnist.safetensors --data-dir ../shared/data/mnist --n 50 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from training.commands.flags import count_at_least, positive_float
from training.runtime.load import load_model
from training.sampling.likelihood import CNFBitsPerDim, cnf_bits_per_dim
from training.sampling.sampler_config import FlowSampler
from training.train.data import load_dataset


def standard_error(values: torch.Tensor) -> float:
    return values.std().item() / math.sqrt(len(values)) if len(values) > 1 else 0.0


def figure_row(figure: CNFBitsPerDim) -> dict[str, Any]:
    report = figure.report()
    keep = ("bits_per_dim", "standard_error", "n", "nfe_mean", "nfe_max", "seconds_per_image")
    return {key: report[key] for key in keep}


def tolerance_sweep(field: torch.nn.Module, images: torch.Tensor, rtols: list[float], seed: int) -> list[dict]:
    """One row per rtol (atol = rtol), Hutchinson with one probe: the figure and its change from the tightest."""
    figures = {}
    for rtol in sorted(rtols, reverse=True):
        print(f"cnf_likelihood: {len(images)} images at rtol {rtol}", file=sys.stderr, flush=True)
        figures[rtol] = cnf_bits_per_dim(field, images, None, rtol, rtol, 1, seed=seed)
    tightest = figures[min(rtols)].bits_per_dim
    rows = []
    for rtol, figure in figures.items():
        change = figure.bits_per_dim - tightest  # [n] per image: the solver's error at this tolerance
        row = {"rtol": rtol, "atol": rtol, **figure_row(figure)}
        row.update(mean_change=round(change.mean().item(), 5), max_abs_change=round(change.abs().max().item(), 5))
        rows.append(row)
    return rows


def estimator_comparison(field: torch.nn.Module, images: torch.Tensor, rtol: float, seed: int) -> list[dict]:
    """The exact trace and Hutchinson with 1 and 4 probes on the same images: each estimate's error."""
    print(f"cnf_likelihood: {len(images)} images, exact trace at rtol {rtol}", file=sys.stderr, flush=True)
    exact = cnf_bits_per_dim(field, images, None, rtol, rtol, 0, seed=seed)
    rows = [{"trace": "exact", "probes": 0, **figure_row(exact), "mean_error": 0.0, "error_se": 0.0, "rms_error": 0.0}]
    for probes in (1, 4):
        print(f"cnf_likelihood: {len(images)} images, {probes} probe(s) at rtol {rtol}", file=sys.stderr, flush=True)
        figure = cnf_bits_per_dim(field, images, None, rtol, rtol, probes, seed=seed)
        error = figure.bits_per_dim - exact.bits_per_dim  # [m] per image
        rows.append(
            {
                "trace": "hutchinson",
                "probes": probes,
                **figure_row(figure),
                "mean_error": round(error.mean().item(), 5),
                "error_se": round(standard_error(error), 5),
                "rms_error": round(error.pow(2).mean().sqrt().item(), 5),
            }
        )
    return rows


def markdown(rows: list[dict]) -> list[str]:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(row[column]) for column in columns) + " |" for row in rows]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a CNF checkpoint (python -m training flow --arch cnf)")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: $SAMPLEBAY_DATA_DIR)")
    parser.add_argument("--n", type=count_at_least(1), default=50, help="test images of the tolerance sweep")
    parser.add_argument(
        "--exact-n",
        type=count_at_least(0),
        default=3,
        help="of those, the first images given the exact trace beside 1 and 4 probes (0: no estimator rows)",
    )
    parser.add_argument(
        "--rtols", type=positive_float, nargs="+", default=[1e-3, 1e-4, 1e-5], help="tolerances swept (atol = rtol)"
    )
    parser.add_argument(
        "--estimator-rtol",
        type=positive_float,
        default=1e-4,
        help="the tolerance (atol too) of the estimator rows: the probes' noise hardly depends on it, the exact "
        "trace's cost does",
    )
    parser.add_argument("--seed", type=int, default=0, help="evaluate's --seed: the same subset, noise and probes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON object, not tables")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    if not (isinstance(model.sampler, FlowSampler) and model.sampler.solver is not None):
        raise SystemExit(f"cnf_likelihood: {args.checkpoint} is a {model.config.family} model, not a CNF")
    test = load_dataset("mnist", args.data_dir, "test")
    order = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(args.seed + 1))  # evaluate's
    images = test.images[order[: args.n]]
    field = model.module
    assert isinstance(field, torch.nn.Module)
    sweep = tolerance_sweep(field, images, args.rtols, args.seed)
    estimators = []
    if args.exact_n:
        estimators = estimator_comparison(field, images[: args.exact_n], args.estimator_rtol, args.seed)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "tolerances": sweep, "estimators": estimators}))
        return
    print(f"{model.name}: bits/dim by dopri5, Hutchinson with 1 probe, {len(images)} test images")
    print("\n".join(markdown(sweep)))
    if estimators:
        print(f"\n{model.name}: trace estimators on {estimators[0]['n']} images at rtol {args.estimator_rtol}")
        print("\n".join(markdown(estimators)))


if __name__ == "__main__":
    main()
