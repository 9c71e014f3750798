"""Reload storm: how much a crowd calling POST /models/reload slows sampling (issue 37; target: a 1-image
sample's median within 3x its time alone).

Starts `python -m service` (no API key: anyone may call the reload route) on a copy of CHECKPOINT, with
--junk files beside it that are not models the server serves (refused once, then left alone), and measures
the median time of a 1-image PNG sample (a GAN's plain pass by default: --steps 0) alone, then while
--clients clients (asyncio, one connection each) call POST /models/reload in a loop. Prints both medians,
their ratio, and how many reloads were answered.

    python bench/reload_storm.py
    python bench/reload_storm.py checkpoints/ebm_mnist_seed0.safetensors --clients 64 --junk 3000 --samples 100
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import launch  # bench/launch.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


def start_server(models_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    flags = ["--models-dir", str(models_dir), "--state-dir", tempfile.mkdtemp(prefix="bench-state-")]
    return launch.start_server([*flags, "--device", "cpu", "--watch-interval-s", "0"], threads)


async def sample_times(client: httpx.AsyncClient, model: str, count: int, steps: int | None) -> list[float]:
    """Seconds of `count` 1-image PNG samples, one after another (`steps`: the request's, None: the model's)."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        body = {"model": model, "n": 1, "format": "png", **({"steps": steps} if steps is not None else {})}
        answer = await client.post("/sample", json=body)
        answer.raise_for_status()
        times.append(time.perf_counter() - started)
    return times


async def storm(base: str, model: str, clients: int, samples: int, steps: int | None) -> tuple[list[float], int, int]:
    """Sample times while `clients` call POST /models/reload in a loop; reloads answered, and failed."""
    stop = asyncio.Event()
    answered = failed = 0

    async def reload_loop() -> None:
        nonlocal answered, failed
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            while not stop.is_set():
                try:
                    ok = (await client.post("/models/reload")).status_code == 200
                except httpx.TransportError:
                    ok = False
                answered, failed = answered + ok, failed + (not ok)

    tasks = [asyncio.create_task(reload_loop()) for _ in range(clients)]
    await asyncio.sleep(1.0)  # the storm is under way
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        times = await sample_times(client, model, samples, steps)
    stop.set()
    await asyncio.gather(*tasks)
    return times, answered, failed


async def measure(base: str, model: str, clients: int, samples: int, steps: int | None) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        await sample_times(client, model, 5, steps)  # warm up
        alone = await sample_times(client, model, samples, steps)
    during, answered, failed = await storm(base, model, clients, samples, steps)
    quiet, loud = statistics.median(alone), statistics.median(during)
    print(f"1-image sample median alone: {quiet * 1000:.1f} ms ({samples} samples)")
    print(f"1-image sample median with {clients} clients calling POST /models/reload: {loud * 1000:.1f} ms")
    print(f"ratio: {loud / quiet:.2f}x (target: at most 3x); reloads answered: {answered}, failed: {failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path, default=ROOT / "checkpoints" / "dcgan_mnist.safetensors")
    parser.add_argument("--clients", type=int, default=64, help="clients calling POST /models/reload in a loop")
    parser.add_argument("--junk", type=int, default=0, help="files beside the model that are not served")
    parser.add_argument("--samples", type=int, default=100, help="1-image samples timed alone and during the storm")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument(
        "--steps", type=int, default=0, help="the request's steps (0: a GAN's plain pass; -1: the model's default)"
    )
    args = parser.parse_args()
    args.steps = None if args.steps < 0 else args.steps
    with tempfile.TemporaryDirectory(prefix="bench-models-") as folder:
        models = Path(folder)
        shutil.copy2(args.checkpoint, models / args.checkpoint.name)
        for index in range(args.junk):
            (models / f"junk{index:05d}.safetensors").write_bytes(b"not a checkpoint")
        process, base = start_server(models, args.threads)
        try:
            asyncio.run(measure(base, args.checkpoint.stem, args.clients, args.samples, args.steps))
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
