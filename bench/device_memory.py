"""What one wide request costs the server's memory: a random-weight ResNet energy (bench/scale.py's, exported as a
user would), served with --max-n and --chain-budget raised to the request's n, and one request of n chains from
noise; prints the server's resident memory at start, its peak, just after the answer and idle (--idle-s later: the
worker gives freed memory back once its chains run out), the request's time, and a digest of its images (the same
digest: the same PNGs).

    python bench/device_memory.py --size 32 --n 1024 --steps 1                        # --device-budget-mb 512
    python bench/device_memory.py --size 32 --n 1024 --steps 1 --device-budget-mb none  # no bound
    python bench/device_memory.py --size 32 --n 1024 --steps 1 --code /path/to/checkout # another version's server
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from launch import free_port  # bench/launch.py, beside this script
from scale import export_energy, memory  # bench/scale.py: the same models

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def serve(code: Path, models: Path, flags: list[str], threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m service` of the checkout at `code`, once /readyz answers."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--port", str(port), "--models-dir", str(models), *flags]
    environment = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads)}
    with log.open("w") as stderr:
        process = subprocess.Popen(command, cwd=code, env=environment, stdout=subprocess.DEVNULL, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server was not ready in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="image side of the 3-channel energy")
    parser.add_argument("--width", type=int, default=64, help="ResNet channels (bench/scale.py's)")
    parser.add_argument("--n", type=int, default=1024, help="chains of the one request")
    parser.add_argument("--steps", type=int, default=1, help="its Langevin steps")
    parser.add_argument("--device-budget-mb", default=None, help="the server's (unset: its default; none: no bound)")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose server runs")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--idle-s", type=float, default=3.0, help="seconds after the answer to read idle memory at")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-device-memory-"))
    models, state = scratch / "models", scratch / "state"
    models.mkdir()
    _, parameters = export_energy(models, args.size, args.width, slots=16)
    flags = ["--state-dir", str(state), "--device", "cpu", "--sampling-dtype", "float32", "--watch-interval-s", "0"]
    flags += ["--max-n", str(args.n), "--chain-budget", str(args.n), "--request-timeout-s", "3600"]
    flags += [] if args.device_budget_mb is None else ["--device-budget-mb", args.device_budget_mb]
    process, base = serve(args.code, models, flags, args.threads, scratch / "server.log")
    try:
        start, _ = memory(process.pid)
        limits = httpx.get(f"{base}/models").json()[0]["limits"].get("device")
        body = {"model": f"resnet{args.size}", "n": args.n, "steps": args.steps, "seed": 7, "init": "noise"}
        started = time.perf_counter()
        reply = httpx.post(f"{base}/sample", json={**body, "format": "json"}, timeout=3600)
        seconds = time.perf_counter() - started
        reply.raise_for_status()
        digest = hashlib.sha256("".join(reply.json()["images"]).encode()).hexdigest()[:16]
        after, peak = memory(process.pid)
        time.sleep(args.idle_s)
        idle, _ = memory(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    print(f"3x{args.size}² ResNet width {args.width} ({parameters / 1e6:.2f} M parameters), code {args.code}")
    print(f"device limits in /models: {limits}")
    print(
        f"n {args.n}, {args.steps} step(s): {seconds:.1f} s; RSS start {start / MiB:.0f} MiB, peak {peak / MiB:.0f} "
        f"(+{(peak - start) / MiB:.0f}), after {after / MiB:.0f}, idle {idle / MiB:.0f} "
        f"(+{(idle - start) / MiB:.0f}); images sha256 {digest}"
    )


if __name__ == "__main__":
    main()
