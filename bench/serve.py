"""Load generator: start the server, drive it at several concurrency levels, print a table.

For each level it prints served throughput (images/s, and for an EBM Langevin chain-steps/s), p50/p99
latency, and, measured in the same run, the raw in-process sampler on the batch the server could form
at that level (concurrency x n chains or samples), so the served/raw ratio is read side by side. The
speedup column compares each level with one request at a time (concurrency 1). GANs and flows are one
pass per request: their work unit is an image (a flow's inverse with its log-density, as served).

    python bench/serve.py --models-dir checkpoints --model ebm_mnist_seed0 --steps 60 --n 4 --levels 1,4,16
    python bench/serve.py --models-dir checkpoints --model glow_mnist --n 16 --levels 1,4,16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.device import pick_device  # noqa: E402
from training.langevin import langevin_step  # noqa: E402
from training.noise import chain_gaussian, chain_start  # noqa: E402
from training.sampler_config import EBMSampler  # noqa: E402
from training.sampling import LoadedModel, load_model, sample_generator  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(models_dir: str, device: str, chain_budget: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    state_dir = tempfile.mkdtemp(prefix="bench-state-")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--port",
            str(port),
            "--models-dir",
            models_dir,
            "--state-dir",
            state_dir,
            "--device",
            device,
            "--chain-budget",
            str(chain_budget),
            "--max-queue",
            "4096",
            "--max-steps",
            "100000",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready in 120 s")


async def drive(base: str, body: dict, concurrency: int, total: int) -> tuple[float, list[float]]:
    """Keep `concurrency` requests in flight until `total` are done; return wall seconds and latencies."""
    latencies: list[float] = []
    remaining = total

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one_client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                reply = await client.post(f"{base}/sample", json=body)
                reply.raise_for_status()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


def raw_chain_steps_per_second(checkpoint: Path, device: torch.device, chains: int, steps: int) -> float:
    """The in-process sampler alone (same step function, same per-chain noise) on one batch of `chains`."""
    model = load_model(checkpoint, device)
    sampler = model.sampler_as(EBMSampler)
    seeds = torch.arange(chains, dtype=torch.int64)
    x = chain_start(seeds, model.shape, sampler, model.data_range).to(device)
    seeds = seeds.to(device)

    def run(count: int) -> None:
        nonlocal x
        for step in range(count):
            eps = chain_gaussian(seeds, torch.full_like(seeds, step), model.shape)
            x = langevin_step(
                model.module,
                x,
                eps,
                sampler.step_size,
                sampler.noise,
                sampler.grad_clip,
                sampler.temperature,
                model.data_range,
                clamp=sampler.clamp,
            ).x
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(3)  # warm-up
    started = time.perf_counter()
    run(steps)
    return chains * steps / (time.perf_counter() - started)


def raw_images_per_second(model: LoadedModel, device: torch.device, batch: int, repeats: int = 3) -> float:
    """A GAN's generator or a flow's inverse with log-density, in process, on one batch of `batch`."""
    seeds = torch.arange(batch, dtype=torch.int64)

    def run() -> None:
        with torch.no_grad():
            if model.config.family == "gan":
                sample_generator(model, seeds)
            else:
                model.module.decode(model.module.base_sample(seeds, 1.0).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return batch * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default="checkpoints")
    parser.add_argument("--model", default="ebm_mnist_seed0")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--n", type=int, default=4, help="samples per request")
    parser.add_argument("--levels", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 4 x level, min 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--chain-budget", type=int, default=1024)
    args = parser.parse_args()

    levels = [int(level) for level in args.levels.split(",")]
    device = pick_device(args.device)
    checkpoint = Path(args.models_dir) / f"{args.model}.safetensors"
    model = load_model(checkpoint, device)
    one_pass = model.config.family != "ebm"
    steps = 1 if one_pass else args.steps
    body = {"model": args.model, "n": args.n, "format": "png"}
    if not one_pass:
        body |= {"steps": args.steps, "init": "noise"}
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none"
    what = "one pass" if one_pass else f"{args.steps} steps"
    print(
        f"# {args.model} ({model.config.family}), {what}, n={args.n} per request, device {device} (GPU: {gpu}; "
        f"{os.cpu_count()} CPU cores, {cpu}; torch {torch.__version__}, threads {torch.get_num_threads()})"
    )

    process, base = start_server(args.models_dir, str(device), args.chain_budget)
    try:
        asyncio.run(drive(base, body, 1, 2))  # warm-up
        rows = []
        for level in levels:
            total = args.requests or max(8, 4 * level)
            wall, latencies = asyncio.run(drive(base, body, level, total))
            served = total * args.n * steps / wall
            rows.append(
                (
                    level,
                    total,
                    total * args.n / wall,
                    served,
                    statistics.median(latencies),
                    sorted(latencies)[max(0, int(0.99 * len(latencies)) - 1)],
                )
            )
    finally:
        process.terminate()
        process.wait(timeout=60)

    unit = "images/s" if one_pass else "chain-steps/s"
    baseline = rows[0][3]
    print(
        f"| concurrency | requests | images/s | {unit} served | raw {unit} (batch) | served/raw "
        "| speedup vs 1 | p50 latency s | p99 latency s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for level, total, images, served, p50, p99 in rows:
        batch = level * args.n
        if one_pass:
            raw = raw_images_per_second(model, device, batch)
        else:
            raw = raw_chain_steps_per_second(checkpoint, device, batch, args.steps)
        print(
            f"| {level} | {total} | {images:.1f} | {served:.0f} | {raw:.0f} ({batch}) | {served / raw:.2f} "
            f"| {served / baseline:.2f}x | {p50:.3f} | {p99:.3f} |"
        )


if __name__ == "__main__":
    main()
