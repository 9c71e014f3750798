"""Reload under load: clients sample a model without pause while its file is replaced, as a training run
overwrites its --out checkpoint at every epoch, and the server's live models directory swaps each version in.

Starts `python -m service` on a copy of CHECKPOINT, runs --clients threads that each POST /sample in a loop,
and replaces the file --replacements times, --every-s apart, each time with the weights nudged (a new
version, written as training writes it: temp file, fsync, rename). It prints the requests answered and
failed (any status but 200, or no answer), how many answers the old version gave after its file was
replaced (requests in flight finish there), and for each replacement the time from the file being complete
to /models listing the new version and to the first answer the new version gave (the issue's target: at
most twice the watch interval, no request failed).

    python bench/reload_under_load.py
    python bench/reload_under_load.py checkpoints/ebm_mnist_seed0.safetensors --clients 16 --replacements 10 \\
        --watch-interval-s 0.5 --steps 10
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import launch  # bench/launch.py, beside this script
import torch

from training.runtime.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Answer:
    finished: float  # time.monotonic() when the answer (or the failure) came
    status: int  # 0: no answer (a transport error)
    version: str | None


def version_of(path: Path) -> str:
    """The version a server serves a file as: its SHA-256 prefix (service/catalogue/registry.py VERSION_CHARS)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def start_server(models_dir: Path, watch_interval_s: float, threads: int, device: str) -> tuple[subprocess.Popen, str]:
    state = tempfile.mkdtemp(prefix="bench-state-")
    flags = ["--models-dir", str(models_dir), "--state-dir", state, "--device", device, "--max-queue", "4096"]
    return launch.start_server([*flags, "--watch-interval-s", str(watch_interval_s)], threads)


def sample_forever(base: str, body: dict, stop: threading.Event, answers: list[Answer]) -> None:
    """One client: POST /sample again as soon as each answer comes, until `stop`."""
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            try:
                reply = client.post(f"{base}/sample", json=body)
                answers.append(Answer(time.monotonic(), reply.status_code, reply.headers.get("x-model-version")))
            except httpx.HTTPError:
                answers.append(Answer(time.monotonic(), 0, None))


def listed(base: str, model: str) -> dict:
    """What /models says of `model` now ({} when it is not listed or the server did not answer)."""
    try:
        models = {item["name"]: item for item in httpx.get(f"{base}/models", timeout=10).json()}
    except httpx.HTTPError:
        return {}
    return models.get(model, {})


def replace(path: Path, generation: int) -> None:
    """Write a new version of the checkpoint, as an epoch's end writes it: weights moved a little, saved atomically."""
    checkpoint = load_checkpoint(path)
    generator = torch.Generator().manual_seed(generation)
    for name, tensor in checkpoint.weights.items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            scale = tensor.float().std() if tensor.numel() > 1 else tensor.float().abs()
            checkpoint.weights[name] = tensor + (1e-3 * scale * noise).to(tensor.dtype)
    save_checkpoint(path, checkpoint)


def seconds(values: list[float]) -> str:
    if not values:
        return "none"
    return f"median {statistics.median(values):.2f} s, max {max(values):.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint",
        nargs="?",
        type=Path,
        default=ROOT / "checkpoints" / "ebm_mnist_seed0.safetensors",
        help="the model to serve and replace (a copy of it is served; default: checkpoints/ebm_mnist_seed0)",
    )
    parser.add_argument("--clients", type=int, default=16, help="threads sampling without pause (default 16)")
    parser.add_argument("--replacements", type=int, default=10, help="new versions written (default 10)")
    parser.add_argument("--every-s", type=float, default=2.0, help="seconds between two versions (default 2)")
    parser.add_argument("--watch-interval-s", type=float, default=0.5, help="the server's rescan interval")
    parser.add_argument("--steps", type=int, default=10, help="Langevin steps per request of an EBM (default 10)")
    parser.add_argument("--n", type=int, default=1, help="samples per request (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server (default 1)")
    parser.add_argument("--device", default="cpu", help="the server's --device (default cpu)")
    args = parser.parse_args()

    models_dir = Path(tempfile.mkdtemp(prefix="bench-models-"))
    served = models_dir / args.checkpoint.name
    shutil.copy2(args.checkpoint, served)
    model = served.stem
    process, base = start_server(models_dir, args.watch_interval_s, args.threads, args.device)
    body = {"model": model, "n": args.n, "steps": args.steps}
    stop = threading.Event()
    answers: list[Answer] = []
    clients = [
        threading.Thread(target=sample_forever, args=(base, body, stop, answers), daemon=True)
        for _ in range(args.clients)
    ]
    try:
        if httpx.post(f"{base}/sample", json=body, timeout=120).status_code != 200:  # what the clients will ask
            raise SystemExit(f"{model} does not answer {body}: choose another checkpoint or --steps")
        for client in clients:
            client.start()
        replaced: list[tuple[float, str, str]] = []  # (file complete, old version, new version)
        loaded_after: list[float] = []
        listed_after: list[float] = []
        for generation in range(1, args.replacements + 1):
            time.sleep(args.every_s)  # the clients keep sampling the current version meanwhile
            old = version_of(served)
            replace(served, generation)
            complete, complete_wall, new = time.monotonic(), datetime.now(UTC), version_of(served)
            while (info := listed(base, model)).get("version") != new:
                if time.monotonic() - complete > 60:
                    raise SystemExit(f"version {new} was not listed within 60 s")
                time.sleep(0.02)
            listed_after.append(time.monotonic() - complete)
            loaded_after.append((datetime.fromisoformat(info["loaded_at"]) - complete_wall).total_seconds())
            replaced.append((complete, old, new))
        time.sleep(args.every_s)  # the last version serves a while too
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=150)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)

    statuses = Counter(answer.status for answer in answers)
    failed = sum(count for status, count in statuses.items() if status != 200)
    served_after, old_after_replaced = [], 0
    for complete, old, new in replaced:
        from_new = [answer.finished for answer in answers if answer.version == new and answer.finished >= complete]
        served_after.extend([min(from_new) - complete] if from_new else [])
        old_after_replaced += sum(1 for answer in answers if answer.version == old and answer.finished > complete)
    print(
        f"reload under load: {args.clients} clients sampling {model} (n {args.n}, {args.steps} steps) while it is "
        f"replaced {len(replaced)} times, {args.every_s:g} s apart; watch interval {args.watch_interval_s:g} s, "
        f"{args.threads} thread(s), {args.device}"
    )
    print(f"requests: {len(answers)} answered, {failed} failed ({dict(sorted(statuses.items()))} by status)")
    print(f"answered by the old version after its file was replaced (in flight or queued): {old_after_replaced}")
    print(f"file complete -> loaded by the server (its loaded_at): {seconds(loaded_after)}")
    print(f"file complete -> /models lists the new version: {seconds(listed_after)}")
    print(f"file complete -> first answer from the new version: {seconds(served_after)}")
    print(f"target: both at most 2 x the watch interval = {2 * args.watch_interval_s:g} s, 0 failed")


if __name__ == "__main__":
    main()
