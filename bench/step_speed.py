"""Chain-steps/s of one served Langevin step, eager against its faster variants, each row in a fresh process.

The step is the server's (training/sampling/langevin.py `langevin_step` on `conditioned_energy`: each chain's
seeded class, the checkpoint's guidance, step size, clip and clamp) on one batch of chains from the prior.
Rows: eager at 1 and 2 threads, bfloat16 autocast, `torch.compile` of the energy (its backward compiled by
AOTAutograd), and on CUDA `torch.compile(mode="reduce-overhead")` (CUDA graphs). Every row also runs the eager
step from the same start for as many steps and prints how far its chains ended from eager's (max |dx|), so a
faster variant that changes the samples says so. Compile and warm-up time is printed apart from the rate.

    python bench/step_speed.py checkpoints/eqm_mnist.safetensors --batch 256 --steps 20
    python bench/step_speed.py checkpoints/eqm_mnist.safetensors --device cuda --batch 1024 --rows cuda  # a lent GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CPU_ROWS = ["eager-t1", "eager-t2", "bf16-t1", "compile-t1"]
CUDA_ROWS = ["eager-cuda", "bf16-cuda", "compile-cuda", "graphs-cuda"]


def measure(checkpoint: str, row: str, batch: int, steps: int, device_name: str) -> dict:
    """One row, in this process: warm-up (with compilation), the timed steps, and the distance from eager."""
    import torch

    from training.runtime.device import chain_precision
    from training.runtime.draw import chain_labels
    from training.runtime.load import load_model
    from training.sampling.langevin import conditioned_energy, langevin_step
    from training.sampling.noise import chain_gaussian, chain_seeds, chain_start
    from training.sampling.sampler_config import EBMSampler

    kind = row.split("-")[0]
    if row.endswith("-t1") or row.endswith("-t2"):
        torch.set_num_threads(int(row[-1]))
    device = torch.device(device_name)
    model = load_model(checkpoint, device)
    sampler = model.sampler_as(EBMSampler)
    seeds = chain_seeds(0, batch)
    labels = chain_labels(model, seeds, None)
    labels = None if labels is None else labels.to(device)
    start = chain_start(seeds, model.shape, sampler, model.data_range).to(device)
    module = model.module
    if kind == "compile":
        module = torch.compile(module)
    elif kind == "graphs":
        module = torch.compile(module, mode="reduce-overhead")
    energy = conditioned_energy(module, labels, sampler.guidance)
    eager_energy = conditioned_energy(model.module, labels, sampler.guidance)
    noise = [chain_gaussian(seeds, torch.full_like(seeds, step), model.shape).to(device) for step in range(steps)]

    def run(fn, x: torch.Tensor, count: int) -> torch.Tensor:
        for step in range(count):
            x = langevin_step(
                fn,
                x,
                noise[step % steps],
                sampler.step_size,
                sampler.noise,
                sampler.grad_clip,
                sampler.temperature,
                model.data_range,
                sampler.momentum,
                None,
                sampler.clamp,
            ).x
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x

    began = time.perf_counter()
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32  # the server's --sampling-dtype
    with chain_precision(device, dtype):
        run(energy, start, 3)
    warm_up = time.perf_counter() - began
    began = time.perf_counter()
    with chain_precision(device, dtype):
        ended = run(energy, start, steps)
    seconds = time.perf_counter() - began
    reference = run(eager_energy, start, steps)
    return {
        "row": row,
        "batch": batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "chain_steps_per_s": round(batch * steps / seconds, 1),
        "warm_up_s": round(warm_up, 1),
        "max_abs_dx_vs_eager": float((ended.float() - reference.float()).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an EBM checkpoint (.safetensors)")
    parser.add_argument("--batch", type=int, default=256, help="chains in the batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--rows", default="", help="comma-separated rows, or 'cpu' / 'cuda' (default: the device's)")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # a child process measuring one row
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.checkpoint, args.one, args.batch, args.steps, args.device)), flush=True)
        return
    rows = {"": CUDA_ROWS if args.device == "cuda" else CPU_ROWS, "cpu": CPU_ROWS, "cuda": CUDA_ROWS}.get(
        args.rows, args.rows.split(",")
    )
    print(f"# {Path(args.checkpoint).name}, batch {args.batch}, {args.steps} steps, {os.cpu_count()} CPU cores")
    print("| row | chain-steps/s | vs eager-t1 | warm-up s | max abs dx vs eager |")
    print("|---|---:|---:|---:|---:|")
    baseline = None
    for row in rows:
        command = [sys.executable, __file__, args.checkpoint, "--one", row, "--batch", str(args.batch)]
        command += ["--steps", str(args.steps), "--device", args.device]
        env = dict(os.environ, OMP_NUM_THREADS=row[-1]) if row[-3:] in ("-t1", "-t2") else None
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            print(f"| {row} | failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'} | | | |")
            continue
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        rate = figures["chain_steps_per_s"]
        baseline = baseline or rate
        print(
            f"| {row} | {rate:.0f} | {rate / baseline:.2f}x | {figures['warm_up_s']:.1f} "
            f"| {figures['max_abs_dx_vs_eager']:.2g} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
