"""Milliseconds per Langevin step spent drawing each chain's counter-based noise (training/sampling/noise.py).

    python bench/noise_speed.py --batch 64 --shape 3 128 128

Prints the median of --repeats calls of chain_gaussian for a batch of seeded chains at one step counter each,
and the resident memory it added at its peak (ru_maxrss).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from training.sampling.noise import chain_gaussian, chain_seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="chains")
    parser.add_argument("--shape", type=int, nargs="+", default=[3, 128, 128], help="one chain's state")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    seeds = chain_seeds(7, args.batch).to(device)
    steps = torch.arange(args.batch, device=device) + 11
    shape = tuple(args.shape)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chain_gaussian(seeds, steps, shape)  # warm
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        chain_gaussian(seeds, steps, shape)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    median = 1000 * statistics.median(times)
    print(
        f"chain_gaussian B={args.batch} {list(shape)} on {device} ({args.threads} thread(s)): {median:.1f} ms a step "
        f"({median / args.batch:.2f} ms a chain), peak +{peak:.0f} MiB"
    )


if __name__ == "__main__":
    main()
