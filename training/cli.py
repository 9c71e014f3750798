"""`python -m training <command>`: argparse -> config dataclasses -> train / sample / evaluate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, cast

import torch

from training.checkpoint import CheckpointError
from training.data import DatasetError


def _add_dataclass_arguments(parser: argparse.ArgumentParser, config_type: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field, so the dataclass stays the single list of options and defaults."""
    for item in dataclasses.fields(config_type):
        if item.name in skip:
            continue
        flag = "--" + item.name.replace("_", "-")
        default = item.default
        kind = str(item.type)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif "int" in kind and "float" not in kind:
            parser.add_argument(flag, type=int, default=default)
        elif "float" in kind:
            parser.add_argument(flag, type=float, default=default)
        else:
            parser.add_argument(flag, type=str, default=default)


def _config_from(args: argparse.Namespace, config_type: type):
    names = {item.name for item in dataclasses.fields(config_type)}
    return config_type(**{key: value for key, value in vars(args).items() if key in names})


def _cmd_ebm(args: argparse.Namespace) -> None:
    from training.train_ebm import EBMTrainConfig, train_ebm

    train_ebm(_config_from(args, EBMTrainConfig))


def _cmd_gan(args: argparse.Namespace) -> None:
    from training.train_gan import GANTrainConfig, train_gan

    train_gan(_config_from(args, GANTrainConfig))


def _cmd_flow(args: argparse.Namespace) -> None:
    from training.train_flow import FlowTrainConfig, train_flow

    train_flow(_config_from(args, FlowTrainConfig))


def _labels(spec: str | None, n: int, model) -> torch.Tensor | None:
    """--label K: every sample of class K; --label all: sample i of class i mod (number of classes)."""
    if spec is None:
        return None
    if spec == "all":
        if model.classes is None:
            raise ValueError(f"{model.name} is not class-conditional; it takes no label")
        return torch.arange(n) % len(model.classes)
    try:
        return torch.full((n,), int(spec), dtype=torch.int64)
    except ValueError as error:
        raise ValueError(f"--label must be a class index or 'all', not {spec!r}") from error


def _add_ebm_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """The EBM sampler settings `sample` and `evaluate` may override for one command."""
    parser.add_argument(
        "--label",
        default=None,
        metavar="K|all",
        help="class-conditional EBMs: draw class index K, or 'all' for sample i of class i mod classes "
        "(evaluate then reports label_accuracy)",
    )
    parser.add_argument("--step-size", type=float, default=None, help="EBMs: step size (default: the checkpoint's)")
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="labelled chains: E(x) + w (E(x, y) - E(x)) (default: the checkpoint's)",
    )


def _override_sampler(members: list, step_size: float | None, guidance: float | None) -> None:
    """--step-size and --guidance replace the checkpoints' own for this command only."""
    from training.sampler_config import EBMSampler

    changes = {key: value for key, value in (("step_size", step_size), ("guidance", guidance)) if value is not None}
    for member in members if changes else []:
        member.sampler = dataclasses.replace(member.sampler_as(EBMSampler), **changes)


def _cmd_sample(args: argparse.Namespace) -> None:
    from training.device import pick_device
    from training.images import gif_bytes, grid, save_grid
    from training.noise import chain_seeds
    from training.sampling import draw_samples, load_model

    device = pick_device(args.device)
    members = [load_model(path, device) for path in args.checkpoint]
    model = members[0]
    generator = torch.Generator().manual_seed(args.seed)  # buffer slots, as the server draws them
    frames = []

    def keep_frame(step: int, x: torch.Tensor, energy: torch.Tensor) -> None:
        if args.trajectory and step % args.trajectory == 0:
            frames.append(grid(x, model.data_range))

    seeds = chain_seeds(args.seed, args.n)
    _override_sampler(members, args.step_size, args.guidance)
    labels = _labels(args.label, args.n, model)
    samples = draw_samples(
        members, seeds, args.steps, args.init, generator, keep_frame if args.trajectory else None, labels
    )
    save_grid(samples, args.out, model.data_range)
    print(f"wrote {args.out} ({args.n} {model.config.family} samples)")
    if frames:
        trajectory_path = Path(args.out).with_suffix(".gif")
        trajectory_path.write_bytes(gif_bytes(frames))
        print(f"wrote {trajectory_path} ({len(frames)} frames, every {args.trajectory} steps)")


