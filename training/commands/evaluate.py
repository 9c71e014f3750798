"""`python -m training evaluate`: sample-quality figures as JSON (training/commands/quality.py computes them),
a flow's test bits/dim (a CNF's by an adaptive ODE solve, training/sampling/likelihood.py), and with --record
the figures stored in the checkpoints' metrics."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, cast

import torch

from training.commands.ood_figures import ood_against
from training.commands.quality import (
    EVALUATED_DATASETS,
    SECOND_ARCH,
    classifier_path,
    load_classifier,
    quality_figures,
    real_data_floor,
)
from training.commands.record_key import overrides_suffix
from training.commands.sample import draw_with_progress, labels_for
from training.families import Family, family_of
from training.models.flows import Flow
from training.models.iresnet import EVALUATION_SERIES_TERMS, InverseConvergence, IResNet
from training.runtime.checkpoint import load_checkpoint, save_checkpoint
from training.runtime.device import dtype_name, pick_device, sampling_dtype, use_threads
from training.runtime.draw import chain_labels
from training.runtime.load import load_model
from training.runtime.loaded import LoadedModel
from training.sampling.likelihood import DEFAULT_ATOL, DEFAULT_PROBES, DEFAULT_RTOL, cnf_bits_per_dim
from training.sampling.noise import chain_seeds
from training.sampling.sampler_config import FlowSampler
from training.sampling.scoring import one_pass_scores, score_family
from training.train.data import load_dataset
from training.train.flow import dataset_bits_per_dim
from training.train.progress import progress

LIKELIHOOD_IMAGES = 200  # a CNF's test images behind bits/dim: ~8 minutes on one core at ~2.4 s an image
LIKELIHOOD_FLAGS = {"ode_rtol": "--ode-rtol", "ode_atol": "--ode-atol", "probes": "--probes"}
LIKELIHOOD_FLAGS |= {"exact_trace": "--exact-trace", "likelihood_n": "--likelihood-n"}


def _log_det(model: LoadedModel, family: Family, none: str) -> str:
    """How a refusal of a log-det flag describes the model: a flow whose log-det is exact, or `none` said of
    another family."""
    if family.exact_log_det:
        return f"{model.config.arch.get('name')} flow, whose log-det is exact"
    return f"{model.config.family}{none}"


def check_likelihood_flags(args: argparse.Namespace, model: LoadedModel, family: Family) -> None:
    """Refuse, before any sampling, likelihood flags that would be ignored: given for a model without an ODE,
    or Hutchinson's probes beside the exact trace that replaces them."""
    given = [flag for name, flag in LIKELIHOOD_FLAGS.items() if getattr(args, name) is not None]
    if given and family.test_likelihood(model) != "ode":
        what = _log_det(model, family, " model, which has no likelihood here")
        what = f"a {what}" if family.exact_log_det else what
        raise ValueError(f"{', '.join(given)} set a CNF's likelihood solve; {model.name} is {what}")
    if args.exact_trace and args.probes is not None:
        raise ValueError("--probes sets Hutchinson's estimate and --exact-trace replaces it: give one of them")


