"""`python -m training score`: what POST /score answers, from the command line, by the same functions
(training/sampling/scoring.py); and `--record-reference`, which stores the held-out reference scores that give
`ood_p` its meaning in the checkpoint's metrics."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.runtime.buffer_files import model_digest
from training.runtime.checkpoint import load_checkpoint, save_checkpoint
from training.runtime.device import pick_device, use_threads
from training.runtime.images import ImageDecodeError, decode_exact
from training.runtime.load import load_model
from training.runtime.loaded import LoadedModel
from training.sampling.energy_ood import FITTED_STATISTICS, GaussianFit, fitted_statistics
from training.sampling.likelihood import DEFAULT_ATOL, DEFAULT_RTOL, HUTCHINSON_BATCH, cnf_log_likelihood
from training.sampling.scoring import (
    MAX_REFERENCE,
    OOD_FAMILIES,
    OOD_METRIC,
    OOD_SCORES,
    LikelihoodSettings,
    Scores,
    cnf_scores,
    likelihood_inputs,
    one_pass_scores,
    ood_reference,
    ood_score_name,
    ood_statistics,
    result_rows,
    score_family,
)
from training.train.data import IDX_IMAGES_MAGIC, IMAGE_EXTENSIONS, _read_idx, load_dataset
from training.train.progress import progress

VERSION_CHARS = 12  # as the server shows a version (service/catalogue/registry.py)
ONE_PASS_BATCH = 256  # images per forward pass
REFERENCE_N = {"one_pass": 1000, "cnf": 200}  # default reference images: a CNF's solves take seconds an image
SCORE_HELP = "score images under a model: energy, log-likelihood and bits/dim, or critic value, and an OOD verdict"
SCORE_DESCRIPTION = (
    "Print (or --json write) what POST /score answers for the same images: each image's energy (EBMs),\n"
    "log p and bits/dim (flows; a CNF's by dopri5 at rtol = atol = 1e-5 with one Hutchinson probe, its\n"
    "field evaluations beside), or critic value (GANs), its `ood` score (higher = more out of distribution)\n"
    "and `ood_p`, the fraction of the checkpoint's recorded reference scores at least as high.\n"
    "--record-reference records those reference scores from the held-out end of the test split."
)
SCORE_EPILOG = """examples:
  python -m training score checkpoints/eqm_mnist.safetensors digit.png more_digits/   # energy and OOD verdict
  python -m training score checkpoints/glow_mnist.safetensors data/mnist/t10k-images-idx3-ubyte.gz --json
  python -m training score checkpoints/glow_mnist.safetensors --record-reference --data-dir data/mnist