def _cmd_evaluate(args: argparse.Namespace) -> None:

    from training.data import load_dataset
    from training.device import pick_device
    from training.evaluate import load_classifier, quality_figures, real_data_floor
    from training.noise import chain_seeds
    from training.sampler_config import EBMSampler
    from training.sampling import chain_labels, draw_samples, load_model

    device = pick_device(args.device)
    classifier = load_classifier(args.classifier, device)
    test = load_dataset("mnist", args.data_dir, "test")
    train = load_dataset("mnist", args.data_dir, "train")
    generator = torch.Generator().manual_seed(args.seed)
    members = [load_model(path, device) for path in args.checkpoint]
    model = members[0]
    if model.shape != (1, 28, 28):
        raise SystemExit(f"evaluate: the classifier reads 1x28x28 images; {model.name} makes {list(model.shape)}")
    _override_sampler(members, args.step_size, args.guidance)
    seeds = chain_seeds(args.seed, args.n)
    # The labels chains are drawn with (asked for, or each chain's seeded class): label accuracy is reported.
    labels = chain_labels(model, seeds, _labels(args.label, args.n, model)) if model.config.family == "ebm" else None
    samples = torch.cat(
        [
            draw_samples(
                members,
                seeds[start : start + args.batch],
                args.steps,
                args.init,
                generator,
                labels=None if labels is None else labels[start : start + args.batch],
            ).cpu()
            for start in range(0, args.n, args.batch)
        ]
    )
    steps = args.steps or (model.sampler.steps if isinstance(model.sampler, EBMSampler) else None)
    ebm_sampler_report: dict[str, Any] = {"init": args.init, "steps": steps, "n": args.n}
    if isinstance(model.sampler, EBMSampler):
        ebm_sampler_report.update(step_size=model.sampler.step_size, noise=model.sampler.noise)
        if model.classes is not None:
            ebm_sampler_report["guidance"] = model.sampler.guidance
    if args.label is not None:
        ebm_sampler_report["label"] = args.label
    # A random test subset (the first MNIST test images are the easier half), the same for every model.
    reference = test.images[
        torch.randperm(len(test.images), generator=torch.Generator().manual_seed(args.seed + 1))[: args.n]
    ]
    sampler_report = ebm_sampler_report if model.config.family == "ebm" else {"n": args.n}
    model_figures = quality_figures(classifier, reference, samples, labels).report()
    floor = real_data_floor(classifier, reference, train.images, args.n, torch.Generator().manual_seed(args.seed + 2))
    report = {
        "checkpoints": [str(path) for path in args.checkpoint],
        "family": model.config.family,
        "sampler": sampler_report,
        "model": model_figures,
        "real_data_floor": floor,
    }
    if model.config.family == "flow":
        from training.models.flows import Flow
        from training.train_flow import dataset_bits_per_dim

        flow = cast(Flow, model.module)  # a flow checkpoint's arch is nice, glow or iresnet: all Flows
        model_figures["test_bits_per_dim"] = round(dataset_bits_per_dim(flow, test, 500, device, seed=args.seed), 4)
    print(json.dumps(report, indent=2))
    if args.record:
        from training.checkpoint import load_checkpoint, save_checkpoint

        key = "evaluate" if model.config.family != "ebm" else f"evaluate_{args.init}"
        if args.label is not None:
            key += f"_label_{args.label}"
        if len(members) > 1:
            key = f"evaluate_ensemble_{args.init}"  # the same figures go into every member
        for path in args.checkpoint:
            checkpoint = load_checkpoint(path)
            checkpoint.config.metrics[key] = {
                **model_figures,
                **sampler_report,
                "floor_frechet_distance": floor["frechet_distance"],
            }
            save_checkpoint(path, checkpoint)
            print(f"recorded the figures in {path} (metrics.{key})", file=sys.stderr)


def _cmd_classifier(args: argparse.Namespace) -> None:
    from training.evaluate import train_classifier

    print(
        json.dumps(
            train_classifier(
                args.data_dir,
                args.out,
                args.epochs,
                seed=args.seed,
                device_name=args.device,
                max_batches=args.max_batches,
            )
        )
    )


def _cmd_zoo(args: argparse.Namespace) -> None:
    from training.zoo import main as zoo_main

    failures = zoo_main(args)
    if failures:
        raise SystemExit(f"zoo: {failures} step(s) failed; see the logs in {args.runs_dir}")


