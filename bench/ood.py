"""Which out-of-distribution score holds in both directions: candidate scores of one model, compared by AUROC,
AUPR and FPR at 95 % TPR on its own dataset's test images (in) against another dataset's (out).

Candidates (higher = more out of distribution), from each model's own numbers:
- `energy` (EBMs, the unconditional E(x)), `free_energy` (class-conditional EBMs: -log sum_y exp(-E(x, y)),
  JEM's marginal, Grathwohl et al. 2020), `grad_norm` (||dE/dx||, JEM's score), `bits_per_dim` (flows);
- `complexity`: the input-complexity correction of Serra et al. 2020 — a flow's bits of the 8-bit image minus
  a lossless compressor's (PNG at level 9); for an energy, which has no unit, the residual of the energy after
  the least-squares line through (PNG bits, energy) of the reference images;
- `typicality`: |s - mean| / std of a base score s over the reference images (Nalisnick et al. 2019, one
  image at a time): inputs *more* likely than the data are flagged too, the hard direction's failure;
- `reconstruction` (energies; the served score of that name, training/sampling/energy_ood.py): the Mahalanobis
  distance of log mean |x^_s - x| for x^_s one step down the energy from x noised along the Equilibrium Matching
  path at each noise share s, and of the image's PNG bits, from their Gaussian fit on the reference;
- with `--background B` (an energy trained on perturbed images of the same data, Ren et al. 2019's background
  model): `likelihood_ratio`, E(x) - E_B(x), the energy less what the background explains (pixel statistics
  such as how much of the image is empty), and the Mahalanobis distances with E_B beside the other statistics.
Reference statistics (means, the complexity line) use the held-out second half of the in-distribution test set
(`--reference-n` images from index 5000); AUROC uses the first `--n` images of each test set: no image is in both.
`--selection` reads the training sets instead, for choosing a score without the test sets: in = the first `--n`
training images, out = the other set's first `--n` training images, reference = the `--reference-n` training
images after the in images.

    python bench/ood.py checkpoints/eqm_mnist.safetensors --data-dir ../shared/data/mnist \
        --ood-dataset fashion-mnist --ood-data-dir /usr/share/datasets/fashion-mnist --n 1000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch

from training.commands.ood_figures import recorded_figures, roc_figures
from training.models.flows import Flow, bits_per_dim, dequantize
from training.runtime.load import load_model
from training.runtime.loaded import LoadedModel
from training.sampling.energy_ood import GaussianFit, reconstruction_statistics
from training.sampling.energy_ood import png_bits as served_png_bits
from training.sampling.likelihood import cnf_bits_per_dim
from training.sampling.sampler_config import FlowSampler
from training.sampling.scoring import image_seeds, pixel_levels
from training.train.data import load_dataset

REFERENCE_START = 5000  # the test set's second half: reference statistics only


def png_bits(images: torch.Tensor) -> torch.Tensor:
    """Bits of each 8-bit image [N, C, H, W] in [-1, 1] as a PNG at level 9 (the served score's own function)."""
    return served_png_bits(pixel_levels(images, (-1.0, 1.0))).double()


NOISE_SCALES = (0.1, 0.3, 0.6)  # multiscale score norms (MSMA, Mahadevan et al. 2021): ||dE/dx|| at x + sigma eps


def energy_scores(model: LoadedModel, images: torch.Tensor, batch: int = 250) -> dict[str, torch.Tensor]:
    """E(x) at the null label, the free energy over classes when conditional, ||dE/dx||, and ||dE/dx|| at
    x + sigma eps for each of NOISE_SCALES (seeded noise), each [N]."""
    module = model.module
    classes = len(model.classes or [])
    energy, free, grad = [], [], []
    scales: dict[float, list[torch.Tensor]] = {sigma: [] for sigma in NOISE_SCALES}
    generator = torch.Generator().manual_seed(0)

    def energy_and_gradient_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.clone().requires_grad_(True)
        null = torch.full((len(x),), -1) if classes else None
        value = module(x, null) if classes else module(x)  # [b]
        (gradient,) = torch.autograd.grad(value.sum(), x)
        return value.detach().double(), gradient.flatten(1).norm(dim=1).double()

    for chunk in torch.split(images, batch):
        value, norm = energy_and_gradient_norm(chunk)
        energy.append(value)
        grad.append(norm)
        for sigma in NOISE_SCALES:
            noise = torch.randn(chunk.shape, generator=generator)
            scales[sigma].append(energy_and_gradient_norm(chunk + sigma * noise)[1])
        if classes:
            with torch.no_grad():
                per_class = torch.stack([module(chunk, torch.full((len(chunk),), y)) for y in range(classes)], 1)
            free.append(-torch.logsumexp(-per_class.double(), dim=1))
    scores = {"energy": torch.cat(energy), "grad_norm": torch.cat(grad)}
    scores |= {f"grad_norm@{sigma}": torch.cat(norms) for sigma, norms in scales.items()}
    errors = [
        reconstruction_statistics([model], chunk, None, image_seeds(pixel_levels(chunk, model.data_range))[0])
        for chunk in torch.split(images, batch)
    ]
    scores |= {name: torch.cat([part[name] for part in errors]).double() for name in errors[0]}
    if classes:
        scores["free_energy"] = torch.cat(free)
    return scores


def flow_scores(model: LoadedModel, images: torch.Tensor, rtol: float, seed: int) -> dict[str, torch.Tensor]:
    """Bits/dim [N]: one pass for NICE/Glow/i-ResNet, an adaptive ODE solve at `rtol` for a CNF."""
    sampler = model.sampler_as(FlowSampler)
    if sampler.solver is not None:
        figure = cnf_bits_per_dim(cast(torch.nn.Module, model.module), images, None, rtol, rtol, 1, seed=seed)
        return {"bits_per_dim": figure.bits_per_dim.double()}
    flow = cast(Flow, model.module)
    dim = math.prod(images.shape[1:])
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        values = [bits_per_dim(flow.log_prob(dequantize(chunk)), dim) for chunk in torch.split(images, 250)]
    return {"bits_per_dim": torch.cat(values).double()}


def base_scores(model: LoadedModel, images: torch.Tensor, rtol: float, seed: int) -> dict[str, torch.Tensor]:
    if model.config.family == "ebm":
        return energy_scores(model, images)
    if model.config.family == "flow":
        return flow_scores(model, images, rtol, seed)
    raise SystemExit(f"ood: {model.name} is a {model.config.family} model; this bench compares EBMs and flows")


def derived_scores(
    scores: dict[str, torch.Tensor], complexity: torch.Tensor, reference: dict[str, torch.Tensor], ref_png: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each base score, its typicality and its complexity correction (the reference gives their constants)."""
    out = dict(scores)
    if "background_energy" in scores:
        out["likelihood_ratio"] = scores["energy"] - scores["background_energy"]
        pair = ["energy", "background_energy"]
        out["mahalanobis(energy, background_energy)"] = mahalanobis(
            stack(scores, pair, None), stack(reference, pair, None)
        )
    for name, values in scores.items():
        if name.startswith("log_denoising_error"):
            continue  # read together in `reconstruction`
        mean, std = reference[name].mean(), reference[name].std().clamp(min=1e-12)
        out[f"typicality({name})"] = ((values - mean) / std).abs()
    if "bits_per_dim" in scores:
        dim_bits = scores["bits_per_dim"] * 784  # bits of the image under the flow
        out["complexity(bits_per_dim)"] = dim_bits - complexity
    errors = [name for name in scores if name.startswith("log_denoising_error")]
    if errors:  # the served `reconstruction`, and its errors without the PNG bits
        out["reconstruction"] = mahalanobis(stack(scores, errors, complexity), stack(reference, errors, ref_png))
        out["mahalanobis(log denoising errors)"] = mahalanobis(
            stack(scores, errors, None), stack(reference, errors, None)
        )
    vector = [
        name
        for name in scores
        if name.startswith("grad_norm") or name in ("energy", "bits_per_dim", "background_energy")
    ]
    out["mahalanobis(" + ", ".join(vector) + ", png)"] = mahalanobis(
        stack(scores, vector, complexity), stack(reference, vector, ref_png)
    )
    out["mahalanobis(" + ", ".join(vector) + ")"] = mahalanobis(
        stack(scores, vector, None), stack(reference, vector, None)
    )
    for name in ("energy", "free_energy"):
        if name in scores:
            slope, intercept = np.polyfit(ref_png.numpy(), reference[name].numpy(), 1)
            out[f"complexity({name})"] = scores[name] - (slope * complexity + intercept)
    return out


def stack(scores: dict[str, torch.Tensor], names: list[str], complexity: torch.Tensor | None) -> torch.Tensor:
    """The statistics [N, K] a typicality test in several dimensions reads: norms as logarithms."""
    columns = [scores[name].clamp(min=1e-12).log() if name.startswith("grad_norm") else scores[name] for name in names]
    return torch.stack(columns + ([complexity] if complexity is not None else []), dim=1).double()


def mahalanobis(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Distance [N] of each row from the reference rows' Gaussian: the served `typicality`'s GaussianFit."""
    return GaussianFit.of(reference).distance(values).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="an EBM or flow checkpoint")
    parser.add_argument("--data-dir", required=True, help="the model's own dataset (IDX files)")
    parser.add_argument("--dataset", default=None, help="its name (default: the checkpoint's data.dataset)")
    parser.add_argument("--ood-data-dir", required=True, help="the other dataset's IDX files")
    parser.add_argument("--ood-dataset", default="mnist", help="the other dataset's name")
    parser.add_argument("--n", type=int, default=1000, help="test images of each set behind the figures")
    parser.add_argument("--reference-n", type=int, default=1000, help="held-out images behind the constants")
    parser.add_argument("--rtol", type=float, default=1e-3, help="a CNF's ODE tolerance (rtol = atol)")
    parser.add_argument("--seed", type=int, default=0, help="dequantization and probes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--background", type=Path, default=None, help="an energy trained on perturbed images: the likelihood ratio"
    )
    parser.add_argument(
        "--selection",
        action="store_true",
        help="choose, don't report: in, out and reference images from the training sets (module docstring)",
    )
    parser.add_argument(
        "--recorded-only", action="store_true", help="only the OOD score the checkpoint records, by the server's code"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, torch.device("cpu"))
    background = load_model(args.background, torch.device("cpu")) if args.background else None
    dataset = args.dataset or model.config.data.get("dataset", "mnist")
    split = "train" if args.selection else "test"
    inside = load_dataset(dataset, args.data_dir, split).images
    outside = load_dataset(args.ood_dataset, args.ood_data_dir, split).images[: args.n]
    start = args.n if args.selection else REFERENCE_START
    reference, inside = inside[start : start + args.reference_n], inside[: args.n]
    started = time.perf_counter()
    recorded = recorded_figures([model], inside, outside, torch.device("cpu"), args.rtol)
    print(f"recorded OOD score: {recorded}", flush=True)
    if args.recorded_only:
        return
    sets = {}
    for name, images in (("reference", reference), ("in", inside), ("out", outside)):
        print(f"ood: scoring {len(images)} {name} images", file=sys.stderr, flush=True)
        scores = base_scores(model, images, args.rtol, args.seed)
        if background is not None:
            scores["background_energy"] = energy_scores(background, images)["energy"]
        sets[name] = (scores, png_bits(images))
    ref_scores, ref_png = sets["reference"]
    in_all = derived_scores(*sets["in"], ref_scores, ref_png)
    out_all = derived_scores(*sets["out"], ref_scores, ref_png)
    rows = {name: roc_figures(in_all[name], out_all[name]) for name in in_all}
    means = {name: [round(float(in_all[name].mean()), 4), round(float(out_all[name].mean()), 4)] for name in rows}
    report = {
        "model": model.name,
        "in": dataset,
        "split": split,
        "out": args.ood_dataset,
        "n": args.n,
        "reference_n": args.reference_n,
        "seconds": round(time.perf_counter() - started, 1),
        "recorded": recorded,
        "scores": rows,
        "means_in_out": means,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"\n| score | AUROC | AUPR | FPR95 |  ({model.name}: {dataset} in, {args.ood_dataset} out)")
    for name, row in rows.items():
        print(f"| {name} | {row['auroc']} | {row['aupr']} | {row['fpr95']} |")


if __name__ == "__main__":
    main()
