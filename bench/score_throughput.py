"""POST /score figures: one-pass scores served against the raw in-process rate, and a CNF's bits/dim over HTTP
against `evaluate`'s.

1. One-pass scores (`--models`, default eqm_mnist and glow_mnist): --clients concurrent clients each send
   --requests requests of --images PNG test images (each client its own images); the served rate is images
   scored over the wall time of all requests. The raw rate is `one_pass_scores` and the model's OOD score's
   `ood_statistics` (what the server's pool runs) in this process on the same decoded batches, one batch of
   --images at a time, and on the largest batch the server could form (clients x images). The server runs as
   `python -m service` in a subprocess with --threads torch threads; client and server share the machine, as
   they would on one host. Beside each rate per wall second, the rate per CPU second (the server process's CPU
   time while it served; the raw loop's own): what other load on a shared core does not change, where the
   wall rates of two phases run minutes apart carry it.
2. A CNF (`--cnf`, default cnf_mnist): bits/dim of the first --cnf-images images of evaluate's own test subset
   (seed 0), by `cnf_bits_per_dim` (evaluate's figure: one seeded dequantization draw) and over HTTP (each
   image's dequantization and probes seeded by its pixels), both at rtol = atol = 1e-5 with one probe: the
   means and their standard errors over images.

    taskset -c 0 python bench/score_throughput.py --data-dir ../shared/data/mnist --threads 1
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import launch  # bench/launch.py, beside this script
import numpy as np
import torch
from PIL import Image
from serve import cpu_seconds, per_cpu_second  # bench/serve.py, beside this script

from service.http.memory import heap_blocks, map_large_blocks
from training.runtime.images import decode_exact
from training.runtime.load import load_model
from training.sampling.likelihood import cnf_bits_per_dim
from training.sampling.scoring import one_pass_scores, ood_score_name, ood_statistics, score_family
from training.train.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]


def png_b64(image: torch.Tensor) -> str:
    pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def start_server(models: Path, threads: int) -> tuple[subprocess.Popen, str]:
    flags = ["--models-dir", str(models), "--state-dir", str(models / "state"), "--device", "cpu"]
    return launch.start_server([*flags, "--threads", str(threads), "--score-timeout-s", "3000"], threads)


def served_rate(base: str, bodies: list[list[bytes]], server: subprocess.Popen) -> tuple[float, float]:
    """Images scored a second with one thread per client, each sending its requests (bodies encoded beforehand)
    one after another on a connection of its own; and a CPU second of the server's. The clients' sessions are
    made and connected before the clock starts: an httpx.Client's TLS context alone took 25 ms of CPU, which the
    16 clients spent on the server's core inside the timed run (0.4 ms an image at one request a client)."""
    failures: list[str] = []
    sessions = [httpx.Client(base_url=base, timeout=600) for _ in bodies]
    for session in sessions:
        session.get("/healthz")  # connected: the timed requests open no connection

    def client(session: httpx.Client, requests: list[bytes]) -> None:
        for body in requests:
            answer = session.post("/score", content=body, headers={"content-type": "application/json"})
            if answer.status_code != 200:
                failures.append(answer.text[:200])

    threads = [threading.Thread(target=client, args=pair) for pair in zip(sessions, bodies, strict=True)]
    try:
        cpu_started = cpu_seconds(server)
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        cpu_used = cpu_seconds(server) - cpu_started
    finally:
        for session in sessions:
            session.close()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {failures[0]}")
    images = sum(len(json.loads(body)["images"]) for requests in bodies for body in requests)
    return images / seconds, per_cpu_second(images, cpu_used)


