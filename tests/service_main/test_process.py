"""The real `python -m service` process against slow, idle and half-finished clients, interrupted saves and
a state directory it cannot write: it cleans up, answers or hangs up, and always shuts down in bounded time."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import write_tiny_ebm
from server import ServerProcess, serve, wait_for

REPO = Path(__file__).resolve().parents[2]
TWO_HOURS_AGO = time.time() - 7200


def plant_temp_file(directory: Path, target: str, suffix: str, mtime: float) -> Path:
    """A leftover of `atomic_write_bytes` killed before its rename: `.TARGET.XXXXXXXX.tmp`."""
    path = directory / f".{target}.{suffix}.tmp"
    path.write_bytes(b"half a checkpoint")
    os.utime(path, (mtime, mtime))
    return path


def read_until_closed(connection: socket.socket) -> bytes:
    received = b""
    while chunk := connection.recv(4096):
        received += chunk
    return received


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hardening")
    models_dir, state_dir = root / "models", root / "state"
    models_dir.mkdir()
    state_dir.mkdir()
    write_tiny_ebm(models_dir / "solo.safetensors")
    return {
        "models_dir": models_dir,
        "state_dir": state_dir,
        "old_checkpoint_tmp": plant_temp_file(models_dir, "solo.safetensors", "k1ll3d00", TWO_HOURS_AGO),
        "old_buffer_tmp": plant_temp_file(state_dir, "buffer-solo-0123.safetensors", "k1ll3d01", TWO_HOURS_AGO),
        "young_buffer_tmp": plant_temp_file(state_dir, "buffer-solo-0123.safetensors", "wr1t1ng0", time.time()),
        "log": root / "server.log",
    }


@pytest.fixture(scope="module")
def server(planted: dict[str, Path]) -> Iterator[ServerProcess]:
    flags = ("--idle-timeout-s", "1", "--body-timeout-s", "1", "--buffer-save-interval-s", "0.2")
    with serve(planted["models_dir"], planted["state_dir"], planted["log"], *flags) as running:
        yield running


def test_interrupted_saves_older_than_an_hour_are_removed_at_start(server: ServerProcess, planted: dict) -> None:
    assert not planted["old_checkpoint_tmp"].exists() and not planted["old_buffer_tmp"].exists()
    assert planted["young_buffer_tmp"].exists()  # another replica may be writing it
    for removed in (planted["old_checkpoint_tmp"], planted["old_buffer_tmp"]):
        assert f"removed {removed}" in server.log
    assert "kept 1 temporary file(s)" in server.log
    assert (planted["models_dir"] / "solo.safetensors").exists()


def test_each_buffer_save_is_logged_and_dated_in_utc(server: ServerProcess) -> None:
    reply = httpx.post(f"{server.base}/sample", json={"model": "solo", "n": 4, "steps": 10, "init": "noise"})
    assert reply.status_code == 200

    def saved_at() -> str | None:
        (solo,) = httpx.get(f"{server.base}/models").json()
        return solo["buffer_saved_at"]

    wait_for(saved_at, 30, "a buffer save")
    when = datetime.fromisoformat(saved_at() or "")
    assert when.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - when) < timedelta(minutes=5)
    assert re.search(
        r"saved replay buffer \S+buffer-solo-\w+\.safetensors: 36 chains \([\d.]+ MiB\) in \d+ ms", server.log
    )


def test_a_body_that_stops_half_way_is_answered_408_and_closed(server: ServerProcess) -> None:
    connection = server.connect()
    head = b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    connection.sendall(head + b'{"model": ')
    answer = read_until_closed(connection)  # within --body-timeout-s 1, or recv's 10 s timeout fails the test
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"not received within 1 s" in answer


def test_connections_that_send_no_whole_request_are_closed(server: ServerProcess) -> None:
    silent, trickling, kept_alive = server.connect(), server.connect(), server.connect()
    trickling.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # a request head that never ends
    kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert silent.recv(100) == b""  # each closed after --idle-timeout-s 1
    assert trickling.recv(100) == b""
    assert read_until_closed(kept_alive).startswith(b"HTTP/1.1 200 ")  # answered, then closed when idle


def test_sigterm_with_a_half_sent_body_exits_within_the_graceful_bound(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    write_tiny_ebm(models_dir / "solo.safetensors")
    flags = ("--body-timeout-s", "600", "--graceful-shutdown-s", "1")  # only the graceful bound can end it
    with serve(models_dir, tmp_path / "state", tmp_path / "server.log", *flags) as server:
        connection = server.connect()
        head = b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n"
        connection.sendall(head)
        assert connection.recv(100).startswith(b"HTTP/1.1 100 ")  # the app is now reading the body
        connection.sendall(b'{"model": ')
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == -signal.SIGTERM  # uvicorn re-raises the signal once shut down
        elapsed = time.monotonic() - started
        answer = read_until_closed(connection)
    assert elapsed < 1 + 5, f"took {elapsed:.1f} s to exit"
    assert answer.startswith(b"HTTP/1.1 503 ") and b"shutting down" in answer
    assert "Application shutdown complete" in server.log and "Traceback" not in server.log


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty directory no file can be written in: chmod for a user, a read-only tmpfs for root."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield directory
        finally:
            directory.chmod(0o755)  # so pytest can clean it up
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(directory)]
    mounted = subprocess.run(mount, capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"root cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_read_only_state_dir_is_one_warning_and_the_server_still_samples(
    models_dir: Path, read_only_dir: Path, tmp_path: Path
) -> None:
    flags = ("--buffer-save-interval-s", "0.1")
    with serve(models_dir, read_only_dir, tmp_path / "server.log", *flags) as server:
        for model in ("solo", "pair", "solo"):  # two buffers changed, saved at each interval and at exit
            reply = httpx.post(f"{server.base}/sample", json={"model": model, "n": 2, "steps": 10, "init": "noise"})
            assert reply.status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == -signal.SIGTERM
    warnings = [line for line in server.log.splitlines() if "will not persist" in line]
    assert len(warnings) == 1 and f"state directory {read_only_dir} is not writable" in warnings[0]
    assert "Traceback" not in server.log and "saved replay buffer" not in server.log
    assert not list(read_only_dir.iterdir())
