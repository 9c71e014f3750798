"""`python -m training <command>`: argparse -> config dataclasses -> train / sample / evaluate."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import json
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Any, cast

import torch

from training.runtime.checkpoint import CheckpointError
from training.train.data import DatasetError


@functools.cache
def field_comments(config_type: type) -> dict[str, str]:
    """Each field's end-of-line comment in the source of its config dataclass (a subclass's own comment over
    its base's): the comments that document the defaults are also the flags' help."""
    comments: dict[str, str] = {}
    for klass in reversed(config_type.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        field_on_line: dict[int, str] = {}
        previous = None
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.OP and token.string == ":" and previous is not None:
                if previous.type == tokenize.NAME and previous.start[1] == 4:  # `name:` in the class body
                    field_on_line[previous.start[0]] = previous.string
            elif token.type == tokenize.COMMENT and token.start[0] in field_on_line:
                comments[field_on_line[token.start[0]]] = token.string.lstrip("#").strip()
            if token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                previous = token
    return comments


def _add_dataclass_arguments(parser: argparse.ArgumentParser, config_type: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field, so the dataclass stays the single list of options, defaults and their help
    (each field's comment)."""
    comments = field_comments(config_type)
    for item in dataclasses.fields(config_type):
        if item.name in skip:
            continue
        flag = "--" + item.name.replace("_", "-")
        default = item.default
        kind = str(item.type)
        text = comments.get(item.name, "").replace("%", "%%")
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif "int" in kind and "float" not in kind:
            parser.add_argument(flag, type=int, default=default, help=text)
        elif "float" in kind:
            parser.add_argument(flag, type=float, default=default, help=text)
        else:
            parser.add_argument(flag, type=str, default=default, help=text)


def _config_from(args: argparse.Namespace, config_type: type):
    names = {item.name for item in dataclasses.fields(config_type)}
    return config_type(**{key: value for key, value in vars(args).items() if key in names})


def _cmd_ebm(args: argparse.Namespace) -> None:
    from training.train.ebm_cd import EBMTrainConfig, train_ebm

    train_ebm(_config_from(args, EBMTrainConfig))


def _cmd_gan(args: argparse.Namespace) -> None:
    from training.train.gan import GANTrainConfig, train_gan

    train_gan(_config_from(args, GANTrainConfig))


def _cmd_flow(args: argparse.Namespace) -> None:
    from training.train.flow import FlowTrainConfig, train_flow

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


def _override_sampler(members: list, args: argparse.Namespace) -> None:
    """--step-size, --noise and --guidance (EBMs; a CNF takes --guidance) replace the checkpoints' own for this
    command only."""
    from training.sampling.sampler_config import EBMSampler, FlowSampler, GANSampler

    if members[0].config.family == "flow":
        if args.step_size is not None or args.noise is not None:
            raise ValueError("--step-size and --noise apply to EBMs and GAN DDLS; a flow takes --steps (a CNF's ODE)")
        sampler = members[0].sampler_as(FlowSampler)
        if args.guidance is not None:
            if sampler.solver is None:
                raise ValueError(f"--guidance applies to conditional EBMs and CNFs; {members[0].name} is neither")
            members[0].sampler = dataclasses.replace(sampler, guidance=args.guidance)
        return
    gan = members[0].config.family == "gan"
    if gan and args.guidance is not None:
        raise ValueError("--guidance applies to class-conditional EBMs; a GAN takes --steps, --step-size, --noise")
    changes = {key: getattr(args, key) for key in ("step_size", "noise", "guidance") if getattr(args, key) is not None}
    for member in members if changes else []:
        member.sampler = dataclasses.replace(member.sampler_as(GANSampler if gan else EBMSampler), **changes)


