"""Serving at the IGEBM paper's sizes: random-weight ResNet energies at 3 x 32², 3 x 64² and 3 x 128², each
exported as a user would (torch.export program and JSON sidecar) with a full replay buffer, served, and driven.

    python bench/scale.py --sizes 32,64,128 --sampling-dtype float32
    python bench/scale.py --sizes 32,64,128 --device cuda --buffer-slots 10000 --requests 32

For each size it prints one row: the raw in-process Langevin loop's chain-steps/s (batch n), the server's
chain-steps/s and p50/p99 latency at concurrency 1 and 8 (requests of n chains from noise, not written back),
the replay buffer (slots, MiB held), how long one save of it took (from the server's log) and a short request's
latency while saves run against alone, and the server's resident memory: after start, at its peak, and idle
after the load. Keep runs short: every figure is a median or a percentile of --requests requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import launch  # bench/launch.py, beside this script
import torch
from torch import nn

from service.catalogue.buffer_store import BUFFER_DTYPE, BufferStore
from training.runtime.buffer_names import group_digest, model_digest
from training.runtime.draw import sample_ebm
from training.runtime.load import load_model, read_model_files
from training.sampling.noise import chain_seeds
from training.sampling.replay_buffer import ReplayBuffer

ROOT = Path(__file__).resolve().parents[1]

MiB = 2**20


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(nn.functional.silu(self.conv1(nn.functional.silu(x))))


class ResNetEnergy(nn.Module):
    """IGEBM-style energy: a conv stem, residual blocks with average pooling down to 4 x 4, a linear head."""

    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
        side = size
        while side > 4:
            layers += [ResidualBlock(width), nn.AvgPool2d(2)]
            side //= 2
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, size, size] -> [B]
        return self.head(nn.functional.silu(self.body(x)).flatten(1)).squeeze(1)


def export_energy(folder: Path, size: int, width: int, slots: int) -> tuple[Path, int]:
    """The README's recipe: torch.export with a dynamic batch, torch.export.save, a sidecar; and its parameters."""
    torch.manual_seed(size)
    module = ResNetEnergy(size, width).eval()
    path = folder / f"resnet{size}.pt2"
    example = (torch.zeros(2, 3, size, size),)
    program = torch.export.export(module, example, dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, path)
    sidecar = {
        "family": "ebm",
        "data": {"shape": [3, size, size], "range": [-1.0, 1.0]},
        "sampler": {"steps": 60, "step_size": 10.0, "noise": 0.005, "init": "buffer", "buffer_capacity": slots},
    }
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path, sum(parameter.numel() for parameter in module.parameters())


def fill_buffer(state_dir: Path, path: Path, shape: tuple[int, ...], slots: int) -> float:
    """A full saved buffer for the model, under the key the server reads it by; the seconds the save took."""
    digest = group_digest([model_digest(read_model_files(path, path.parent).digested)])
    buffer = ReplayBuffer(shape, slots, dtype=BUFFER_DTYPE)
    for start in range(0, slots, 256):
        count = min(256, slots - start)
        buffer.write_back(torch.full((count,), -1), torch.rand(count, *shape) * 2 - 1)
    started = time.perf_counter()
    BufferStore(state_dir).save(path.stem, digest, buffer)
    return time.perf_counter() - started


def raw_chain_steps(path: Path, device: str, n: int, steps: int) -> float:
    """Chain-steps/s of the in-process loop (training/runtime/draw.py) on n chains from noise."""
    model = load_model(path, torch.device(device))
    seeds = chain_seeds(0, n)
    sample_ebm([model], seeds, steps=2, init="noise")  # warm
    started = time.perf_counter()
    sample_ebm([model], seeds, steps=steps, init="noise")
    return n * steps / (time.perf_counter() - started)


def memory(pid: int) -> tuple[int, int]:
    """(resident, peak resident) bytes of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def start_server(models: Path, state: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    flags = ["--models-dir", str(models), "--state-dir", str(state), "--device", args.device]
    flags += ["--sampling-dtype", args.sampling_dtype, "--buffer-save-interval-s", str(args.save_interval_s)]
    flags += ["--request-timeout-s", "3600", "--buffer-budget-mb", "4096", "--max-queue", "4096"]
    return launch.start_server(flags, args.threads, log)


async def drive(base: str, body: dict, concurrency: int, total: int) -> tuple[float, list[float]]:
    """`total` requests, `concurrency` at a time: (wall seconds, each latency)."""
    latencies: list[float] = []
    queue = list(range(total))

    async def client(session: httpx.AsyncClient) -> None:
        while queue:
            queue.pop()
            started = time.perf_counter()
            reply = await session.post(f"{base}/sample", json=body)
            reply.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=3600) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def saves_in(log: Path) -> list[float]:
    """Seconds each buffer save took, from the server's log lines."""
    return [float(ms) / 1000 for ms in re.findall(r"saved replay buffer .* in (\d+) ms", log.read_text())]


