"""The one way bench/ scripts start a server: `python -m service` on a free loopback port with the script's flags,
torch threads set by OMP_NUM_THREADS (bench/'s one meaning of --threads: the server's torch threads), ready once
GET /readyz answers 200."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    flags: list[str], threads: int | None, log: Path | None = None, ready_within_s: float = 300, replicas: int = 1
) -> tuple[subprocess.Popen, str]:
    """The server process and its base URL, once `replicas` distinct replicas (X-Replica) have answered /readyz
    (a local server is one); its stderr goes to `log` (else nowhere). threads None: OMP_NUM_THREADS as it is."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--port", str(port), *flags]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    stderr = log.open("w") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    deadline, seen = time.monotonic() + ready_within_s, set[str]()
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{base}/readyz", timeout=2)
            if reply.status_code == 200:
                seen.add(reply.headers.get("x-replica", ""))
                if len(seen) >= replicas:
                    return process, base
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            said = log.read_text()[-2000:] if log is not None else ""
            raise RuntimeError(f"the server exited with {process.returncode} {said}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server was not ready in {ready_within_s:.0f} s")
