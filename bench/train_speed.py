"""Training updates/s of the EBM objectives on this machine, old and new settings in one run.

Each row is measured in a fresh process (so thread settings and compiled code do not leak between rows)
on random images (speed does not depend on the pixels), through the trainers' own update functions:
`cd_update` (contrastive divergence, 60 Langevin steps per update, the old default) and `eqm_update`
(Equilibrium Matching, no MCMC). "x2" rows run two such processes side by side and report their sum.

    python bench/train_speed.py                       # the whole table (about 10 minutes on 2 cores)
    python bench/train_speed.py --rows eqm-bf16-t1 --updates 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    name: str
    objective: str  # cd | eqm
    threads: int
    autocast: str = "none"  # none | bfloat16
    channels_last: bool = False
    compile: bool = False
    batch_size: int = 128
    side_by_side: int = 1  # processes run at once; their rates are summed


ROWS = [
    Row("cd-fp32-t2 (old default)", "cd", 2),
    Row("cd-fp32-t1", "cd", 1),
    Row("cd-fp32-t1-x2", "cd", 1, side_by_side=2),
    Row("eqm-fp32-t2", "eqm", 2),
    Row("eqm-bf16-t2", "eqm", 2, "bfloat16"),
    Row("eqm-fp32-t1", "eqm", 1),
    Row("eqm-bf16-t1 (new default)", "eqm", 1, "bfloat16"),
    Row("eqm-bf16-t1-x2", "eqm", 1, "bfloat16", side_by_side=2),
    Row("eqm-bf16-t1-channels_last", "eqm", 1, "bfloat16", channels_last=True),
    Row("eqm-bf16-t1-compile", "eqm", 1, "bfloat16", compile=True),
    Row("eqm-bf16-t1-batch64", "eqm", 1, "bfloat16", batch_size=64),
    Row("eqm-bf16-t1-batch256", "eqm", 1, "bfloat16", batch_size=256),
]


def measure(row: Row, updates: int, warmup: int) -> dict[str, float]:
    """Run `updates` timed updates (after `warmup`) of one configuration in this process."""
    import torch

    from training.models import build_model
    from training.sampling.langevin import frozen_energy
    from training.sampling.replay_buffer import ReplayBuffer
    from training.train.ebm_cd import cd_sampler, cd_update
    from training.train.ebm_config import EBMTrainConfig
    from training.train.ebm_eqm import eqm_update

    torch.set_num_threads(row.threads)
    torch.manual_seed(0)
    config = EBMTrainConfig(objective=row.objective, autocast=row.autocast, batch_size=row.batch_size)
    memory = torch.channels_last if row.channels_last else torch.contiguous_format
    images = (torch.rand(row.batch_size, 1, 28, 28) * 2 - 1).contiguous(memory_format=memory)
    if row.objective == "cd":
        model = build_model({"name": "conv_energy", "kwargs": {"width": config.setting("width")}})
    else:
        model = build_model({"name": "unet_energy", "kwargs": {"width": config.setting("width"), "num_classes": 10}})
    model = model.to(memory_format=memory)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.setting("lr"))
    network = torch.compile(model) if row.compile else model
    buffer = ReplayBuffer((1, 28, 28), 1024)
    langevin = cd_sampler(config)
    labels = torch.arange(row.batch_size) % 10

    def update() -> None:
        if row.objective == "cd":
            cd_update(network, frozen_energy(network), optimizer, buffer, images.clone(), langevin, config)
        else:
            eqm_update(network, optimizer, images, labels, config, config.setting("lr"))

    for _ in range(warmup):
        update()
    started = time.perf_counter()
    for _ in range(updates):
        update()
    seconds = time.perf_counter() - started
    return {"updates_per_s": updates / seconds, "images_per_s": updates * row.batch_size / seconds}


def run_row(row: Row, updates: int, warmup: int) -> dict[str, float] | str:
    """The row's figures from fresh processes (summed when side by side), or why it failed."""
    command = [sys.executable, __file__, "--worker", row.name, "--updates", str(updates), "--warmup", str(warmup)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(row.threads)}
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
        for _ in range(row.side_by_side)
    ]
    totals = {"updates_per_s": 0.0, "images_per_s": 0.0}
    for process in processes:
        out, err = process.communicate()
        if process.returncode != 0:
            return (err.strip().splitlines() or ["failed"])[-1][:100]
        for key, value in json.loads(out.strip().splitlines()[-1]).items():
            totals[key] += value
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=None, help="comma-separated row names (prefix match); default: all")
    parser.add_argument("--updates", type=int, default=8, help="timed updates per process (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates first (default 2)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    by_name = {row.name: row for row in ROWS}
    if args.worker:
        print(json.dumps(measure(by_name[args.worker], args.updates, args.warmup)))
        return
    chosen = ROWS
    if args.rows:
        prefixes = args.rows.split(",")
        chosen = [row for row in ROWS if any(row.name.startswith(prefix) for prefix in prefixes)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.updates} timed updates per process")
    print("| configuration | updates/s | images/s | vs old default |")
    print("| --- | ---: | ---: | ---: |")
    baseline = None
    for row in chosen:
        figures = run_row(row, args.updates, args.warmup)
        if isinstance(figures, str):
            print(f"| {row.name} | failed: {figures} | | |", flush=True)
            continue
        if row.name.startswith("cd-fp32-t2"):
            baseline = figures["updates_per_s"]
        ratio = f"{figures['updates_per_s'] / baseline:.2f}x" if baseline else "-"
        print(f"| {row.name} | {figures['updates_per_s']:.3f} | {figures['images_per_s']:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