def _draw_with_progress(
    members: list,
    seeds: torch.Tensor,
    args: argparse.Namespace,
    generator: torch.Generator,
    labels: torch.Tensor | None,
    batch: int,
    description: str,
    init: str | None = None,
    buffer=None,
    on_step=None,
) -> torch.Tensor:
    """Samples [N, *shape] drawn `batch` chains at a time (on the CPU), with progress on stderr: a bar on a
    terminal, plain lines when piped. EBMs count Langevin steps, GANs and flows batches."""
    from training.runtime.draw import default_latent_steps, draw_samples
    from training.sampling.sampler_config import EBMSampler, FlowSampler, GANSampler
    from training.train.run import progress

    model = members[0]
    starts = range(0, len(seeds), batch)
    sampler = model.sampler
    steps_per_chain = 0
    if isinstance(sampler, EBMSampler):
        steps_per_chain = sampler.steps if args.steps is None else args.steps
    elif isinstance(sampler, GANSampler):  # DDLS steps (0 without a critic)
        steps_per_chain = default_latent_steps(model) if args.steps is None else args.steps
    elif isinstance(sampler, FlowSampler) and sampler.steps is not None:  # a CNF's ODE solver steps
        steps_per_chain = sampler.steps if args.steps is None else args.steps
    bar = progress(None, len(starts) * max(steps_per_chain, 1), description, unit="step" if steps_per_chain else "it")

    def step_done(step: int, x: torch.Tensor, energy: torch.Tensor) -> None:
        bar.update(1)
        if on_step is not None:
            on_step(step, x, energy)

    parts = []
    with bar:
        for start in starts:
            chunk = slice(start, start + batch)
            parts.append(
                draw_samples(
                    members,
                    seeds[chunk],
                    args.steps,
                    init,
                    generator,
                    step_done if steps_per_chain else None,
                    None if labels is None else labels[chunk],
                    buffer,
                ).cpu()
            )
            if not steps_per_chain:
                bar.update(1)
    return torch.cat(parts)


def _start_description(members: list, init: str | None, buffer, buffer_path: Path | None) -> str:
    """Where the chains (or latents) started, said on every `sample`: the CLI and a running server start from
    the same prior, but a server's replay buffer has moved on from the one saved in the checkpoint."""
    from training.runtime.draw import pooled_buffer
    from training.sampling.sampler_config import EBMSampler, FlowSampler

    model = members[0]
    sampler = model.sampler
    if isinstance(sampler, FlowSampler) and sampler.solver is not None:
        return (
            f"Gaussian noise (std {sampler.temperature:g}), the CNF's prior, then {sampler.solver} ODE steps "
            f"(guidance {sampler.guidance:g} on labelled chains)"
        )
    if not isinstance(sampler, EBMSampler):
        source = "Gaussian latents" if model.config.family == "gan" else "the flow's base distribution"
        return f"{source} at temperature {sampler.temperature:g}"
    if (init or sampler.init) == "noise":
        prior = "uniform noise" if sampler.prior == "uniform" else f"Gaussian noise (std {sampler.prior_std:g})"
        return f"{prior}, the checkpoint's prior (--init noise)"
    if buffer_path is not None:
        return f"the server's replay buffer {buffer_path} ({len(buffer)} samples)"
    return (
        f"the replay buffer saved in the checkpoint ({len(pooled_buffer(members))} samples); a server that has "
        "been sampling starts from its own, newer one: --state-dir DIR uses what it saved"
    )