"""


def add_command(commands: Any, formatter_class: type[argparse.HelpFormatter]) -> None:
    """The `score` command in the CLI's subcommands (training/commands/cli.py)."""
    parser = commands.add_parser(
        "score", help=SCORE_HELP, description=SCORE_DESCRIPTION, epilog=SCORE_EPILOG, formatter_class=formatter_class
    )
    add_arguments(parser)
    parser.set_defaults(handler=run_score)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="the .safetensors checkpoint whose scores are wanted")
    parser.add_argument(
        "inputs",
        nargs="*",
        type=Path,
        metavar="IMAGE|DIR|IDX",
        help="PNG/JPEG files, folders of them (searched recursively, in sorted order) or IDX image files "
        "(.gz or not), each image exactly the model's size and channels (no resizing)",
    )
    parser.add_argument("--json", action="store_true", help="write POST /score's JSON body instead of lines")
    parser.add_argument(
        "--label", type=int, default=None, help="class-conditional EBMs and CNFs: score E(x, y) or log p(x | y)"
    )
    parser.add_argument(
        "--record-reference",
        action="store_true",
        help="instead of scoring INPUTS: score the held-out split (the last --reference-n test images of "
        "--data-dir) and record the sorted OOD scores in the checkpoint's metrics.ood, which POST /score's ood_p "
        "compares with; keep those images out of any AUROC",
    )
    parser.add_argument("--data-dir", default=None, help="--record-reference: the dataset's IDX files")
    parser.add_argument(
        "--dataset",
        default=None,
        help="--record-reference: mnist or fashion-mnist (default: the dataset the checkpoint names)",
    )
    parser.add_argument(
        "--reference-n",
        type=int,
        default=None,
        help=f"--record-reference: held-out images scored (default {REFERENCE_N['one_pass']}, a CNF "
        f"{REFERENCE_N['cnf']}; at most {MAX_REFERENCE})",
    )
    parser.add_argument(
        "--ood-score",
        choices=sorted(OOD_SCORES),
        default=None,
        help="--record-reference: the OOD score recorded, which becomes the model's `ood` (default: its "
        "family's: energy, bits_per_dim or negative_critic; energies also typicality or reconstruction)",
    )
    parser.add_argument(
        "--ode-rtol", type=float, default=DEFAULT_RTOL, help="a CNF's likelihood solve: dopri5's relative tolerance"
    )
    parser.add_argument(
        "--ode-atol", type=float, default=DEFAULT_ATOL, help="a CNF's likelihood solve: dopri5's absolute tolerance"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (the server's numbers: the same device)")
    parser.add_argument("--threads", default="auto", help="torch CPU threads: a count, or auto")


def read_inputs(paths: list[Path], model: LoadedModel) -> tuple[list[str], torch.Tensor]:
    """(names, images [N, *shape] in the model's data range): every image exactly as stored."""
    names: list[str] = []
    images: list[torch.Tensor] = []
    low, high = model.data_range
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path} is neither an image, a folder nor an IDX file")
        for file in files:
            payload = file.read_bytes()
            if payload[:2] == b"\x00\x00" or file.suffix == ".gz":  # IDX (magic 0x00000803), maybe gzipped
                pixels = _read_idx(file, IDX_IMAGES_MAGIC)  # [N, H, W] uint8
                if tuple(pixels.shape[1:]) != tuple(model.shape[1:]) or model.shape[0] != 1:
                    raise ValueError(
                        f"{file} holds {pixels.shape[2]}x{pixels.shape[1]} grey images; {model.name} "
                        f"scores {'x'.join(map(str, model.shape))} images (channels x height x width)"
                    )
                tensor = torch.from_numpy(np.array(pixels)).float().div(255).unsqueeze(1) * (high - low) + low
                images.extend(tensor)
                names.extend(f"{file}[{index}]" for index in range(len(tensor)))
                continue
            try:
                images.append(decode_exact(payload, model.shape, model.data_range))
            except ImageDecodeError as error:
                raise ValueError(f"{file}: {error}") from error
            names.append(str(file))
    if not images:
        raise ValueError("no images to score: name image files, folders of them or IDX files")
    return names, torch.stack(images)


def compute_scores(
    members: list[LoadedModel],  # one model, or an ensemble's members (its energy: their mean, as served)
    images: torch.Tensor,
    labels: torch.Tensor | None,
    device: torch.device,
    what: str,
    settings: LikelihoodSettings | None = None,  # a CNF's solve (default: the server's defaults)
    ood: str | None = None,  # the OOD score whose statistics to add (ood_statistics)
) -> Scores:
    """The scores of images [N, *shape] (in batches; a CNF's by dopri5 at the server's stated settings), with
    what the OOD score `ood` reads beyond them."""
    model = members[0]
    family = score_family(model)
    parts: list[Scores] = []
    batch = ONE_PASS_BATCH if family.one_pass else HUTCHINSON_BATCH
    settings = settings or LikelihoodSettings()
    bar = progress(None, len(images), what, unit="image")
    for rows in torch.split(torch.arange(len(images)), batch):
        chunk = images[rows].to(device)
        chunk_labels = None if labels is None else labels[rows].to(device)
        if family.one_pass:
            parts.append(one_pass_scores(family, members, chunk, chunk_labels))
        else:
            inputs = likelihood_inputs(images[rows], model.data_range, settings.probes, model.dequantized)
            solved = cnf_log_likelihood(
                model.module,
                inputs.points.to(device),
                chunk_labels,
                settings.rtol,
                settings.atol,
                settings.probes,
                inputs.probe_seeds,
                settings.chunk,
            )
            parts.append(cnf_scores(solved.log_prob, solved.evaluations, model.shape, model.data_range, model.levels))
        if ood is not None:
            parts[-1] |= ood_statistics(ood, members, chunk, chunk_labels, parts[-1])
        bar.update(len(rows))
    bar.close()
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def run_score(args: argparse.Namespace) -> None:
    print(use_threads(args.threads), file=sys.stderr, flush=True)
    device = pick_device(args.device)
    model = load_model(args.checkpoint, device)
    family = score_family(model)
    if args.record_reference:
        record_reference(args, model, device)
        return
    labels = None
    if args.label is not None:
        if not family.conditional_label or model.classes is None:
            raise ValueError(f"--label applies to class-conditional EBMs and CNFs; {model.name} takes no label")
        model.check_labels(torch.tensor([args.label]))
    names, images = read_inputs(args.inputs, model)
    if args.label is not None:
        labels = torch.full((len(images),), args.label)
    likelihood = LikelihoodSettings(args.ode_rtol, args.ode_atol)
    score_name = ood_score_name(model, family)
    scores = compute_scores([model], images, labels, device, f"score {model.name}", likelihood, score_name)
    reference = ood_reference(model.config.metrics)
    rows = result_rows(scores, family, score_name, reference)
    if args.json:
        version = model_digest(args.checkpoint.read_bytes())[:VERSION_CHARS]
        body: dict[str, Any] = {"model": model.name, "model_version": version, "ood_score": score_name}
        if not family.one_pass:
            body["likelihood"] = likelihood.report()
        body["results"] = rows
        body["inputs"] = names
        print(json.dumps(body, indent=2))
        return
    basis = f"against {reference.split}" if reference else "null: the checkpoint records no reference"
    print(f"{model.name}: ood = {score_name}; ood_p {basis}")
    for name, row in zip(names, rows, strict=True):
        figures = "  ".join(f"{key}={'null' if value is None else f'{value:.6g}'}" for key, value in row.items())
        print(f"{name}  {figures}")


def record_reference(args: argparse.Namespace, model: LoadedModel, device: torch.device) -> None:
    """Score the held-out split and store the sorted OOD scores (metrics.ood) in the checkpoint."""
    family = score_family(model)
    dataset = args.dataset or model.config.data.get("dataset") or "mnist"
    test = load_dataset(dataset, args.data_dir, "test")
    n = args.reference_n or REFERENCE_N["one_pass" if family.one_pass else "cnf"]
    if not 0 < n <= min(MAX_REFERENCE, len(test.images)):
        raise ValueError(f"--reference-n must be 1..{min(MAX_REFERENCE, len(test.images))}, not {n}")
    score_name = args.ood_score or family.default_ood
    start = len(test.images) - n
    images = test.images[start:]  # [n, 1, 28, 28] in [-1, 1]
    low, high = model.data_range
    images = (images + 1) / 2 * (high - low) + low
    likelihood = LikelihoodSettings(args.ode_rtol, args.ode_atol)
    if score_name not in OOD_SCORES or family.name not in OOD_FAMILIES.get(score_name, (family.name,)):
        known = [name for name, families in OOD_FAMILIES.items() if family.name in families]
        raise ValueError(f"--ood-score {score_name}: a {family.name} model gives {family.default_ood} or {known}")
    what = f"reference scores of {model.name}"
    scores = compute_scores([model], images, None, device, what, likelihood, score_name)
    fitted = score_name in FITTED_STATISTICS  # typicality, reconstruction: a Gaussian of the reference's statistics
    fit = GaussianFit.of(fitted_statistics(score_name, scores)) if fitted else None
    try:
        values = OOD_SCORES[score_name](scores, fit)
    except KeyError as error:
        missing = f"--ood-score {score_name} needs {error}"
        raise ValueError(f"{missing}, which a {family.name} model does not give") from error
    finite = values[torch.isfinite(values)]
    record: dict[str, Any] = {
        "score": score_name,
        "reference": [round(value, 5) for value in sorted(finite.tolist())],
        "split": f"{dataset} test images {start}..{len(test.images) - 1} (the last {n}; keep them out of any AUROC)",
        "n": n,
        "not_finite": n - len(finite),
        "label": None,
        "data_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16],
    }
    if not family.one_pass:
        record["likelihood"] = likelihood.report()
    if fit is not None:
        record["fit"] = fit.record() | {"statistics": list(FITTED_STATISTICS[score_name])}
    checkpoint = load_checkpoint(args.checkpoint)
    checkpoint.config.metrics[OOD_METRIC] = record
    save_checkpoint(args.checkpoint, checkpoint)
    quartiles = finite.quantile(torch.tensor([0.05, 0.5, 0.95])).tolist()
    print(
        f"recorded {len(finite)} reference {score_name} scores in {args.checkpoint} (metrics.{OOD_METRIC}); "
        f"5/50/95 %: {', '.join(f'{value:.5g}' for value in quartiles)}",
        file=sys.stderr,
    )