class _ExampleHelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag, and an epilog printed as written."""


ZOO_EPILOG = """examples:
  python -m training zoo --dry-run                                   # what each model's next chunk runs
  python -m training zoo --jobs 2 --data-dir ../shared/data/mnist    # a chunk of every model, two at a time
  python -m training zoo --preset cuda --only dcgan_mnist --ship     # a lent GPU: one model per command
  bash scripts/train_zoo.sh --only glow_mnist,nice_mnist             # the same as python -m training zoo
"""


def build_parser() -> argparse.ArgumentParser:
    from training.evaluate import DEFAULT_CLASSIFIER
    from training.train_ebm import EBMTrainConfig
    from training.train_flow import FlowTrainConfig
    from training.train_gan import GANTrainConfig

    parser = argparse.ArgumentParser(
        prog="python -m training", description="Train, sample and evaluate generative models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    trainers = {
        "ebm": ("train an energy-based model (contrastive divergence + Langevin)", EBMTrainConfig, _cmd_ebm),
        "gan": ("train a GAN: dcgan, wgan (weight clipping) or wgan-gp, with generator EMA", GANTrainConfig, _cmd_gan),
        "flow": (
            "train a normalizing flow by maximum likelihood: nice, glow (multiscale) or iresnet",
            FlowTrainConfig,
            _cmd_flow,
        ),
    }
    for name, (description, config_type, handler) in trainers.items():
        trainer = commands.add_parser(name, help=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _add_dataclass_arguments(trainer, config_type)
        trainer.set_defaults(handler=handler)

    sample = commands.add_parser(
        "sample",
        help="draw samples from a checkpoint into a PNG grid",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sample.add_argument("checkpoint", type=Path, nargs="+", help="one checkpoint, or the EBMs of one ensemble")
    sample.add_argument("--n", type=int, default=64)
    sample.add_argument("--steps", type=int, default=None, help="Langevin steps (default: the checkpoint's)")
    sample.add_argument("--init", choices=["noise", "buffer"], default=None, help="EBMs (default: the checkpoint's)")
    _add_ebm_sampler_flags(sample)
    sample.add_argument("--seed", type=int, default=0, help="the same seed gives the same images as POST /sample")
    sample.add_argument(
        "--trajectory",
        type=int,
        default=0,
        metavar="K",
        help="also write every K-th step as an animated GIF next to --out",
    )
    sample.add_argument("--out", default="samples.png")
    sample.add_argument("--device", default="auto")
    sample.set_defaults(handler=_cmd_sample)

    evaluate = commands.add_parser(
        "evaluate", help="print sample-quality figures as JSON", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    evaluate.add_argument("checkpoint", type=Path, nargs="+", help="one checkpoint, or the EBMs of one ensemble")
    evaluate.add_argument("--data-dir", default=None)
    evaluate.add_argument("--n", type=int, default=2000, help="samples and reference images compared")
    evaluate.add_argument("--steps", type=int, default=None)
    evaluate.add_argument("--init", choices=["noise", "buffer"], default="noise")
    _add_ebm_sampler_flags(evaluate)
    evaluate.add_argument("--batch", type=int, default=500)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--record", action="store_true", help="also store the figures in the checkpoint's metrics")
    evaluate.set_defaults(handler=_cmd_evaluate)

    classifier = commands.add_parser(
        "classifier",
        help="train the MNIST classifier used by evaluate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    classifier.add_argument("--data-dir", default=None)
    classifier.add_argument("--out", default=str(DEFAULT_CLASSIFIER))
    classifier.add_argument("--epochs", type=int, default=3)
    classifier.add_argument("--seed", type=int, default=0)
    classifier.add_argument("--max-batches", type=int, default=None)
    classifier.add_argument("--device", default="auto")
    classifier.set_defaults(handler=_cmd_classifier)

    from training.zoo import add_arguments as add_zoo_arguments

    zoo = commands.add_parser(
        "zoo",
        help="train or continue every shipped model in resumable chunks (--resume, else --init-from), then --ship",
        description="Rebuild each shipped checkpoint's training command with its output under --runs-dir;\n"
        "continue its run there (--resume) or warm-start from the shipped file (--init-from: weights,\n"
        "EMA, critic, replay buffer); each run stops at an epoch end within --stop-after-minutes.\n"
        "--ship brings finished runs back as float16, records evaluate figures, prints the models table.",
        epilog=ZOO_EPILOG,
        formatter_class=_ExampleHelpFormatter,
    )
    add_zoo_arguments(zoo)
    zoo.set_defaults(handler=_cmd_zoo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (DatasetError, CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