def raw_rate(model_path: Path, batches: list[torch.Tensor], repeats: int = 3) -> tuple[float, float]:
    """Images a second of what the server's pool computes for each batch: the family's scores and the statistics
    the model's OOD score reads (an energy's `typicality`: gradient norms at x and at three perturbations); and a
    CPU second (the best repeat of each). In the server's memory regime (`map_large_blocks`, each pass inside
    `heap_blocks`): in a plain process glow_mnist's pass took 3.1 ms of CPU an image on some runs and 1.5-1.9 on
    others (as glibc's own threshold happened to move), so the raw rate was sometimes half the server's own."""
    map_large_blocks()
    model = load_model(model_path, torch.device("cpu"))
    family = score_family(model)
    ood = ood_score_name(model, family)

    def scores(batch: torch.Tensor) -> None:
        with heap_blocks():  # as the server's pool runs each pass (service/http/memory.py)
            ood_statistics(ood, [model], batch, None, one_pass_scores(family, [model], batch, None))

    scores(batches[0])  # warm-up
    best = best_cpu = math.inf
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        for batch in batches:
            scores(batch)
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - cpu_started)
    images = sum(len(batch) for batch in batches)
    return images / best, per_cpu_second(images, best_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="MNIST IDX files")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints", help="where the models are")
    parser.add_argument("--models", default="eqm_mnist,glow_mnist", help="one-pass models, comma-separated")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--images", type=int, default=64, help="PNG images a request")
    parser.add_argument("--requests", type=int, default=4, help="requests each client sends")
    parser.add_argument("--cnf", default="cnf_mnist", help="the CNF whose bits/dim is compared ('' skips it)")
    parser.add_argument("--cnf-images", type=int, default=10, help="test images of the CNF comparison")
    parser.add_argument(
        "--beside",
        type=int,
        default=0,
        help="also time a 4-chain CNF sample alone and while this many clients keep 64-image score requests of it "
        "running (0: not)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in this process and the server")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    test = load_dataset("mnist", args.data_dir, "test")
    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s), cpu",
        "clients": args.clients,
        "images_a_request": args.images,
        "requests_a_client": args.requests,
    }
    work = Path(tempfile.mkdtemp(prefix="score_bench_"))
    try:
        models = work / "models"
        models.mkdir()
        names = [name for name in args.models.split(",") if name] + ([args.cnf] if args.cnf else [])
        for name in names:
            shutil.copy(args.checkpoints / f"{name}.safetensors", models / f"{name}.safetensors")
        server, base = start_server(models, args.threads)
        try:
            count = args.clients * args.requests * args.images
            images = [png_b64(image) for image in test.images[:count]]
            shape = tuple(test.images.shape[1:])
            decoded = torch.stack([decode_exact(base64.b64decode(text), shape) for text in images])
            batches = list(decoded.split(args.images))
            for name in [name for name in args.models.split(",") if name]:
                bodies = [
                    [
                        json.dumps({"model": name, "images": images[start : start + args.images]}).encode()
                        for start in range(client * args.requests * args.images, (client + 1) * args.requests *
                                           args.images, args.images)
                    ]
                    for client in range(args.clients)
                ]  # fmt: skip
                served_rate(base, [requests[:1] for requests in bodies], server)  # warm-up
                served, served_cpu = served_rate(base, bodies, server)
                raw, raw_cpu = raw_rate(models / f"{name}.safetensors", batches)
                largest = list(decoded.split(args.clients * args.images))
                raw_largest, raw_largest_cpu = raw_rate(models / f"{name}.safetensors", largest)
                report[name] = {
                    "served_images_per_s": round(served, 1),
                    "raw_images_per_s": round(raw, 1),
                    "raw_images_per_s_largest_batch": round(raw_largest, 1),
                    "served_over_raw": round(served / raw, 3),
                    "served_over_raw_largest_batch": round(served / raw_largest, 3),
                    "served_images_per_server_cpu_s": round(served_cpu, 1),
                    "raw_images_per_cpu_s": round(raw_cpu, 1),
                    "raw_images_per_cpu_s_largest_batch": round(raw_largest_cpu, 1),
                    "served_over_raw_cpu": round(served_cpu / raw_cpu, 3),
                }
                print(json.dumps({name: report[name]}), file=sys.stderr, flush=True)
            if args.cnf and args.cnf_images:
                report[args.cnf] = cnf_comparison(base, models / f"{args.cnf}.safetensors", test.images, args)
            if args.cnf and args.beside:
                report[f"{args.cnf}_sample_beside_scores"] = sample_beside_scores(base, args.cnf, images, args)
        finally:
            server.terminate()
            server.wait(timeout=60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


def sample_beside_scores(base: str, name: str, images: list[str], args: argparse.Namespace) -> dict:
    """A short sample's seconds alone and beside --beside clients each running a 64-image CNF score request
    (the median of 3 each; the score requests are left running and end with the server)."""

    def timed_samples() -> float:
        seconds = []
        for seed in range(3):
            started = time.perf_counter()
            httpx.post(f"{base}/sample", json={"model": name, "n": 4, "seed": seed}, timeout=600).raise_for_status()
            seconds.append(time.perf_counter() - started)
        return sorted(seconds)[1]

    alone = timed_samples()

    def client(index: int) -> None:
        try:
            body = {"model": name, "images": images[index * 64 : index * 64 + 64]}
            httpx.post(f"{base}/score", json=body, timeout=3000)
        except httpx.HTTPError:
            pass  # the server ends first

    for index in range(args.beside):
        threading.Thread(target=client, args=(index,), daemon=True).start()
    time.sleep(5)  # admitted, their solves started
    beside = timed_samples()
    return {"clients": args.beside, "alone_s": round(alone, 3), "beside_s": round(beside, 3), "ratio": beside / alone}


def cnf_comparison(base: str, path: Path, test_images: torch.Tensor, args: argparse.Namespace) -> dict:
    """evaluate's bits/dim of the images against POST /score's, on evaluate's own test subset (seed 0)."""
    order = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(1))  # evaluate's, seed 0
    images = test_images[order[: args.cnf_images]]
    model = load_model(path, torch.device("cpu"))
    started = time.perf_counter()
    figure = cnf_bits_per_dim(model.module, images, seed=0).report()
    evaluate_seconds = time.perf_counter() - started
    started = time.perf_counter()
    answer = httpx.post(
        f"{base}/score", json={"model": path.stem, "images": [png_b64(image) for image in images]}, timeout=3000
    )
    answer.raise_for_status()
    served = np.array([result["bits_per_dim"] for result in answer.json()["results"]])
    return {
        "n": len(images),
        "evaluate_bits_per_dim": figure["bits_per_dim"],
        "evaluate_standard_error": figure["standard_error"],
        "evaluate_seconds_per_image": round(evaluate_seconds / len(images), 2),
        "served_bits_per_dim": round(float(served.mean()), 4),
        "served_standard_error": round(float(served.std(ddof=1) / math.sqrt(len(served))), 4),
        "served_seconds_per_image": round((time.perf_counter() - started) / len(images), 2),
        "difference": round(float(served.mean()) - figure["bits_per_dim"], 4),
        "likelihood": answer.json()["likelihood"],
    }


if __name__ == "__main__":
    main()
