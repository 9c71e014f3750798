"""Load generator: start the server, drive it at several concurrency levels, print a table.

For each level it prints served throughput (images/s, and for an EBM Langevin chain-steps/s), p50/p99
latency, and, measured in the same run, the raw in-process sampler on the batch the server could form
at that level (concurrency x n chains or samples), so the served/raw ratio is read side by side. The
speedup column compares each level with one request at a time (concurrency 1). GANs and flows are one
pass per request: their work unit is an image (a flow's inverse with its log-density, as served); a CNF's
requests take the checkpoint's ODE steps, served as batched chains, its raw figure the CLI's solver on the batch.

For an EBM it then prints the "short beside long" row: the latency of a short request (--steps, --n) alone,
and again while --beside-long requests of --long-steps each are running, with their ratio (what fair
scheduling keeps small), the long requests' slowest and fastest latency (none starved) and the chain-steps/s
of the mix. --sweep runs the highest level and that row once per per-step chain budget (--step-budget),
one server each: the budget's default on a device is where the saturated throughput stops rising.

    python bench/serve.py --models-dir checkpoints --model ebm_mnist_seed0 --steps 60 --n 4 --levels 1,4,16
    python bench/serve.py --model ebm_mnist_seed0 --threads 1 --levels 16 --sweep 8,16,32,64,128
    python bench/serve.py --models-dir checkpoints --model glow_mnist --n 16 --levels 1,4,16
    python bench/serve.py --model ebm_mnist_seed0 --engine ray --replicas 2 --replica-cpus 1 --levels 1,4,16

With --engine ray the server is `python -m service --engine ray` on a local Ray cluster, requests name their
model in the `serve_multiplexed_model_id` header (the routing hint, see service/ray_engine.py), the server's
CPU-seconds are those of the whole process tree (Ray's own processes and every replica), and a line counts the
answers of each replica (X-Replica).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import launch  # bench/launch.py, beside this script
import torch

from training.families import family_of
from training.runtime.device import SAMPLING_DTYPE_CHOICES, chain_precision, dtype_name, pick_device, sampling_dtype
from training.runtime.draw import sample_cnf, sample_ebm, sample_generator
from training.runtime.load import load_model
from training.runtime.loaded import LoadedModel
from training.sampling.sampler_config import EBMSampler

ROOT = Path(__file__).resolve().parents[1]

HEADERS: dict[str, str] = {}  # sent with every POST /sample (the Ray routing hint)
ANSWERED_BY: Counter[str] = Counter()  # X-Replica of every answer


def start_server(
    checkpoint: Path,
    device: str,
    chain_budget: int,
    step_budget: int = 0,
    threads: int = 0,
    engine: tuple[str, ...] = (),
    sampling_dtype: str = "auto",
) -> tuple[subprocess.Popen, str]:
    """A server for this one checkpoint (a directory of its own: the others would only slow its start)."""
    state_dir = tempfile.mkdtemp(prefix="bench-state-")
    models_dir = tempfile.mkdtemp(prefix="bench-models-")
    shutil.copy2(checkpoint, Path(models_dir) / checkpoint.name)  # a link out of the models dir is not served
    flags = ["--models-dir", models_dir, "--state-dir", state_dir, "--device", device]
    flags += ["--chain-budget", str(chain_budget), "--max-queue", "4096", "--max-steps", "100000"]
    flags += ["--request-timeout-s", "3600"]  # a bench of slow models on a loaded machine measures rates
    flags += [*(["--step-budget", str(step_budget)] if step_budget else []), "--sampling-dtype", sampling_dtype]
    replicas = int(engine[engine.index("--replicas") + 1]) if "--replicas" in engine else 1
    return launch.start_server([*flags, *engine], threads or None, ready_within_s=240, replicas=replicas)


def per_cpu_second(work: float, cpu_used: float) -> float:
    """Work per CPU-second; NaN when the interval is under one clock tick (a tiny run), where a ratio means nothing."""
    return work / cpu_used if cpu_used > 0 else float("nan")


def cpu_seconds(process: subprocess.Popen) -> float:
    """CPU time the server and the processes it started (a Ray cluster's) have used (Linux /proc; NaN elsewhere):
    work per CPU-second is what a shared machine's other load does not change, where work per wall second is."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    if process.pid not in used:
        return float("nan")
    tree, grew = {process.pid}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree, grew = tree | children, bool(children)
    return sum(used[pid] for pid in tree)


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
                reply = await client.post(f"{base}/sample", json=body, headers=HEADERS)
                reply.raise_for_status()
                ANSWERED_BY[reply.headers.get("x-replica", "local")] += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


async def timed_post(client: httpx.AsyncClient, url: str, body: dict) -> float:
    started = time.perf_counter()
    reply = await client.post(url, json=body, headers=HEADERS)
    reply.raise_for_status()
    return time.perf_counter() - started


@dataclass
class BesideLong:
    solo: float  # median latency of the short request alone (before and after), s
    beside: float  # median latency of the short request while the long ones run, s
    long_slowest: float  # s
    long_fastest: float  # s
    chain_steps_per_s: float  # of the whole mix, long and short
    per_cpu_second: float  # the mix's chain-steps per CPU-second of the server


async def short_beside_long(
    base: str, short: dict, long: dict, longs: int, cpu: Callable[[], float], shorts: int = 5
) -> BesideLong:
    """Time `shorts` short requests one after another while `longs` long requests run, and alone before and after."""
    url = f"{base}/sample"
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=longs + 1)) as client:
        solo = [await timed_post(client, url, short) for _ in range(shorts)]
        started, cpu_started = time.perf_counter(), cpu()
        running = [asyncio.create_task(timed_post(client, url, long)) for _ in range(longs)]
        await asyncio.sleep(0.5)  # every long request admitted and stepping
        beside = [await timed_post(client, url, short) for _ in range(shorts)]
        long_latencies = await asyncio.gather(*running)
        wall, cpu_used = time.perf_counter() - started, cpu() - cpu_started
        solo += [await timed_post(client, url, short) for _ in range(shorts)]  # a shared machine drifts
    work = longs * long["n"] * long["steps"] + shorts * short["n"] * short["steps"]
    return BesideLong(
        statistics.median(solo),
        statistics.median(beside),
        max(long_latencies),
        min(long_latencies),
        work / wall,
        per_cpu_second(work, cpu_used),
    )


