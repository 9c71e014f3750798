"""Server memory of streams nobody reads (issue 37; target: three never-read streams at most 150 MB over the idle
server, given back within 10 s of the clients leaving).

Starts `python -m service` on an untrained conv energy on [1, 128, 128] images (a frame of n 64 is 4 MiB as
float32), and prints its resident set (VmRSS): idle after a warm-up request, the peak while --streams streams
of n 64 and --steps steps (a frame every step) are read, the peak while the same streams are never read (a
4 KiB receive window; their chains run to the end), and the resident set 10 s after those clients leave;
also how long the read streams took (what mapping large blocks costs), and how many of each phase's steps
advanced more than one request's 64 chains (the step batch the pool's measured cost chose: a step's working memory
grows with it).

    python bench/stream_memory.py
    python bench/stream_memory.py --steps 16 --streams 3
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import launch  # bench/launch.py, beside this script
import torch

from training.models import build_model
from training.runtime.checkpoint import Checkpoint, ModelConfig, save_checkpoint

MB = 1e6
SHAPE = [1, 128, 128]


def write_energy(path: Path) -> None:
    torch.manual_seed(0)
    arch = {"name": "conv_energy", "kwargs": {"image_size": SHAPE[-1], "width": 4}}
    config = ModelConfig(
        family="ebm",
        arch=arch,
        data={"shape": SHAPE, "range": [-1.0, 1.0], "dataset": "fake"},
        sampler={"steps": 16, "step_size": 1.0, "noise": 0.005, "init": "noise"},
        training={"seed": 0},
        metrics={},
    )
    save_checkpoint(path, Checkpoint(config, build_model(arch).state_dict()))


def resident(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


class PeakWatch:
    """The highest resident set of `pid`, sampled every 10 ms on a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self) -> PeakWatch:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident(self.pid))
            time.sleep(0.01)

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def chain_steps(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.search(r'^samplebay_chain_steps_total\{pool="big"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def steps_by_chains(base: str) -> list[int]:
    """Steps so far of at most 64 chains, of at most 128, of any (the pool's chains-per-step histogram)."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    counts = []
    for bound in ("64.0", "128.0", "+Inf"):
        line = rf'^samplebay_chains_per_step_bucket\{{le="{re.escape(bound)}",pool="big"\}} (\S+)$'
        counts.append(int(float(re.search(line, text, re.MULTILINE).group(1))))  # type: ignore[union-attr]
    return counts


def cost_table(base: str) -> str:
    """The pool's step cost table as /metrics shows it: ms a chain by bucket of chains a step."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    line = r'^samplebay_step_cost_per_chain_seconds\{chains="([^"]+)",pool="big"\} (\S+)$'
    return ", ".join(
        f"{chains}: {float(seconds) * 1e3:.1f}" for chains, seconds in re.findall(line, text, re.MULTILINE)
    )


def wide_steps(before: list[int], after: list[int]) -> str:
    """The steps between two `steps_by_chains`: how many, and how many of them advanced 65-128 chains and more."""
    up_to_64, up_to_128, steps = (later - earlier for earlier, later in zip(before, after, strict=True))
    return f"{steps} steps: {up_to_128 - up_to_64} of 65-128 chains, {steps - up_to_128} of more"


def never_read(port: int, body: bytes) -> socket.socket:
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
    connection.connect(("127.0.0.1", port))
    head = f"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    connection.sendall(head.encode() + body)
    return connection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--steps", type=int, default=64, help="steps of each stream's chains: steps + 1 frames")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    args = parser.parse_args()
    request = {"model": "big", "n": 64, "steps": args.steps, "trajectory_every": 1, "stream": True}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "models").mkdir()
        write_energy(root / "models" / "big.safetensors")
        flags = ["--models-dir", str(root / "models"), "--state-dir", str(root / "state"), "--device", "cpu"]
        flags += ["--stream-send-timeout-s", "600", "--request-timeout-s", "900", "--max-frames", str(args.steps + 1)]
        process, base = launch.start_server(flags, args.threads, root / "server.log")
        try:
            pid, port = process.pid, int(base.rsplit(":", 1)[1])
            assert httpx.post(f"{base}/sample", json={"model": "big", "n": 1, "steps": 1}, timeout=60).is_success
            time.sleep(2)
            idle = resident(pid)

            before_read, started = steps_by_chains(base), time.monotonic()
            with PeakWatch(pid) as read, ThreadPoolExecutor(args.streams) as pool:
                post = lambda _: httpx.post(f"{base}/sample", json=request, timeout=600)  # noqa: E731
                answers = list(pool.map(post, range(args.streams)))
            read_s = time.monotonic() - started
            for answer in answers:
                assert b"event: done" in answer.content, answer.content[-300:]
            time.sleep(10)
            after_read = resident(pid)

            before_unread, read_costs = steps_by_chains(base), cost_table(base)
            done = chain_steps(base) + args.streams * 64 * args.steps
            with PeakWatch(pid) as unread:
                clients = [never_read(port, json.dumps(request).encode()) for _ in range(args.streams)]
                while chain_steps(base) < done:
                    time.sleep(0.1)
            after_unread_steps, unread_costs = steps_by_chains(base), cost_table(base)
            for client in clients:
                client.close()
            left = time.monotonic()
            time.sleep(10 - (time.monotonic() - left))
            after_unread = resident(pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    frames = args.streams * (args.steps + 1)
    print(f"{args.streams} streams of n 64 on {SHAPE}, {args.steps + 1} frames each ({frames} frames of 4 MiB)")
    print(f"idle after a warm-up request     {idle / MB:7.0f} MB")
    read_extra = (read.peak - idle) / MB
    print(f"peak, streams read               {read.peak / MB:7.0f} MB  (+{read_extra:.0f} MB), in {read_s:.1f} s")
    print(f"10 s after the read streams      {after_read / MB:7.0f} MB  (+{(after_read - idle) / MB:.0f} MB)")
    print(f"peak, streams never read         {unread.peak / MB:7.0f} MB  (+{(unread.peak - idle) / MB:.0f} MB)")
    print(f"steps while read                 {wide_steps(before_read, before_unread)}")
    print(f"steps while never read           {wide_steps(before_unread, after_unread_steps)}")
    print(f"ms a chain by chains a step      after the read streams {read_costs}; after the others {unread_costs}")
    print(f"10 s after their clients left    {after_unread / MB:7.0f} MB  (+{(after_unread - idle) / MB:.0f} MB)")


if __name__ == "__main__":
    main()
