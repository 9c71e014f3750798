"""Real servers for tests that speak HTTP: the app under uvicorn in this process, or `python -m service` as a
process of its own (signals, exit codes, its log), on free loopback ports; and reading its /metrics."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from service.http.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], object], seconds: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `seconds` (for real processes, no fake clock)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds} s")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    """Yield (base URL, app) once /readyz answers 200; shut down (saving buffers) on exit."""
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("server did not become ready")
        time.sleep(0.05)
    try:
        yield base, app
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def metric(base: str, name: str) -> float:
    """One sample of the server's /metrics (0 before it is first counted)."""
    text = httpx.get(f"{base}/metrics").text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base: str
    port: int
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def connect(self) -> socket.socket:
        connection = socket.create_connection(("127.0.0.1", self.port))
        connection.settimeout(10)
        return connection


@contextmanager
def serve(
    models_dir: Path, state_dir: Path, log_path: Path, *flags: str, ready_within_s: float = 60
) -> Iterator[ServerProcess]:
    """`python -m service` on a free port, once /readyz answers 200; SIGTERM on exit if still running."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--models-dir", str(models_dir), "--state-dir", str(state_dir)]
    command += ["--device", "cpu", "--port", str(port), *flags]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", port, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{server.log}")
        try:
            return httpx.get(f"{server.base}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, ready_within_s, "the server becoming ready")
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