@dataclass
class RawChains:
    images_per_s: float
    chain_steps_per_s: float  # steps the chains actually ran (a per-chain stop ends some early)
    mean_steps: float  # per chain


def raw_chains(
    checkpoint: Path,
    device: torch.device,
    chains: int,
    steps: int | None,
    tolerance: float | None,
    dtype: torch.dtype = torch.float32,
) -> RawChains:
    """The in-process sampler alone on one batch of `chains`: `sample_ebm`, the computation the server runs for a
    request without a label (each seed's class, the checkpoint's guidance, members and clamp; `steps` and
    `tolerance` as the requests ask, None: the checkpoint's), so served/raw compares the same work."""
    model = load_model(checkpoint, device)
    if tolerance is not None:
        model.sampler = dataclasses.replace(model.sampler_as(EBMSampler), tolerance=tolerance)
    seeds = torch.arange(chains, dtype=torch.int64)

    def run(count: int | None) -> torch.Tensor:
        taken = torch.zeros(chains, dtype=torch.int64)
        with chain_precision(device, dtype):
            sample_ebm([model], seeds, count, "noise", chain_steps=taken)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return taken

    run(3)  # warm-up
    started = time.perf_counter()
    taken = run(steps)
    wall = time.perf_counter() - started
    return RawChains(chains / wall, float(taken.sum()) / wall, float(taken.double().mean()))