def measure(size: int, args: argparse.Namespace, scratch: Path) -> dict:
    models, state = scratch / f"models{size}", scratch / f"state{size}"
    models.mkdir()
    state.mkdir()
    path, parameters = export_energy(models, size, args.width, args.buffer_slots)
    fill_s = fill_buffer(state, path, (3, size, size), args.buffer_slots)
    raw = raw_chain_steps(path, args.device, args.n, args.steps)
    log = scratch / f"server{size}.log"
    process, base = start_server(models, state, args, log)
    try:
        started_rss, _ = memory(process.pid)
        short = {"model": path.stem, "n": args.n, "steps": args.steps, "init": "noise", "seed": 1}
        asyncio.run(drive(base, short, 1, 1))  # warm
        row: dict = {"size": size, "parameters": parameters, "raw": raw, "fill_s": fill_s, "start_rss": started_rss}
        for concurrency in (1, 8):
            wall, latencies = asyncio.run(drive(base, short, concurrency, args.requests))
            row[f"c{concurrency}"] = (args.n * args.steps * args.requests / wall, *sorted(latencies))
            row[f"p50_{concurrency}"] = statistics.median(latencies)
            row[f"p99_{concurrency}"] = percentile(latencies, 0.99)
        info = next(model for model in httpx.get(f"{base}/models").json() if model["name"] == path.stem)
        row["buffer"] = (info["buffer_size"], info["buffer_capacity"], (info["buffer_bytes"] or 0) / MiB)
        # The stall: one request that writes back makes the buffer dirty; short requests run while it saves.
        dirty = {"model": path.stem, "n": 1, "steps": 1, "init": "buffer", "seed": 2}
        before = len(saves_in(log))
        asyncio.run(drive(base, dirty, 1, 1))
        during: list[float] = []
        deadline = time.monotonic() + args.stall_window_s
        while len(saves_in(log)) == before and time.monotonic() < deadline:
            during += asyncio.run(drive(base, short, 1, 1))[1]
        saves = saves_in(log)[before:]
        row["save_s"] = saves[0] if saves else float("nan")
        row["during"] = (statistics.median(during), max(during), len(during)) if during else (float("nan"),) * 3
        row["peak_rss"] = memory(process.pid)[1]
        time.sleep(2)
        row["idle_rss"] = memory(process.pid)[0]
    finally:
        process.terminate()
        process.wait(timeout=120)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,64,128", help="image sides, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sampling-dtype", default="float32", help="as the server's --sampling-dtype")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--width", type=int, default=64, help="ResNet channels (64: 0.3 M to 0.5 M parameters)")
    parser.add_argument("--n", type=int, default=4, help="chains a request")
    parser.add_argument("--steps", type=int, default=10, help="Langevin steps a request")
    parser.add_argument("--requests", type=int, default=8, help="requests at each concurrency")
    parser.add_argument("--buffer-slots", type=int, default=10_000, help="the replay buffer's capacity, full")
    parser.add_argument("--save-interval-s", type=float, default=1.0, help="the server's --buffer-save-interval-s")
    parser.add_argument("--stall-window-s", type=float, default=120.0, help="most seconds to wait for a save")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, {args.sampling_dtype}, {args.threads} thread(s), n {args.n}, {args.steps} steps")
    header = (
        "| size | params | raw chain-steps/s | served c1 (p50/p99 s) | served c8 (p50/p99 s) | c8/c1 | buffer slots "
        "(MiB) | one save | short request alone / during saves (max) | RSS start / peak / idle MiB |"
    )
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch:
        for size in [int(side) for side in args.sizes.split(",")]:
            row = measure(size, args, Path(scratch))
            c1, c8 = row["c1"][0], row["c8"][0]
            size_text, slots, held = f"3x{size}²", row["buffer"][1], row["buffer"][2]
            print(
                f"| {size_text} | {row['parameters'] / 1e6:.2f} M | {row['raw']:.0f} | "
                f"{c1:.0f} ({row['p50_1']:.2f}/{row['p99_1']:.2f}) | "
                f"{c8:.0f} ({row['p50_8']:.2f}/{row['p99_8']:.2f}) | "
                f"{c8 / c1:.2f} | {slots:,} ({held:.0f}) | {row['save_s']:.1f} s | "
                f"{row['p50_1']:.2f} / {row['during'][0]:.2f} ({row['during'][1]:.2f}) s, "
                f"{row['during'][2]} requests | "
                f"{row['start_rss'] / MiB:.0f} / {row['peak_rss'] / MiB:.0f} / {row['idle_rss'] / MiB:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