def _cmd_sample(args: argparse.Namespace) -> None:
    from training.runtime.device import pick_device
    from training.runtime.draw import load_model, load_server_buffer
    from training.runtime.images import gif_bytes, grid, save_grid
    from training.sampling.noise import chain_seeds

    device = pick_device(args.device)
    members = [load_model(path, device) for path in args.checkpoint]
    model = members[0]
    init, buffer, buffer_path = args.init, None, None
    if args.state_dir is not None:
        if args.init == "noise":
            raise ValueError("--state-dir starts chains from the server's replay buffer; leave out --init noise")
        buffer, buffer_path = load_server_buffer(args.state_dir, args.checkpoint, members)
        init = "buffer"
    generator = torch.Generator().manual_seed(args.seed)  # buffer slots, as the server draws them
    frames = []

    def keep_frame(step: int, x: torch.Tensor, energy: torch.Tensor) -> None:
        if args.trajectory and step % args.trajectory == 0:
            frames.append(grid(x, model.data_range))

    seeds = chain_seeds(args.seed, args.n)
    _override_sampler(members, args)
    labels = _labels(args.label, args.n, model)
    print(f"start: {_start_description(members, init, buffer, buffer_path)}", flush=True)
    samples = _draw_with_progress(
        members,
        seeds,
        args,
        generator,
        labels,
        args.n,
        f"sample {model.name}",
        init,
        buffer,
        keep_frame if args.trajectory else None,
    )
    save_grid(samples, args.out, model.data_range)
    print(f"wrote {args.out} ({args.n} {model.config.family} samples)")
    if frames:
        trajectory_path = Path(args.out).with_suffix(".gif")
        trajectory_path.write_bytes(gif_bytes(frames))
        print(f"wrote {trajectory_path} ({len(frames)} frames, every {args.trajectory} steps)")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from training.commands.quality import gan_record_key, load_classifier, quality_figures, real_data_floor
    from training.runtime.device import pick_device
    from training.runtime.draw import chain_labels, default_latent_steps, load_model
    from training.sampling.noise import chain_seeds
    from training.sampling.sampler_config import EBMSampler, FlowSampler, GANSampler
    from training.train.data import load_dataset

    device = pick_device(args.device)
    members = [load_model(path, device) for path in args.checkpoint]
    model = members[0]
    if model.shape != (1, 28, 28):  # before any MNIST is read: the refusal is the answer
        made = "x".join(str(side) for side in model.shape)
        raise SystemExit(
            f"evaluate: its figures are features of the project's MNIST classifier, which reads 1x28x28 images; "
            f"{model.name} makes {made} images (dataset {model.config.data.get('dataset', 'unknown')}), so "
            "evaluate has no figures for it"
        )
    if args.series_terms is not None and model.config.arch.get("name") != "iresnet":  # before any sampling
        family = model.config.family
        why = f"{model.config.arch.get('name')} flow, whose log-det is exact" if family == "flow" else family
        why += "" if family == "flow" else ", which has no log-det"
        raise ValueError(f"--series-terms sets the i-ResNet's log-det power series; {model.name} is a {why}")
    classifier = load_classifier(args.classifier, device)
    test = load_dataset("mnist", args.data_dir, "test")
    train = load_dataset("mnist", args.data_dir, "train")
    generator = torch.Generator().manual_seed(args.seed)
    _override_sampler(members, args)
    seeds = chain_seeds(args.seed, args.n)
    # The labels chains are drawn with (asked for, or each chain's seeded class): label accuracy is reported.
    # Chains from a replay buffer keep their slot's class unless one is asked for.
    ode = isinstance(model.sampler, FlowSampler) and model.sampler.solver is not None  # a CNF
    labels = _labels(args.label, args.n, model) if model.config.family == "ebm" or ode else None
    if (model.config.family == "ebm" and args.init != "buffer") or ode:
        labels = chain_labels(model, seeds, labels)
    description = f"evaluate {model.name}: {args.n} samples"
    samples = _draw_with_progress(members, seeds, args, generator, labels, args.batch, description, args.init)
    print(f"evaluate {model.name}: classifier features, Frechet distance, precision/recall", file=sys.stderr)
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
    if isinstance(model.sampler, FlowSampler) and model.sampler.steps is not None:  # a CNF: its ODE solver
        sampler_report.update(
            steps=model.sampler.steps if args.steps is None else args.steps,
            solver=model.sampler.solver,
            temperature=model.sampler.temperature,
            **({"guidance": model.sampler.guidance} if model.classes is not None else {}),
            **({"label": args.label} if args.label is not None else {}),
        )
    if isinstance(model.sampler, GANSampler):
        ddls_steps = default_latent_steps(model) if args.steps is None else args.steps
        sampler_report.update(steps=ddls_steps)
        if ddls_steps:
            sampler_report.update(step_size=model.sampler.step_size, noise=model.sampler.noise)
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
        from training.models.iresnet import EVALUATION_SERIES_TERMS, InverseConvergence, IResNet
        from training.sampling.sampler_config import FlowSampler
        from training.train.flow import dataset_bits_per_dim

        flow = cast(Flow, model.module)  # nice, glow or iresnet: Flows; a CNF's field is not one
        if ode:
            print(
                f"evaluate {model.name}: no test bits/dim yet: a CNF's likelihood needs the divergence integrated "
                "by an adaptive solver at a stated tolerance, which evaluate does not do yet (a fixed-step "
                "integral gives figures that are not the model's likelihood)",
                file=sys.stderr,
            )
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
        if not ode:
            print(f"evaluate {model.name}: test bits/dim of all {len(test.images)} test images", file=sys.stderr)
            model_figures["test_bits_per_dim"] = round(dataset_bits_per_dim(flow, test, 500, device, seed=args.seed), 4)
    print(json.dumps(report, indent=2))
    if args.record:
        from training.runtime.checkpoint import load_checkpoint, save_checkpoint

        key = "evaluate" if model.config.family != "ebm" else f"evaluate_{args.init}"
        if args.label is not None:
            key += f"_label_{args.label}"
        if args.noise is not None:  # a noisier (long-run) check never overwrites the default figures
            key += f"_noise_{args.noise}"
        if len(members) > 1:
            key = f"evaluate_ensemble_{args.init}"  # the same figures go into every member
        if isinstance(model.sampler, GANSampler):  # DDLS steps other than the checkpoint's own are named
            key = gan_record_key(key, sampler_report["steps"], default_latent_steps(model))
        if ode and args.steps is not None and args.steps != model.sampler.steps:  # a CNF at other ODE steps
            key += f"_steps_{args.steps}"
        if ode and args.guidance is not None:
            key += f"_guidance_{args.guidance}"
        for path in args.checkpoint:
            checkpoint = load_checkpoint(path)
            checkpoint.config.metrics[key] = {
                **model_figures,
                **sampler_report,
                "floor_frechet_distance": floor["frechet_distance"],
            }
            save_checkpoint(path, checkpoint)
            print(f"recorded the figures in {path} (metrics.{key})", file=sys.stderr)