def raw_images_per_second(
    model: LoadedModel, device: torch.device, batch: int, repeats: int = 3, dtype: torch.dtype = torch.float32
) -> float:
    """A GAN's generator, a flow's inverse with log-density or a CNF's ODE, in process, on one batch of `batch`."""
    seeds = torch.arange(batch, dtype=torch.int64)

    def run() -> None:
        with torch.no_grad():
            if model.config.family == "gan":
                sample_generator(model, seeds, dtype=dtype)
            elif family_of(model).name == "cnf":  # a CNF: the CLI's ODE from its prior, the checkpoint's steps
                sample_cnf(model, seeds, dtype=dtype)
            else:
                model.module.decode(model.module.base_sample(seeds, 1.0).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return batch * repeats / (time.perf_counter() - started)


Row = tuple[int, int, float, float, float, float]  # level, requests, images/s, images per server CPU-s, p50, p99


def measure(
    args: argparse.Namespace, checkpoint: Path, body: dict, levels: list[int], step_budget: int, model_steps: int
) -> tuple[list[Row], BesideLong | None]:
    """One server: every concurrency level, then (for an EBM) the short-beside-long row."""
    engine = ("--engine", args.engine, "--replicas", str(args.replicas), "--replica-cpus", str(args.replica_cpus))
    process, base = start_server(
        checkpoint, args.device, args.chain_budget, step_budget, args.threads, engine, args.sampling_dtype
    )
    try:
        asyncio.run(drive(base, body, 1, 2))  # warm-up
        rows = []
        for level in levels:
            total = args.requests or max(8, 4 * level)
            cpu_started = cpu_seconds(process)
            wall, latencies = asyncio.run(drive(base, body, level, total))
            images = total * args.n
            per_cpu = per_cpu_second(images, cpu_seconds(process) - cpu_started)
            p99 = sorted(latencies)[max(0, int(0.99 * len(latencies)) - 1)]
            rows.append((level, total, images / wall, per_cpu, statistics.median(latencies), p99))
        beside = None
        if "init" in body and args.beside_long:  # fixed steps, so the mix's work is known
            short = body | {"steps": args.steps or model_steps, "tolerance": 0}
            long = short | {"steps": args.long_steps}
            beside = asyncio.run(short_beside_long(base, short, long, args.beside_long, lambda: cpu_seconds(process)))
    finally:
        process.terminate()
        process.wait(timeout=60)
    return rows, beside


def beside_cells(beside: BesideLong) -> str:
    return (
        f"{beside.solo:.3f} | {beside.beside:.3f} | {beside.beside / beside.solo:.2f}x | {beside.long_slowest:.1f} "
        f"| {beside.long_fastest:.1f} | {beside.chain_steps_per_s:.0f} | {beside.per_cpu_second:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default="checkpoints")
    parser.add_argument("--model", default="ebm_mnist_seed0")
    parser.add_argument("--steps", type=int, default=0, help="EBM steps per request (default: the checkpoint's)")
    parser.add_argument(
        "--tolerance", type=float, default=None, help="EBM per-chain stop (default: the checkpoint's; 0: fixed steps)"
    )
    parser.add_argument("--n", type=int, default=4, help="samples per request")
    parser.add_argument("--levels", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 4 x level, min 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--chain-budget", type=int, default=1024)
    parser.add_argument("--step-budget", type=int, default=0, help="chains per step (default: the server's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads, here and in the server (default: all)")
    parser.add_argument(
        "--sampling-dtype", choices=SAMPLING_DTYPE_CHOICES, default="auto", help="the server's, and the raw loop's"
    )
    parser.add_argument("--beside-long", type=int, default=16, help="long requests beside the short one (0: no row)")
    parser.add_argument("--long-steps", type=int, default=1000, help="steps of each long request")
    parser.add_argument("--sweep", default="", help="comma-separated step budgets: one server and row each")
    parser.add_argument("--engine", default="local", choices=["local", "ray"], help="python -m service --engine")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of --engine ray")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    parser.add_argument("--no-model-header", action="store_true", help="ray: no routing hint (routed by load)")
    args = parser.parse_args()
    if args.engine == "ray" and not args.no_model_header:
        from service.ray_engine import MODEL_HEADER  # needs the ray extra, as --engine ray does

        HEADERS[MODEL_HEADER] = args.model

    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(level) for level in args.levels.split(",")]
    device = pick_device(args.device)
    args.device = str(device)
    dtype = sampling_dtype(args.sampling_dtype, device)
    checkpoint = Path(args.models_dir) / f"{args.model}.safetensors"
    model = load_model(checkpoint, device)
    one_pass = model.config.family != "ebm"
    body = {"model": args.model, "n": args.n, "format": "png"}
    if not one_pass:
        body |= {"init": "noise"}
        if args.steps:
            body |= {"steps": args.steps}
        if args.tolerance is not None:
            body |= {"tolerance": args.tolerance}
    sampler = model.sampler_as(EBMSampler) if not one_pass else None
    model_steps = sampler.steps if sampler is not None else 1
    steps = args.steps or model_steps
    tolerance = (sampler.tolerance if args.tolerance is None else args.tolerance) if sampler is not None else 0.0
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none"
    cnf_steps = model.sampler.steps if family_of(model).name == "cnf" else None  # a CNF's ODE solver steps
    what = "one pass" if one_pass else f"at most {steps} steps, tolerance {tolerance:g}"
    if cnf_steps:
        what = f"{cnf_steps} {model.sampler.solver} ODE steps (the checkpoint's)"
    print(
        f"# {args.model} ({model.config.family}), {what}, n={args.n} per request, device {device} (GPU: {gpu}; "
        f"{os.cpu_count()} CPU cores, {cpu}; torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"chain steps in {dtype_name(dtype)}; engine {args.engine}"
        + (
            f", {args.replicas} replicas, model header {'no' if args.no_model_header else 'yes'})"
            if args.engine == "ray"
            else ")"
        )
    )
    beside_head = (
        "short alone s | short beside long s | beside/alone | long slowest s | long fastest s | mix chain-steps/s "
        "| mix per server CPU-s"
    )
    beside_what = f"{steps} fixed steps, n {args.n}, beside {args.beside_long} x {args.long_steps} steps"

    if args.sweep:
        level = max(levels)
        print(f"| step budget | images/s at concurrency {level} | per server CPU-s | p50 latency s | {beside_head} |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for budget in (int(each) for each in args.sweep.split(",")):
            rows, beside = measure(args, checkpoint, body, [level], budget, model_steps)
            cells = beside_cells(beside) if beside else "- | - | - | - | - | - | -"
            _, _, images, per_cpu, p50, _ = rows[0]
            print(f"| {budget} | {images:.1f} | {per_cpu:.1f} | {p50:.3f} | {cells} |", flush=True)
        return

    rows, beside = measure(args, checkpoint, body, levels, args.step_budget, model_steps)
    baseline = rows[0][2]
    # Served chain-steps/s = served images/s x the raw run's mean steps per chain (the same computation).
    print(
        "| concurrency | requests | images/s served | raw images/s (batch) | served/raw | chain-steps/s served "
        "| mean steps per chain | images per server CPU-s | speedup vs 1 | p50 latency s | p99 latency s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for level, total, images, per_cpu, p50, p99 in rows:
        batch = level * args.n
        if one_pass:
            raw_images, mean_steps = raw_images_per_second(model, device, batch, dtype=dtype), float(cnf_steps or 1)
        else:
            raw = raw_chains(checkpoint, device, batch, args.steps or None, args.tolerance, dtype)
            raw_images, mean_steps = raw.images_per_s, raw.mean_steps
        print(
            f"| {level} | {total} | {images:.2f} | {raw_images:.2f} ({batch}) | {images / raw_images:.2f} "
            f"| {images * mean_steps:.0f} | {mean_steps:.1f} | {per_cpu:.2f} | {images / baseline:.2f}x "
            f"| {p50:.3f} | {p99:.3f} |"
        )
    if beside:
        print(f"\n| short beside long | {beside_head} |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {beside_what} | {beside_cells(beside)} |")
    if args.engine == "ray":
        print(
            "\nanswers per replica (X-Replica): " + ", ".join(f"{name} {count}" for name, count in ANSWERED_BY.items())
        )


if __name__ == "__main__":
    main()
