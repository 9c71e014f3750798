"""One small request against the raw loop: what serving adds to a single request, and to each of its steps.

    python bench/latency.py --requests 15 --repeats 5
    python bench/latency.py --device cuda --sampling-dtype bfloat16  # a lent GPU: where a step is about a millisecond

Two figures, from one server (`python -m service`, --threads torch threads, --sampling-dtype) and this process
(the same threads and dtype), every served measurement interleaved with its in-process one so that load on a
shared machine falls on both alike:

1. One request of --model (default `eqm_mnist`, from --checkpoint) for --n chains at its checkpoint's defaults,
   answered as a PNG, against the same draw in-process (`draw_samples`, the CLI's and `evaluate`'s sampler,
   then the same PNG encoding): median of --requests each, the ratio of the medians and the median of the
   pairs' ratios. The two PNGs must be the same bytes (seeded chains follow one path), or the script stops.
2. The engine's cost per step, on an energy whose compute is near zero: a linear layer on [1, 28, 28], which
   the script exports itself (torch.export, dynamic batch, a JSON sidecar: the README's recipe) and serves
   beside the model. A request's time at --long-steps less its time at 1 step, over the difference in steps,
   served and in-process (`draw_samples`), median of --repeats; the difference is what the engine adds a step
   (scheduling, the per-chain stop's bookkeeping, per-chain settings, the worker's round). Printed at each of
   --chains, with the fixed part (a 1-step request served, less in-process: HTTP, the order, the worker's
   wake-up, starting the chains, the answer, the PNG) beside it. The last column is the same difference in CPU
   time (the server's threads from /proc's schedstat, this process's own): on a core shared with other jobs the
   wall-clock figures follow the load, the CPU time far less.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import launch  # bench/launch.py, beside this script
import torch
from torch import nn

from training.families import draw_samples
from training.runtime.device import sampling_dtype
from training.runtime.images import grid, png_bytes
from training.runtime.load import load_model
from training.runtime.loaded import LoadedModel
from training.sampling.noise import chain_seeds

ROOT = Path(__file__).resolve().parents[1]
LINEAR = "linear_energy"


class LinearEnergy(nn.Module):
    """E(x) = w . x + b on [1, 28, 28]: a step's compute is a matrix-vector product and its gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(28 * 28, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, 28, 28] -> [B]
        return self.head(x.flatten(1)).squeeze(1)