def _cmd_set_sampler(args: argparse.Namespace) -> None:
    from training.commands.set_sampler import set_sampler

    changes, dropped = set_sampler(args.checkpoint, args.settings)
    for name, (old, new) in changes.items():
        print(f"{args.checkpoint}: {name} {old!r} -> {new!r}")
    if not changes:
        print(f"{args.checkpoint}: already declares these settings; unchanged")
    if dropped:
        print(
            f"dropped the recorded figures {', '.join(dropped)} (measured under the old defaults); measure them "
            f"again with: python -m training evaluate {args.checkpoint} --data-dir D --record",
            file=sys.stderr,
        )


def _cmd_classifier(args: argparse.Namespace) -> None:
    from training.commands.quality import train_classifier

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
    from training.commands.zoo import main as zoo_main

    failures = zoo_main(args)
    if failures:
        raise SystemExit(f"zoo: {failures} step(s) failed; see the logs in {args.runs_dir}")


def _cmd_fetch_data(args: argparse.Namespace) -> None:
    from training.commands.fetch_data import fetch

    directory = fetch(args.dataset, args.dir or f"data/{args.dataset}", args.mirror)
    print(f"{args.dataset} is in {directory}: train with --data-dir {directory} (or export SAMPLEBAY_DATA_DIR)")