def cnf_test_likelihood(
    model: LoadedModel, images: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """A CNF's bits/dim of `images` (log p(x), the null label) by dopri5 at the asked tolerances, with its
    standard error over images, the solver, its NFE and the trace estimator: what evaluate prints and records."""
    rtol = DEFAULT_RTOL if args.ode_rtol is None else args.ode_rtol
    atol = DEFAULT_ATOL if args.ode_atol is None else args.ode_atol
    probes = 0 if args.exact_trace else DEFAULT_PROBES if args.probes is None else args.probes
    trace = "the exact trace" if probes == 0 else f"Hutchinson's trace, {probes} Rademacher probe(s) an image"
    print(
        f"evaluate {model.name}: test bits/dim of {len(images)} test images by dopri5 (rtol {rtol}, atol {atol}), "
        f"{trace}",
        file=sys.stderr,
    )
    bar = progress(None, len(images), f"evaluate {model.name}: likelihood", unit="image")
    field = cast(torch.nn.Module, model.module)
    figure = cnf_bits_per_dim(
        field, images, None, rtol, atol, probes, seed=args.seed, on_batch=bar.update, data_range=model.data_range
    )
    bar.close()
    report = figure.report()
    print(
        f"evaluate {model.name}: test bits/dim {report['bits_per_dim']} +- {report['standard_error']} (standard "
        f"error over {report['n']} images), {report['nfe_mean']} field evaluations an image by dopri5",
        file=sys.stderr,
    )
    return report


def variational_test_bits(model: LoadedModel, images: torch.Tensor, device: torch.device, batch: int = 500) -> float:
    """Mean bits/dim of test images [N, *shape] (in [-1, 1], as datasets load) under a variationally dequantized
    flow: each image's variational bound as POST /score gives it (its dequantizer's noise seeded by its pixels)."""
    low, high = model.data_range
    family = score_family(model)
    bits = [
        one_pass_scores(family, [model], ((chunk + 1) / 2 * (high - low) + low).to(device), None)["bits_per_dim"]
        for chunk in images.split(batch)
    ]
    return torch.cat(bits).double().mean().item()


def run_evaluate(args: argparse.Namespace) -> None:
    print(use_threads(args.threads), file=sys.stderr, flush=True)
    device = pick_device(args.device)
    members = [load_model(path, device) for path in args.checkpoint]
    model = members[0]
    family = family_of(model)
    stated = model.config.data.get("dataset")
    dataset = stated if stated in EVALUATED_DATASETS else "mnist"  # a model from elsewhere: compared with MNIST
    if model.shape != (1, 28, 28):  # before any data is read: the refusal is the answer
        made = "x".join(str(side) for side in model.shape)
        raise SystemExit(
            f"evaluate: its figures are features of the project's {dataset} classifiers: each reads 1x28x28 "
            f"images; {model.name} makes {made} images (dataset {stated or 'unknown'}), so evaluate has no figures "
            "for it"
        )
    if args.series_terms is not None and model.config.arch.get("name") != "iresnet":  # before any sampling
        why = _log_det(model, family, ", which has no log-det")
        raise ValueError(f"--series-terms sets the i-ResNet's log-det power series; {model.name} is a {why}")
    check_likelihood_flags(args, model, family)
    classifier = load_classifier(args.classifier or classifier_path(dataset), device)
    second_path = args.second_classifier or classifier_path(dataset, SECOND_ARCH)
    second = None if str(second_path) == "none" else load_classifier(second_path, device)
    test = load_dataset(dataset, args.data_dir, "test")
    train = load_dataset(dataset, args.data_dir, "train")
    generator = torch.Generator().manual_seed(args.seed)
    defaults = model.sampler
    family.override_sampler(members, args)
    seeds = chain_seeds(args.seed, args.n)
    # The labels chains are drawn with (asked for, or each chain's seeded class): label accuracy is reported.
    asked, seeded = family.evaluates_labels(args.init)
    labels = labels_for(args.label, args.n, model) if asked else None
    if seeded:
        labels = chain_labels(model, seeds, labels)
    description = f"evaluate {model.name}: {args.n} samples"
    stops = family.chain_tolerance(model)
    chain_steps = torch.zeros(args.n, dtype=torch.int64) if stops else None  # what each stopped chain ran
    samples = draw_with_progress(
        members, seeds, args, generator, labels, args.batch, description, args.init, chain_steps=chain_steps
    )
    print(f"evaluate {model.name}: classifier features, Frechet distance, precision/recall", file=sys.stderr)
    sampler_report = family.sampler_report(model, args, chain_steps)
    # A random test subset (the first MNIST test images are the easier half), the same for every model.
    test_order = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(args.seed + 1))
    reference = test.images[test_order[: args.n]]
    if family.chain_steps(model, args.steps):
        sampler_report["sampling_dtype"] = dtype_name(sampling_dtype(args.sampling_dtype, device))
    model_figures: dict[str, Any] = quality_figures(classifier, reference, samples, labels).report()
    floor = real_data_floor(classifier, reference, train.images, args.n, torch.Generator().manual_seed(args.seed + 2))
    report = {
        "checkpoints": [str(path) for path in args.checkpoint],
        "family": model.config.family,
        "dataset": dataset,
        "sampler": sampler_report,
        "model": model_figures,
        "real_data_floor": floor,
    }
    if second is not None:  # the same samples, reference and floor images in an independent network's features
        confirmed = quality_figures(second, reference, samples, labels).report()
        second_floor = real_data_floor(
            second, reference, train.images, args.n, torch.Generator().manual_seed(args.seed + 2)
        )
        report["second_classifier"] = {"model": confirmed, "real_data_floor": second_floor}
        model_figures["second_classifier"] = {
            key: confirmed[key]
            for key in ("frechet_distance", "precision", "recall", "label_accuracy")
            if key in confirmed
        } | {"floor_frechet_distance": second_floor["frechet_distance"]}
    likelihood_kind = family.test_likelihood(model)
    if family.likelihood and not likelihood_kind:  # an exported flow without its data-to-noise program
        print(
            f"evaluate {model.name}: no test bits/dim: the exported flow has no {model.name}.forward.pt2 (x -> (z, log "
            "det)) beside its program",
            file=sys.stderr,
        )
    if likelihood_kind:
        flow = cast(Flow, model.module)  # nice, glow or iresnet: Flows; a CNF's field is not one
        if likelihood_kind == "ode":
            likelihood_n = LIKELIHOOD_IMAGES if args.likelihood_n is None else args.likelihood_n
            if likelihood_n:  # the subset starts with the reference images, the same for every model
                likelihood = cnf_test_likelihood(model, test.images[test_order[:likelihood_n]], args, device)
                model_figures["test_bits_per_dim"] = likelihood.pop("bits_per_dim")
                model_figures["likelihood"] = likelihood  # its standard error, solver, NFE and trace estimator
            else:
                print(f"evaluate {model.name}: no test bits/dim (--likelihood-n 0)", file=sys.stderr)
        elif isinstance(flow, IResNet):
            # The fixed-point inverse of every sample drawn above, rerun on the same base points and batches (the
            # same computation, without the log-det) to see which samples met the tolerance within the cap.
            print(f"evaluate {model.name}: inverse convergence of the {args.n} samples", file=sys.stderr)
            temperature = model.sampler_as(FlowSampler).temperature
            sampler_report["temperature"] = temperature
            inverses = [
                flow.invert(flow.base_sample(chunk, temperature).to(device))[1]
                for chunk in torch.split(seeds, args.batch)
            ]
            inverse_report = InverseConvergence.concatenate(inverses).report()
            report["inverse"] = inverse_report
            model_figures["inverse_not_converged"] = inverse_report["not_converged"]
            if inverse_report["not_converged"]:
                print(
                    f"evaluate {model.name}: WARNING: the fixed-point inverse of {inverse_report['not_converged']} of "
                    f"{args.n} samples did not reach tolerance {inverse_report['tolerance']} within "
                    f"{inverse_report['max_iterations']} iterations (largest final residual "
                    f"{inverse_report['max_residual']}); their indices start {inverse_report['not_converged_samples']}",
                    file=sys.stderr,
                )
            model_figures["series_terms_trained"] = flow.series_terms
            flow.series_terms = EVALUATION_SERIES_TERMS if args.series_terms is None else args.series_terms
            model_figures["series_terms"] = flow.series_terms
        if likelihood_kind == "exact":
            print(f"evaluate {model.name}: test bits/dim of all {len(test.images)} test images", file=sys.stderr)
            if model.variational:
                figure = variational_test_bits(model, test.images, device)
                model_figures["test_bits_per_dim_estimator"] = (
                    f"variational bound, {model.dequantization_samples} draw(s) of q(u | x) an image (an upper bound)"
                )
            else:
                figure = dataset_bits_per_dim(
                    flow, test, 500, device, seed=args.seed, data_range=model.data_range, uniform=model.dequantized
                )
            model_figures["test_bits_per_dim"] = round(figure, 4)
    if args.ood_data is not None:  # the OOD score, an ensemble's as served: its test images against another set's
        print(f"evaluate {model.name}: OOD figures against {args.ood_data}", file=sys.stderr)
        model_figures["ood"] = report["ood"] = ood_against(members, test.images, args.ood_data, args.ood_n, device)
    print(json.dumps(report, indent=2))
    if args.record:
        # An ensemble's figures go into every member, under a key of their own.
        key = f"evaluate_ensemble_{args.init}" if len(members) > 1 else family.evaluate_key(args.init)
        if args.label is not None:
            key += f"_label_{args.label}"
        key += overrides_suffix(args, defaults)
        key = family.record_key(key, model, args, sampler_report)  # its steps or guidance, where not the defaults
        for path in args.checkpoint:
            checkpoint = load_checkpoint(path)
            checkpoint.config.metrics[key] = {
                **model_figures,
                **sampler_report,
                "floor_frechet_distance": floor["frechet_distance"],
            }
            save_checkpoint(path, checkpoint)
            print(f"recorded the figures in {path} (metrics.{key})", file=sys.stderr)
