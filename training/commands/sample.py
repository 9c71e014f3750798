"""`python -m training sample`: draw samples from checkpoints into a PNG grid (and a trajectory GIF), the way a
server draws them; the labels and progress that `evaluate` shares (the family says how it draws, what it
overrides and where it starts: training/families/)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from training.families import draw_samples, family_of
from training.runtime.buffer_files import load_server_buffer
from training.runtime.device import dtype_name, pick_device, sampling_dtype, use_threads
from training.runtime.images import gif_bytes, grid, save_grid
from training.runtime.load import load_model
from training.sampling.noise import chain_seeds
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
    steps_per_chain = family_of(model).chain_steps(model, args.steps)
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
    family = family_of(model)
    family.override_sampler(members, args)
    labels = labels_for(args.label, args.n, model)
    print(f"start: {family.start_description(members, init, buffer, buffer_paths)}", flush=True)
    if family.chain_steps(model, args.steps):
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
