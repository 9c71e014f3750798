"""`python -m training <command>`: the parser (every command's flags, help and examples) and the dispatch to the
command modules beside it: train/ for the trainers, sample.py, evaluate.py, export.py, zoo.py, set_sampler.py,
fetch_data.py and quality.py (the classifier)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.commands.evaluate import run_evaluate
from training.commands.examples import EPILOGS
from training.commands.export import run_export
from training.commands.fetch_data import CHECKSUMS, FetchError, fetch
from training.commands.flags import (
    TRAINER_CONFIGS,
    HelpFormatter,
    add_dataclass_arguments,
    add_likelihood_arguments,
    config_from,
)
from training.commands.quality import EVALUATED_DATASETS, classifier_path, train_classifier
from training.commands.sample import run_sample
from training.commands.score import add_command as add_score_command
from training.commands.set_sampler import set_sampler
from training.commands.zoo import add_arguments as add_zoo_arguments
from training.commands.zoo import evaluations
from training.commands.zoo import main as zoo_main
from training.models.classifier import CLASSIFIER_ARCHITECTURES
from training.models.iresnet import EVALUATION_SERIES_TERMS
from training.runtime.checkpoint import CheckpointError
from training.runtime.cores import AUTO, parse_threads
from training.runtime.device import SAMPLING_DTYPE_CHOICES, SAMPLING_DTYPE_HELP
from training.train.data import DatasetError
from training.train.ebm_cd import train_ebm
from training.train.flow import train_flow
from training.train.gan import train_gan

TRAINERS: dict[str, Callable[[Any], Path]] = {"ebm": train_ebm, "gan": train_gan, "flow": train_flow}


def _cmd_train(args: argparse.Namespace) -> None:
    TRAINERS[args.command](config_from(args, TRAINER_CONFIGS[args.command]))


THREADS_HELP = "torch CPU threads: a count, or auto: $OMP_NUM_THREADS when set, else the cores idle now (default: auto)"
STEPS_HELP = (
    "EBMs: Langevin steps; GANs with a critic: DDLS steps on the latent, 0 = one plain pass; CNF flows: ODE solver "
    "steps (default: the checkpoint's)"
)


def _add_ebm_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """The EBM sampler settings `sample` and `evaluate` may override for one command."""
    parser.add_argument(
        "--label",
        default=None,
        metavar="K|all",
        help="class-conditional EBMs and CNFs: draw class index K, or 'all' for sample i of class i mod classes "
        "(evaluate then reports label_accuracy)",
    )
    parser.add_argument(
        "--step-size", type=float, default=None, help="EBMs and GAN DDLS: step size (default: the checkpoint's)"
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=None,
        help="EBMs and GAN DDLS: Langevin noise std, 0 = gradient descent (default: the checkpoint's)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="labelled chains: E(x) + w (E(x, y) - E(x)); a CNF's v(x, t) + w (v(x, t, y) - v(x, t)) "
        "(default: the checkpoint's)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="EBMs: a chain stops once its RMS move in a step is below this; --steps is then the most it runs "
        "(0: fixed steps; default: the checkpoint's)",
    )


def _cmd_set_sampler(args: argparse.Namespace) -> None:
    changes, dropped = set_sampler(args.checkpoint, args.settings)
    for name, (old, new) in changes.items():
        print(f"{args.checkpoint}: {name} {old!r} -> {new!r}")
    if not changes:
        print(f"{args.checkpoint}: already declares these settings; unchanged")
    if dropped:
        path = args.checkpoint  # a Path (argparse type)
        again = [
            shlex.join(["python", "-m", "training", "evaluate", *words, "--data-dir", "D"])
            for words in evaluations(path.parent, [path], {path: dropped})
        ]
        print(
            f"dropped the recorded figures {', '.join(dropped)} (measured under the old defaults); measure them "
            f"again with: {'; '.join(again)}",
            file=sys.stderr,
        )


def _cmd_classifier(args: argparse.Namespace) -> None:
    print(
        json.dumps(
            train_classifier(
                args.data_dir,
                args.out or str(classifier_path(args.dataset, args.arch)),
                args.epochs,
                seed=args.seed,
                device_name=args.device,
                max_batches=args.max_batches,
                dataset=args.dataset,
                arch_name=args.arch,
            )
        )
    )


def _cmd_zoo(args: argparse.Namespace) -> None:
    failures = zoo_main(args)
    if failures:
        raise SystemExit(f"zoo: {failures} step(s) failed; see the logs in {args.runs_dir}")


def _cmd_fetch_data(args: argparse.Namespace) -> None:
    directory = fetch(args.dataset, args.dir or f"data/{args.dataset}", args.mirror)
    print(f"{args.dataset} is in {directory}: train with --data-dir {directory} (or export SAMPLEBAY_DATA_DIR)")


def _add_command(commands, name: str, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=help_text, description=description or help_text, epilog=EPILOGS[name], formatter_class=HelpFormatter
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Fetch data; train, sample and evaluate generative models.",
        epilog="python -m training COMMAND --help: the command's flags, defaults and examples",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    trainers = {
        "ebm": (
            "train an energy-based model: contrastive divergence with Langevin negatives, or Equilibrium "
            "Matching (--objective eqm)",
            TRAINER_CONFIGS["ebm"],
            _cmd_train,
        ),
        "gan": (
            "train a GAN: dcgan, wgan (weight clipping) or wgan-gp, with generator EMA",
            TRAINER_CONFIGS["gan"],
            _cmd_train,
        ),
        "flow": (
            "train a normalizing flow: nice, glow (multiscale) or iresnet by maximum likelihood, or a continuous "
            "normalizing flow (cnf) by flow matching",
            TRAINER_CONFIGS["flow"],
            _cmd_train,
        ),
    }
    for name, (description, config_type, handler) in trainers.items():
        trainer = _add_command(commands, name, description)
        add_dataclass_arguments(trainer, config_type)
        trainer.set_defaults(handler=handler)

    sample = _add_command(
        commands,
        "sample",
        "draw samples from a checkpoint into a PNG grid",
        "Draw samples from a checkpoint into a PNG grid; a seed gives the images POST /sample gives for it.\n"
        "It says where the chains started: the checkpoint's prior, the replay buffer saved in the checkpoint,\n"
        "or (--state-dir) the newer buffer a server saved.",
    )
    sample.add_argument("checkpoint", type=Path, nargs="+", help="one checkpoint, or the EBMs of one ensemble")
    sample.add_argument("--n", type=int, default=64, help="samples drawn (the grid's cells)")
    sample.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    sample.add_argument(
        "--init",
        choices=["noise", "buffer"],
        default=None,
        help="EBMs: start from the prior (noise) or the replay buffer (default: the checkpoint's)",
    )
    sample.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="EBMs: start from the replay buffer a server saved in its --state-dir DIR (implies --init buffer; "
        "default: the buffer saved in the checkpoint)",
    )
    _add_ebm_sampler_flags(sample)
    sample.add_argument("--seed", type=int, default=0, help="the same seed gives the same images as POST /sample")
    sample.add_argument(
        "--trajectory",
        type=int,
        default=0,
        metavar="K",
        help="also write every K-th step as an animated GIF next to --out (0: none)",
    )
    sample.add_argument("--out", default="samples.png", help="the PNG grid written")
    sample.add_argument("--device", default="auto", help="auto (cuda when available, else cpu) | cpu | cuda")
    sample.add_argument("--threads", type=parse_threads, default=AUTO, help=THREADS_HELP)
    sample.add_argument("--sampling-dtype", choices=SAMPLING_DTYPE_CHOICES, default="auto", help=SAMPLING_DTYPE_HELP)
    sample.set_defaults(handler=run_sample)

    evaluate = _add_command(
        commands,
        "evaluate",
        "print sample-quality figures as JSON",
        "Print sample-quality figures as JSON: Frechet distance, class coverage, precision/recall in the\n"
        "feature space of the project's classifier of the model's dataset (MNIST or Fashion-MNIST), beside the\n"
        "same figures for real training images, and each again in a second classifier's features.",
    )
    evaluate.add_argument("checkpoint", type=Path, nargs="+", help="one checkpoint, or the EBMs of one ensemble")
    evaluate.add_argument(
        "--data-dir", default=None, help="the model's dataset as IDX files (fetch-data; default: $SAMPLEBAY_DATA_DIR)"
    )
    evaluate.add_argument("--n", type=int, default=2000, help="samples and reference images compared")
    evaluate.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    evaluate.add_argument(
        "--init", choices=["noise", "buffer"], default="noise", help="EBMs: start from the prior or the replay buffer"
    )
    _add_ebm_sampler_flags(evaluate)
    evaluate.add_argument("--batch", type=int, default=500, help="chains sampled at a time")
    evaluate.add_argument(
        "--series-terms",
        type=int,
        default=None,
        metavar="K",
        help="i-ResNet flows: terms of the log-det power series behind test bits/dim (default "
        f"{EVALUATION_SERIES_TERMS}, where the truncation bias is small; the checkpoint's own count is what "
        "training used)",
    )
    add_likelihood_arguments(evaluate)
    evaluate.add_argument(
        "--ood-data",
        default=None,
        metavar="DIR",
        help="IDX files of another dataset: also report the model's OOD score's AUROC, AUPR and FPR95 on its own "
        "test images against these (score --record-reference sets which score; its reference is the test set's end)",
    )
    evaluate.add_argument("--ood-n", type=int, default=1000, help="images of each set behind the OOD figures")
    evaluate.add_argument("--seed", type=int, default=0, help="seeds the chains and the reference subsets")
    evaluate.add_argument(
        "--classifier",
        type=Path,
        default=None,
        help="the feature network (see: classifier; default: the shipped one of the model's dataset)",
    )
    evaluate.add_argument(
        "--second-classifier",
        type=Path,
        default=None,
        help="the feature network that confirms the figures (default: the shipped strided_classifier of the "
        "model's dataset; 'none' skips it)",
    )
    evaluate.add_argument("--device", default="auto", help="auto (cuda when available, else cpu) | cpu | cuda")
    evaluate.add_argument("--threads", type=parse_threads, default=AUTO, help=THREADS_HELP)
    evaluate.add_argument("--sampling-dtype", choices=SAMPLING_DTYPE_CHOICES, default="auto", help=SAMPLING_DTYPE_HELP)
    evaluate.add_argument("--record", action="store_true", help="also store the figures in the checkpoint's metrics")
    evaluate.set_defaults(handler=run_evaluate)

    add_score_command(commands, HelpFormatter)

    export = _add_command(
        commands,
        "export",
        "write a checkpoint as a torch.export program NAME.pt2 with its sidecar NAME.json",
        "Write a checkpoint as a torch.export program (dynamic batch dimension) and the JSON sidecar beside it,\n"
        "the form in which a server serves models trained elsewhere; it samples as the checkpoint does.\n"
        "An energy becomes x -> E(x) (x, y -> E(x, y) when class-conditional), a GAN z -> G(z) with the\n"
        "weights it samples with, a flow z -> (x, log p(x)) with NAME.forward.pt2, x -> (z, log det), beside\n"
        "it (scores and test bits/dim of data), a CNF its velocity field v(x, t) (v(x, t, y) when\n"
        "class-conditional). The i-ResNet's iterative inverse cannot be traced.",
    )
    export.add_argument("checkpoint", type=Path, help="the .safetensors checkpoint to export (an ebm, gan or flow)")
    export.add_argument(
        "--out", type=Path, required=True, help="the program written, NAME.pt2; the sidecar NAME.json goes beside it"
    )
    export.set_defaults(handler=run_export)

    classifier = _add_command(commands, "classifier", "train a classifier whose features evaluate uses")
    classifier.add_argument(
        "--data-dir", default=None, help="the dataset's IDX files (fetch-data; default: $SAMPLEBAY_DATA_DIR)"
    )
    classifier.add_argument(
        "--dataset", choices=EVALUATED_DATASETS, default="mnist", help="the images and labels it learns"
    )
    classifier.add_argument(
        "--arch", choices=list(CLASSIFIER_ARCHITECTURES), default="digit_classifier", help="its network"
    )
    classifier.add_argument(
        "--out", default=None, help="the checkpoint written (default: the shipped one of --dataset and --arch)"
    )
    classifier.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    classifier.add_argument("--seed", type=int, default=0, help="seeds initialization and batch order")
    classifier.add_argument("--max-batches", type=int, default=None, help="at most this many batches per epoch")
    classifier.add_argument("--device", default="auto", help="auto (cuda when available, else cpu) | cpu | cuda")
    classifier.set_defaults(handler=_cmd_classifier)

    zoo = _add_command(
        commands,
        "zoo",
        "train or continue every shipped model in resumable chunks (--resume, else --init-from), then --ship",
        "Rebuild each shipped checkpoint's training command with its output under --runs-dir;\n"
        "continue its run there (--resume) or warm-start from the shipped file (--init-from: weights,\n"
        "EMA, critic, replay buffer); each run stops at an epoch end within --stop-after-minutes.\n"
        "--ship brings finished runs back as float16, records evaluate figures, prints the models table.",
    )
    add_zoo_arguments(zoo)
    zoo.set_defaults(handler=_cmd_zoo)

    set_sampler = _add_command(
        commands,
        "set-sampler",
        "change the sampler defaults a checkpoint declares (after a sweep), without retraining",
        "Write new defaults into the checkpoint's sampler settings: what POST /sample, sample and evaluate use for\n"
        "a field they leave out (a GAN's DDLS steps, step_size, noise; any family's temperature; an EBM's\n"
        "Langevin settings). The values are checked as training's are; settings fixed by training (latent_dim,\n"
        "prior, ...) are refused. Figures evaluate --record stored under the old defaults are kept only where\n"
        "they still describe the same sampling (a GAN's are re-keyed by their steps); the rest are dropped and\n"
        "named, to be measured again. A running server picks the change up on its next start; the file is a new\n"
        "checkpoint to it, so an EBM's replay buffer it saved starts afresh.",
    )
    set_sampler.add_argument("checkpoint", type=Path, help="the .safetensors checkpoint changed in place")
    set_sampler.add_argument(
        "settings", nargs="+", metavar="FIELD=VALUE", help="the new defaults (none for None, true/false for flags)"
    )
    set_sampler.set_defaults(handler=_cmd_set_sampler)

    fetch_data = _add_command(
        commands,
        "fetch-data",
        "download MNIST or Fashion-MNIST (the four IDX .gz files) and verify their checksums",
        "Download the four official IDX .gz files of MNIST or Fashion-MNIST from the dataset's usual mirrors\n"
        "(or --mirror) and check each against the checksum written in training/commands/fetch_data.py.\n"
        "A file that fails is deleted and the command exits non-zero; files already there and verified are skipped.\n"
        "Standard library only: urllib honours http_proxy and https_proxy.",
    )
    fetch_data.add_argument("dataset", choices=sorted(CHECKSUMS), help="the dataset to download")
    fetch_data.add_argument(
        "--dir", default=None, metavar="D", help="where the files go (default: data/DATASET; train with --data-dir D)"
    )
    fetch_data.add_argument(
        "--mirror",
        default=None,
        metavar="URL",
        help="a directory URL holding the four .gz files, tried instead of the usual mirrors (http, https, file)",
    )
    fetch_data.set_defaults(handler=_cmd_fetch_data)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (DatasetError, CheckpointError, FetchError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