def _cmd_export(args: argparse.Namespace) -> None:
    from training.models.cnf import is_velocity_field
    from training.runtime.draw import load_model
    from training.runtime.exported import export_model, load_exported

    model = load_model(args.checkpoint)
    if is_velocity_field(model.module):
        raise ValueError(
            f"export: {model.name} is a continuous normalizing flow, sampled by integrating its ODE; exporting "
            "its velocity field is not supported yet (serve or sample the .safetensors checkpoint itself)"
        )
    program, sidecar = export_model(model, args.out)
    load_exported(program)  # read back as the server reads it: the archive checks and the probe batch
    print(f"wrote {program} and {sidecar}: put both in the models directory to serve {program.stem}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default (unless the help already names it); descriptions and epilogs
    print as written, so the examples keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        default = "none" if action.default is None else str(action.default).replace("%", "%%")
        return f"{text} (default: {default})"


D = "data/mnist"
EPILOGS = {
    "ebm": f"""examples:
  python -m training ebm --objective eqm --conditional --data-dir {D} --out checkpoints/my_eqm.safetensors
  python -m training ebm --data-dir {D} --epochs 3 --out checkpoints/my_ebm.safetensors   # contrastive divergence
  python -m training ebm --dataset toy2d:moons --epochs 2 --out /tmp/moons.safetensors     # 2-D toy data, no files
  python -m training ebm --objective eqm --conditional --dataset folder --data-dir pets   # pets/train/<class>/*.png
""",
    "gan": f"""examples:
  python -m training gan --loss wgan-gp --width 32 --data-dir {D} --epochs 10 --out checkpoints/my_wgan.safetensors
  python -m training gan --loss dcgan --data-dir {D} --epochs 1 --max-batches 50 --out /tmp/quick.safetensors
  python -m training gan --dataset folder --data-dir pets --image-size 64 --out checkpoints/pets_gan.safetensors
""",
    "flow": f"""examples:
  python -m training flow --arch nice --hidden 300 --depth 4 --data-dir {D} --out checkpoints/my_nice.safetensors
  python -m training flow --arch glow --levels 2 --steps 6 --hidden 64 --data-dir {D} --resume   # continue a run
  python -m training flow --arch glow --dataset folder --data-dir pets --out checkpoints/pets_glow.safetensors
  python -m training flow --arch cnf --conditional --lr 2e-3 --data-dir {D} --out checkpoints/my_cnf.safetensors
""",
    "sample": """examples:
  python -m training sample checkpoints/eqm_mnist.safetensors --n 64 --trajectory 4 --out digits.png
  python -m training sample checkpoints/eqm_mnist.safetensors --label all --n 100 --out classes.png
  python -m training sample checkpoints/ebm_mnist_seed0.safetensors --state-dir state --out from_server.png
  python -m training sample checkpoints/ebm_mnist_seed{0,1,2}.safetensors --init buffer --out ensemble.png
""",
    "evaluate": f"""examples:
  python -m training evaluate checkpoints/eqm_mnist.safetensors --data-dir {D}
  python -m training evaluate checkpoints/glow_mnist.safetensors --data-dir {D} --n 500 --record
  python -m training evaluate checkpoints/eqm_mnist.safetensors --data-dir {D} --label all --guidance 1.5
""",
    "export": """examples:
  python -m training export checkpoints/eqm_mnist.safetensors --out exported/eqm_copy.pt2   # and eqm_copy.json
  python -m training export checkpoints/glow_mnist.safetensors --out /tmp/glow.pt2
""",
    "classifier": f"""example:
  python -m training classifier --data-dir {D} --epochs 2   # rewrites training/assets/mnist_classifier.safetensors
""",
    "zoo": """examples:
  python -m training zoo --dry-run                                   # what each model's next chunk runs
  python -m training zoo --jobs 2 --data-dir data/mnist              # a chunk of every model, two at a time
  python -m training zoo --preset cuda --only dcgan_mnist --ship     # a lent GPU: one model per command
  bash scripts/train_zoo.sh --only glow_mnist,nice_mnist             # the same as python -m training zoo
""",
    "set-sampler": """examples:
  python -m training set-sampler checkpoints/dcgan_mnist.safetensors steps=50 step_size=0.003 noise=0.0775
  python -m training set-sampler checkpoints/glow_mnist.safetensors temperature=0.6
  python -m training set-sampler checkpoints/ebm_mnist_seed0.safetensors steps=100 init=buffer
""",
    "fetch-data": """examples:
  python -m training fetch-data mnist                                  # into data/mnist
  python -m training fetch-data fashion-mnist --dir ~/data/fashion
  python -m training fetch-data mnist --mirror http://mirror.internal/mnist/    # behind a firewall
  python -m training fetch-data mnist --mirror file:///media/usb/mnist/        # files carried in by hand
""",
}


def _add_command(commands, name: str, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=help_text, description=description or help_text, epilog=EPILOGS[name], formatter_class=HelpFormatter
    )


def build_parser() -> argparse.ArgumentParser:
    from training.commands.fetch_data import CHECKSUMS
    from training.commands.quality import DEFAULT_CLASSIFIER
    from training.train.ebm_cd import EBMTrainConfig
    from training.train.flow import FlowTrainConfig
    from training.train.gan import GANTrainConfig

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
            EBMTrainConfig,
            _cmd_ebm,
        ),
        "gan": ("train a GAN: dcgan, wgan (weight clipping) or wgan-gp, with generator EMA", GANTrainConfig, _cmd_gan),
        "flow": (
            "train a normalizing flow: nice, glow (multiscale) or iresnet by maximum likelihood, or a continuous "
            "normalizing flow (cnf) by flow matching",
            FlowTrainConfig,
            _cmd_flow,
        ),
    }
    for name, (description, config_type, handler) in trainers.items():
        trainer = _add_command(commands, name, description)
        _add_dataclass_arguments(trainer, config_type)
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
    sample.set_defaults(handler=_cmd_sample)

    evaluate = _add_command(
        commands,
        "evaluate",
        "print sample-quality figures as JSON",
        "Print sample-quality figures as JSON: Frechet distance, class coverage, precision/recall in the\n"
        "feature space of the project's MNIST classifier, beside the same figures for real training images.",
    )
    evaluate.add_argument("checkpoint", type=Path, nargs="+", help="one checkpoint, or the EBMs of one ensemble")
    evaluate.add_argument("--data-dir", default=None, help="MNIST IDX files (fetch-data; default: $SAMPLEBAY_DATA_DIR)")
    evaluate.add_argument("--n", type=int, default=2000, help="samples and reference images compared")
    evaluate.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    evaluate.add_argument(
        "--init", choices=["noise", "buffer"], default="noise", help="EBMs: start from the prior or the replay buffer"
    )
    _add_ebm_sampler_flags(evaluate)
    evaluate.add_argument("--batch", type=int, default=500, help="chains sampled at a time")
    from training.models.iresnet import EVALUATION_SERIES_TERMS

    evaluate.add_argument(
        "--series-terms",
        type=int,
        default=None,
        metavar="K",
        help="i-ResNet flows: terms of the log-det power series behind test bits/dim (default "
        f"{EVALUATION_SERIES_TERMS}, where the truncation bias is small; the checkpoint's own count is what "
        "training used)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seeds the chains and the reference subsets")
    evaluate.add_argument(
        "--classifier", type=Path, default=DEFAULT_CLASSIFIER, help="the feature network (see: classifier)"
    )
    evaluate.add_argument("--device", default="auto", help="auto (cuda when available, else cpu) | cpu | cuda")
    evaluate.add_argument("--record", action="store_true", help="also store the figures in the checkpoint's metrics")
    evaluate.set_defaults(handler=_cmd_evaluate)

    export = _add_command(
        commands,
        "export",
        "write a checkpoint as a torch.export program NAME.pt2 with its sidecar NAME.json",
        "Write a checkpoint as a torch.export program (dynamic batch dimension) and the JSON sidecar beside it,\n"
        "the form in which a server serves models trained elsewhere; it samples as the checkpoint does.\n"
        "An energy becomes x -> E(x) (x, y -> E(x, y) when class-conditional), a GAN z -> G(z) with the\n"
        "weights it samples with, a flow z -> (x, log p(x)). The i-ResNet's iterative inverse cannot be traced.",
    )
    export.add_argument("checkpoint", type=Path, help="the .safetensors checkpoint to export (an ebm, gan or flow)")
    export.add_argument(
        "--out", type=Path, required=True, help="the program written, NAME.pt2; the sidecar NAME.json goes beside it"
    )
    export.set_defaults(handler=_cmd_export)

    classifier = _add_command(commands, "classifier", "train the MNIST classifier used by evaluate")
    classifier.add_argument(
        "--data-dir", default=None, help="MNIST IDX files (fetch-data; default: $SAMPLEBAY_DATA_DIR)"
    )
    classifier.add_argument("--out", default=str(DEFAULT_CLASSIFIER), help="the classifier checkpoint written")
    classifier.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    classifier.add_argument("--seed", type=int, default=0, help="seeds initialization and batch order")
    classifier.add_argument("--max-batches", type=int, default=None, help="at most this many batches per epoch")
    classifier.add_argument("--device", default="auto", help="auto (cuda when available, else cpu) | cpu | cuda")
    classifier.set_defaults(handler=_cmd_classifier)

    from training.commands.zoo import add_arguments as add_zoo_arguments

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
    from training.commands.fetch_data import FetchError

    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (DatasetError, CheckpointError, FetchError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
