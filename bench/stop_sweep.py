"""FD against mean gradient evaluations for fixed steps and per-chain stops, from one sampling pass.

A chain stopped at its tolerance holds the state its fixed-step path had at that step (the same seeded noise;
tests/service_engine/test_chain_stop.py shows it), so one run of `--max-steps` steps, watched by a callback, gives every
configuration's samples (one pass per --step-sizes x --momenta x --step-decays): fixed S steps (the state at S), an
RMS-move stop at tau (the state at the first step whose RMS move sqrt(mean((x_{t+1} - x_t)^2)) is below tau:
training/sampling/langevin.py's `arrived`), and an energy-change stop at delta (the first step whose
|E_t - E_{t-1}| is below delta). For gradient descent without noise or momentum the RMS move is the step size
times the RMS gradient, so a gradient-norm stop is the RMS-move stop at tau / step size. FD and the rest are
`evaluate`'s (training/commands/quality.py) on `evaluate`'s seeds, labels and reference subset.

    python bench/stop_sweep.py checkpoints/eqm_mnist.safetensors --data-dir ../shared/data/mnist --n 1000 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from typing import cast

import torch

from training.commands.quality import load_classifier, quality_figures
from training.runtime.device import SAMPLING_DTYPE_CHOICES, chain_precision, dtype_name, sampling_dtype
from training.runtime.draw import chain_labels, sample_ebm
from training.runtime.load import load_model
from training.sampling.langevin import chain_moves
from training.sampling.noise import chain_seeds, chain_start
from training.sampling.sampler_config import EBMSampler
from training.train.data import load_dataset


class Watcher:
    """Keeps, per configuration, each chain's state and step at the first step its stop rule holds."""

    def __init__(self, start: torch.Tensor, fixed: list[int], moves: list[float], energy_changes: list[float]) -> None:
        self.previous_x, self.previous_energy = start.clone(), cast(torch.Tensor | None, None)
        self.rules = [("fixed", s) for s in fixed] + [("rms_move", t) for t in moves]
        self.rules += [("energy_change", d) for d in energy_changes]
        n = len(start)
        self.states = {rule: start.clone() for rule in self.rules}
        self.stopped_at = {rule: torch.zeros(n, dtype=torch.int64) for rule in self.rules}

    def __call__(self, step: int, x: torch.Tensor, energy: torch.Tensor) -> None:
        move = chain_moves(self.previous_x, x)
        change = None if self.previous_energy is None else (energy - self.previous_energy).abs()
        for rule in self.rules:
            kind, value = rule
            open_ = self.stopped_at[rule] == 0
            if kind == "fixed":
                now = open_ & (step == value)
            elif kind == "rms_move":
                now = open_ & (move < value)
            else:
                now = open_ & (change < value) if change is not None else torch.zeros_like(open_)
            self.states[rule][now] = x[now]
            self.stopped_at[rule][now] = step
        self.previous_x, self.previous_energy = x.clone(), energy.clone()

    def finish(self, x: torch.Tensor, steps: int) -> None:
        for rule in self.rules:
            open_ = self.stopped_at[rule] == 0
            self.states[rule][open_] = x[open_]
            self.stopped_at[rule][open_] = steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="as evaluate's --seed: the chains and the reference")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--fixed", type=int, nargs="*", default=[30, 40, 60])
    parser.add_argument("--rms-move", type=float, nargs="*", default=[0.002, 0.003, 0.004])
    parser.add_argument("--energy-change", type=float, nargs="*", default=[])
    parser.add_argument("--step-sizes", type=float, nargs="*", default=[], help="one pass each (default: the model's)")
    parser.add_argument("--momenta", type=float, nargs="*", default=[], help="heavy-ball momentum, one pass each")
    parser.add_argument(
        "--step-decays",
        type=float,
        nargs="*",
        default=[],
        help="larger steps first: step t moves by step_size * decay**t, one pass each",
    )
    parser.add_argument("--nesterov", action="store_true", help="momentum passes take the look-ahead gradient")
    parser.add_argument(
        "--sampling-dtype",
        choices=SAMPLING_DTYPE_CHOICES,
        default="float32",
        help="what the steps compute in (the server's --sampling-dtype; its default is auto)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    dtype = sampling_dtype(args.sampling_dtype, device)
    model = load_model(args.checkpoint, device)
    sampler = model.sampler_as(EBMSampler)
    if sampler.tolerance:
        raise SystemExit(f"{model.name} already stops at tolerance {sampler.tolerance}; sweep a fixed-step copy")
    test = load_dataset("mnist", args.data_dir, "test")
    reference = test.images[
        torch.randperm(len(test.images), generator=torch.Generator().manual_seed(args.seed + 1))[: args.n]
    ]
    classifier = load_classifier()
    seeds = chain_seeds(args.seed, args.n)
    labels = chain_labels(model, seeds, None)  # evaluate's: each chain's seeded class (unlabelled: random)
    evaluations = 2 if (model.classes is not None and sampler.guidance != 1.0) else 1
    for step_size in args.step_sizes or [sampler.step_size]:
        for momentum, decay in itertools.product(args.momenta or [sampler.momentum], args.step_decays or [1.0]):
            changes = {"step_size": step_size, "momentum": momentum, "nesterov": args.nesterov and momentum > 0}
            changes["step_decay"] = decay
            model.sampler = dataclasses.replace(sampler, **changes)
            results: dict = {}
            began = time.perf_counter()
            for part in torch.split(torch.arange(args.n), args.batch):
                part_labels = None if labels is None else labels[part]
                start = chain_start(seeds[part], model.shape, sampler, model.data_range)
                watcher = Watcher(start, args.fixed, args.rms_move, args.energy_change)
                with chain_precision(device, dtype):
                    final = sample_ebm(
                        [model], seeds[part], args.max_steps, "noise", callback=watcher, labels=part_labels
                    )
                watcher.finish(final, args.max_steps)
                for rule in watcher.rules:
                    kept = results.setdefault(rule, ([], []))
                    kept[0].append(watcher.states[rule].float().clamp(*model.data_range))
                    kept[1].append(watcher.stopped_at[rule])
            seconds = time.perf_counter() - began
            print(
                f"step {step_size:g}, decay {decay:g}, momentum {momentum:g}: "
                f"{args.n} chains x {args.max_steps} steps, {seconds:.0f} s",
                file=sys.stderr,
            )
            for (kind, value), (states, stops) in results.items():
                steps = torch.cat(stops).double()
                figures = quality_figures(classifier, reference, torch.cat(states), labels).report()
                row = {
                    "step_size": step_size,
                    "momentum": momentum,
                    "nesterov": changes["nesterov"],
                    "step_decay": decay,
                    "sampling_dtype": dtype_name(dtype),
                    "rule": kind,
                    "value": value,
                    "mean_steps": round(float(steps.mean()), 1),
                    "p50": int(steps.median()),
                    "p95": int(steps.quantile(0.95)),
                    "max": int(steps.max()),
                    "energy_evaluations_per_sample": round(float(steps.mean()) * evaluations, 1),
                    **figures,
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
