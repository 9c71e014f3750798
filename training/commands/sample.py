"""`python -m training sample`: draw samples from checkpoints into a PNG grid (and a trajectory GIF), the way a
server draws them; the sampler overrides and progress that `evaluate` shares."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from training.runtime.buffer_files import load_server_buffer
from training.runtime.device import dtype_name, pick_device, sampling_dtype, use_threads
from training.runtime.draw import default_latent_steps, draw_samples, pooled_buffer
from training.runtime.images import gif_bytes, grid, save_grid
from training.runtime.load import load_model
from training.runtime.loaded import LoadedModel
from training.sampling.noise import chain_seeds
from training.sampling.sampler_config import EBMSampler, FlowSampler, GANSampler
from training.train.progress import progress


def labels_for(spec: str | None, n: int, model) -> torch.Tensor | None:
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


def override_sampler(members: list, args: argparse.Namespace) -> None:
    """--step-size, --noise, --guidance and --tolerance (EBMs; a CNF takes --guidance) replace the checkpoints'
    own for this command only."""
    if members[0].config.family == "flow":
        if args.step_size is not None or args.noise is not None or args.tolerance is not None:
            raise ValueError(
                "--step-size, --noise and --tolerance apply to EBMs (the first two to GAN DDLS too); a flow takes "
                "--steps (a CNF's ODE)"
            )
        sampler = members[0].sampler_as(FlowSampler)
        if args.guidance is not None:
            if sampler.solver is None:
                raise ValueError(f"--guidance applies to conditional EBMs and CNFs; {members[0].name} is neither")
            members[0].sampler = dataclasses.replace(sampler, guidance=args.guidance)
        return
    gan = members[0].config.family == "gan"
    if gan and args.guidance is not None:
        raise ValueError("--guidance applies to class-conditional EBMs; a GAN takes --steps, --step-size, --noise")
    if gan and args.tolerance is not None:
        raise ValueError("--tolerance applies to EBMs; a GAN takes --steps, --step-size, --noise")
    asked = ("step_size", "noise", "guidance", "tolerance")
    changes = {key: getattr(args, key) for key in asked if getattr(args, key) is not None}
    for member in members if changes else []:
        member.sampler = dataclasses.replace(member.sampler_as(GANSampler if gan else EBMSampler), **changes)


def chain_steps_of(model: LoadedModel, steps: int | None) -> int:
    """The steps each chain takes (at most): an EBM's Langevin steps, a GAN's DDLS steps (0: one plain pass, or no
    critic), a CNF's ODE steps; 0 for a one-shot sampler."""
    sampler = model.sampler
    if isinstance(sampler, EBMSampler):
        return sampler.steps if steps is None else steps
    if isinstance(sampler, GANSampler):
        return default_latent_steps(model) if steps is None else steps
    if isinstance(sampler, FlowSampler) and sampler.steps is not None:
        return sampler.steps if steps is None else steps
    return 0


def draw_with_progress(
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
    chain_steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Samples [N, *shape] drawn `batch` chains at a time (on the CPU), with progress on stderr: a bar on a
    terminal, plain lines when piped. EBMs count Langevin steps, GANs and flows batches;
    an EBM's `chain_steps` [N], when given, gets the steps each chain ran. Chains step in --sampling-dtype."""
    model = members[0]
    starts = range(0, len(seeds), batch)
    dtype = sampling_dtype(args.sampling_dtype, next(model.module.parameters()).device)
    steps_per_chain = chain_steps_of(model, args.steps)
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
                    None if chain_steps is None else chain_steps[chunk],
                    dtype,
                ).cpu()
            )
            if not steps_per_chain:
                bar.update(1)
    return torch.cat(parts)


def start_description(members: list, init: str | None, buffer, buffer_paths: list[Path] | None) -> str:
    """Where the chains (or latents) started, said on every `sample`: the CLI and a running server start from
    the same prior, but a server's replay buffer has moved on from the one saved in the checkpoint."""
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
    if buffer_paths:
        files = ", ".join(str(path) for path in buffer_paths)
        return f"the server's replay buffer {files} ({len(buffer)} samples)"
    return (
        f"the replay buffer saved in the checkpoint ({len(pooled_buffer(members))} samples); a server that has "
        "been sampling starts from its own, newer one: --state-dir DIR uses what it saved"
    )


def run_sample(args: argparse.Namespace) -> None:
    print(use_threads(args.threads), flush=True)
    device = pick_device(args.device)
    members = [load_model(path, device) for path in args.checkpoint]
    model = members[0]
    init, buffer, buffer_paths = args.init, None, None
    if args.state_dir is not None:
        if args.init == "noise":
            raise ValueError("--state-dir starts chains from the server's replay buffer; leave out --init noise")
        buffer, buffer_paths = load_server_buffer(args.state_dir, args.checkpoint, members)
        init = "buffer"
    generator = torch.Generator().manual_seed(args.seed)  # buffer slots, as the server draws them
    frames = []

    def keep_frame(step: int, x: torch.Tensor, energy: torch.Tensor) -> None:
        if args.trajectory and step % args.trajectory == 0:
            frames.append(grid(x, model.data_range))

    seeds = chain_seeds(args.seed, args.n)
    override_sampler(members, args)
    labels = labels_for(args.label, args.n, model)
    print(f"start: {start_description(members, init, buffer, buffer_paths)}", flush=True)
    if chain_steps_of(model, args.steps):
        print(f"chain steps compute in {dtype_name(sampling_dtype(args.sampling_dtype, device))}")
    samples = draw_with_progress(
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