def export_linear(folder: Path, steps: int) -> Path:
    """The linear energy as a user exports one: torch.export with a dynamic batch, saved beside its sidecar
    (plain steps from uniform noise, no tolerance: every chain takes every step)."""
    torch.manual_seed(0)
    module = LinearEnergy().eval()
    path = folder / f"{LINEAR}.pt2"
    program = torch.export.export(
        module, (torch.zeros(2, 1, 28, 28),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(program, path)
    sidecar = {
        "family": "ebm",
        "data": {"shape": [1, 28, 28], "range": [-1.0, 1.0]},
        "sampler": {"steps": steps, "step_size": 10.0, "noise": 0.005, "init": "noise"},
    }
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def timed(action: Callable[..., bytes], *args: Any) -> tuple[float, bytes]:
    """Seconds `action(*args)` took, and what it returned."""
    started = time.perf_counter()
    body = action(*args)
    return time.perf_counter() - started, body


def cpu_seconds(pid: int) -> float:
    """CPU time every thread of process `pid` has run so far, in seconds, from /proc's schedstat (nanoseconds: the
    tick-based clocks are too coarse for a step's share); NaN where there is no /proc."""
    try:
        threads = Path(f"/proc/{pid}/task").iterdir()
        return sum(int((thread / "schedstat").read_text().split()[0]) for thread in threads) / 1e9
    except (OSError, ValueError):
        return math.nan


def clocked(cpu: Callable[[], float], action: Callable[..., bytes], *args: Any) -> tuple[float, float, bytes]:
    """Wall seconds and `cpu` seconds `action(*args)` took, and what it returned."""
    cpu_before, started = cpu(), time.perf_counter()
    body = action(*args)
    return time.perf_counter() - started, cpu() - cpu_before, body


def same(served_png: bytes, local_png: bytes, which: str, device: str) -> None:
    """Stop when a served PNG is not the in-process one: on a CPU seeded chains are bit for bit the same; on a GPU
    kernels may pick other algorithms in another process, so a difference is only reported."""
    if served_png == local_png:
        return
    if device == "cpu":
        raise SystemExit(f"{which}: the served PNG differs from the in-process one")
    print(f"{which}: the served PNG differs from the in-process one (on {device}: reported, not fatal)")


def in_process(model: LoadedModel, dtype: torch.dtype, n: int, seed: int, steps: int | None = None) -> bytes:
    """The draw as the CLI makes it, then the server's PNG (one image for n = 1, a grid for more)."""
    samples = draw_samples(model, chain_seeds(seed, n), steps=steps, init="noise" if steps else None, dtype=dtype)
    return png_bytes(grid(samples, model.data_range))


def served(session: httpx.Client, base: str, body: dict) -> bytes:
    reply = session.post(f"{base}/sample", json=body)
    reply.raise_for_status()
    return reply.content


def one_request(
    session: httpx.Client, base: str, model: LoadedModel, dtype: torch.dtype, args: argparse.Namespace
) -> None:
    """Figure 1: one request at the model's defaults, served against in-process, interleaved."""
    body = {"model": args.model, "n": args.n}
    times: dict[str, list[float]] = {"served": [], "in-process": []}
    for seed in range(args.requests + 1):  # seed 0 warms both
        server_s, png = timed(served, session, base, {**body, "seed": seed})
        local_s, local_png = timed(in_process, model, dtype, args.n, seed)
        same(png, local_png, f"seed {seed}", args.device)
        if seed:
            times["served"].append(server_s)
            times["in-process"].append(local_s)
    ratios = [a / b for a, b in zip(times["served"], times["in-process"], strict=True)]
    served_s, local_s = statistics.median(times["served"]), statistics.median(times["in-process"])
    print(f"one {args.model} request, n {args.n}, its defaults, PNG (median of {args.requests}, interleaved):")
    print("| served s | in-process s | served / in-process | median of pair ratios | served - in-process ms |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| {served_s:.3f} | {local_s:.3f} | {served_s / local_s:.3f}x | {statistics.median(ratios):.3f}x | "
        f"{1000 * (served_s - local_s):.0f} |",
        flush=True,
    )


def step_cost(
    session: httpx.Client,
    base: str,
    server_pid: int,
    linear: LoadedModel,
    dtype: torch.dtype,
    args: argparse.Namespace,
) -> None:
    """Figure 2: the engine's cost per step on the linear energy, at each chain count."""
    long, extra = args.long_steps, args.long_steps - 1
    print(f"engine cost per step, a linear energy on [1, 28, 28] ({long} steps less 1, median of {args.repeats}):")
    print(
        "| chains | served ms/step | in-process ms/step | engine ms/step | 1-step request served / in-process ms "
        "| engine CPU ms/step |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    server_cpu = functools.partial(cpu_seconds, server_pid)
    for chains in [int(count) for count in args.chains.split(",")]:
        rows: dict[str, list[float]] = {
            "served": [], "local": [], "engine": [], "fixed_served": [], "fixed_local": [], "engine_cpu": []
        }  # fmt: skip
        for repeat in range(args.repeats + 1):  # repeat 0 warms both
            body = {"model": LINEAR, "n": chains, "seed": repeat, "init": "noise"}
            short_s, short_cpu, _ = clocked(server_cpu, served, session, base, {**body, "steps": 1})
            long_s, long_cpu, png = clocked(server_cpu, served, session, base, {**body, "steps": long})
            short_local, short_local_cpu, _ = clocked(time.process_time, in_process, linear, dtype, chains, repeat, 1)
            long_local, long_local_cpu, local_png = clocked(
                time.process_time, in_process, linear, dtype, chains, repeat, long
            )
            same(png, local_png, f"{chains} chains, seed {repeat}", args.device)
            if repeat:
                server_step, local_step = (long_s - short_s) / extra, (long_local - short_local) / extra
                rows["served"].append(server_step)
                rows["local"].append(local_step)
                rows["engine"].append(server_step - local_step)
                rows["fixed_served"].append(short_s)
                rows["fixed_local"].append(short_local)
                rows["engine_cpu"].append(((long_cpu - short_cpu) - (long_local_cpu - short_local_cpu)) / extra)
        ms = {name: 1000 * statistics.median(values) for name, values in rows.items()}
        print(
            f"| {chains} | {ms['served']:.3f} | {ms['local']:.3f} | {ms['engine']:.3f} | "
            f"{ms['fixed_served']:.1f} / {ms['fixed_local']:.1f} | {ms['engine_cpu']:.3f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "eqm_mnist.safetensors"))
    parser.add_argument("--n", type=int, default=4, help="chains of the one request (figure 1)")
    parser.add_argument("--requests", type=int, default=15, help="requests of each kind in figure 1")
    parser.add_argument("--chains", default="4,64", help="chain counts of figure 2, comma-separated")
    parser.add_argument("--long-steps", type=int, default=201, help="the long request's steps in figure 2")
    parser.add_argument("--repeats", type=int, default=5, help="pairs of requests at each chain count in figure 2")
    parser.add_argument("--device", default="cpu", help="where the server and the in-process draws run: cpu, cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, of the server and of this process")
    parser.add_argument("--sampling-dtype", default="float32", help="as the server's --sampling-dtype")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    args.model = checkpoint.stem
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = sampling_dtype(args.sampling_dtype, device)
    machine = platform.processor() or platform.machine()
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    print(f"{machine}, {args.threads} torch thread(s), {args.sampling_dtype}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as scratch:
        models, state = Path(scratch) / "models", Path(scratch) / "state"
        models.mkdir()
        shutil.copy(checkpoint, models / checkpoint.name)
        linear_path = export_linear(models, args.long_steps)
        flags = ["--models-dir", str(models), "--state-dir", str(state), "--device", args.device]
        flags += ["--sampling-dtype", args.sampling_dtype, "--request-timeout-s", "600"]
        process, base = launch.start_server(flags, args.threads, Path(scratch) / "server.log")
        try:
            model, linear = load_model(checkpoint, device), load_model(linear_path, device)
            with httpx.Client(timeout=600) as session:
                one_request(session, base, model, dtype, args)
                step_cost(session, base, process.pid, linear, dtype, args)
        finally:
            process.terminate()
            process.wait(timeout=120)


if __name__ == "__main__":
    main()
