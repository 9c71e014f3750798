"""`python -m service --engine ray --replicas 2` on a local Ray cluster (CPU only), through real HTTP to Ray Serve's
proxy: every family samples, load spreads over both replicas, seeds agree across them, streams arrive frame by
frame, a disconnect frees chains, bad input gets the local server's answers, and SIGTERM stops the cluster with
each replica's replay-buffer shard saved, which a restart pools."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import write_tiny_ebm, write_tiny_eqm, write_tiny_flow, write_tiny_gan
from PIL import Image
from server import free_port, wait_for

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e '.[ray]')")

from service.ray_engine import MODEL_HEADER

REPO = Path(__file__).resolve().parents[2]
START_S = 150  # a Ray cluster and two replicas loading torch start in about 20-40 s on two busy cores


@dataclass
class RayServer:
    process: subprocess.Popen
    base: str
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, body: dict, **kwargs: object) -> httpx.Response:
        return httpx.post(f"{self.base}/sample", json=body, timeout=60, **kwargs)  # type: ignore[arg-type]


@contextmanager
def ray_server(models_dir: Path, state_dir: Path, log_path: Path) -> Iterator[RayServer]:
    """`python -m service --engine ray --replicas 2` once both replicas serve; SIGTERM on exit if still running."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--engine", "ray", "--replicas", "2", "--replica-cpus", "0.5"]
    command += ["--models-dir", str(models_dir), "--state-dir", str(state_dir), "--device", "cpu"]
    command += ["--port", str(port), "--graceful-shutdown-s", "5", "--buffer-save-interval-s", "3600"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
    server = RayServer(process, f"http://127.0.0.1:{port}", log_path)

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{server.log[-5000:]}")
        return "listening on http://" in server.log  # serve.run returned: every replica is running

    try:
        wait_for(listening, START_S, "two replicas serving")
        from_each_replica(server, lambda: httpx.get(f"{server.base}/readyz", timeout=10), "both replicas ready")
        yield server
    finally:
        stop(server)


def stop(server: RayServer) -> float:
    """SIGTERM and wait; the seconds it took (killed after 90 s)."""
    started = time.monotonic()
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return time.monotonic() - started


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray")
    models = root / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors", seed=0)
    write_tiny_eqm(models / "eqm.safetensors", seed=0)
    write_tiny_gan(models / "gan.safetensors", seed=0)
    write_tiny_flow(models / "flow.safetensors", seed=0)
    return {"models": models, "state": root / "state", "root": root}


@pytest.fixture(scope="module")
def server(dirs: dict[str, Path]) -> Iterator[RayServer]:
    with ray_server(dirs["models"], dirs["state"], dirs["root"] / "ray.log") as running:
        yield running


def replicas_seen(responses: list[httpx.Response]) -> set[str]:
    return {response.headers["x-replica"] for response in responses}


def from_each_replica(
    server: RayServer, send: Callable[[], httpx.Response], what: str, seconds: float = 60
) -> dict[str, httpx.Response]:
    """Each replica's latest 200 answer to `send`, sent four at a time until both replicas have answered.

    Ray Serve's proxy sends a request to the replica with the shorter queue among those whose queue length it
    knows; one it has not reached yet (still joining, or its probe timed out on a busy machine) gets nothing, so
    the other can take every answer for a while. Waiting by the clock, not by a number of rounds, outlasts it."""
    answers: dict[str, httpx.Response] = {}

    def both_answered() -> bool:
        with ThreadPoolExecutor(4) as pool:
            for response in pool.map(lambda _: send(), range(4)):
                assert response.status_code == 200, response.text
                answers[response.headers["x-replica"]] = response
        return len(answers) == 2

    wait_for(both_answered, seconds, f"{what} (answers came only from {sorted(answers)})")
    return answers


def test_every_family_samples_through_the_proxy(server: RayServer) -> None:
    for model in ("solo", "eqm", "gan", "flow"):
        response = server.post({"model": model, "n": 4, "seed": 3})
        assert response.status_code == 200, (model, response.text)
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-replica"]
        assert Image.open(io.BytesIO(response.content)).size[0] > 28  # a grid of four


def test_forty_concurrent_requests_spread_over_both_replicas(server: RayServer) -> None:
    with ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(lambda seed: server.post({"model": "gan", "seed": seed}), range(40)))
    assert [response.status_code for response in responses] == [200] * 40
    assert len(replicas_seen(responses)) == 2


def test_seeded_noise_requests_give_the_same_images_on_every_replica(server: RayServer) -> None:
    body = {"model": "solo", "n": 3, "seed": 11, "init": "noise", "steps": 5, "format": "json"}
    answers = from_each_replica(server, lambda: server.post(body), "a seeded answer from each replica")
    first, second = (response.json()["images"] for response in answers.values())
    assert first == second


def test_requests_naming_their_model_join_the_replica_running_it(server: RayServer) -> None:
    """With the `serve_multiplexed_model_id` header, requests go where the model's chains already run.

    Load alone (power of two choices) would send most of them to the idle replica. On a saturated machine Ray's
    queue-length probe of the busy replica can time out, and the router then rightly falls back to the other:
    at most two of eight may do so, in one of two rounds (a round under a passing burst of load is tried again;
    routing by load alone fails both)."""
    hint = {MODEL_HEADER: "solo"}
    long = {"model": "solo", "n": 8, "steps": 2000, "init": "noise", "stream": True, "trajectory_every": 100}
    short = {"model": "solo", "n": 2, "steps": 3, "init": "noise"}
    rounds = []
    for _ in range(2):
        with httpx.stream("POST", f"{server.base}/sample", json=long, headers=hint, timeout=60) as stream:
            running_on = stream.headers["x-replica"]
            next(line for line in stream.iter_lines() if line.startswith("event: frame"))
            with ThreadPoolExecutor(8) as pool:
                responses = list(pool.map(lambda _: server.post(short, headers=hint), range(8)))
        assert [response.status_code for response in responses] == [200] * 8
        landed = [response.headers["x-replica"] for response in responses]
        rounds.append(landed)
        if landed.count(running_on) >= 6:
            break
    else:
        raise AssertionError(f"fewer than 6 of 8 joined the running replica in both rounds: {rounds}")


def test_a_stream_delivers_frames_as_the_replica_makes_them(server: RayServer) -> None:
    body = {"model": "solo", "n": 16, "steps": 600, "init": "noise", "stream": True, "trajectory_every": 30}
    arrivals: list[tuple[str, float]] = []
    with httpx.stream("POST", f"{server.base}/sample", json=body, timeout=60) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["x-replica"]
        for line in stream.iter_lines():
            if line.startswith("event: "):
                arrivals.append((line.removeprefix("event: "), time.monotonic()))
    kinds = [kind for kind, _ in arrivals]
    assert kinds == ["frame"] * 21 + ["done"]
    first_frame, done = arrivals[0][1], arrivals[-1][1]
    assert done - first_frame > 0.2, "every frame arrived at once, at the end"


def solo_figures(server: RayServer) -> dict[str, tuple[float, float]]:
    """(`samplebay_running_chains`, `samplebay_chain_steps_total`) of pool 'solo' on each replica."""

    def solo(text: str, name: str) -> float:
        found = re.search(rf'^{name}\{{pool="solo"\}} (\S+)$', text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    answers = from_each_replica(server, lambda: httpx.get(f"{server.base}/metrics", timeout=10), "/metrics of both")
    return {
        replica: (solo(answer.text, "samplebay_running_chains"), solo(answer.text, "samplebay_chain_steps_total"))
        for replica, answer in answers.items()
    }


def test_a_client_that_disconnects_frees_its_chains_in_the_replica(server: RayServer) -> None:
    """64 chains of 2000 steps; once the client has gone after two frames, no replica runs a chain, and far fewer
    than the 128,000 chain-steps that finishing them would take were run."""
    chains, steps = 64, 2000
    before = sum(done for _, done in solo_figures(server).values())
    body = {"model": "solo", "n": chains, "steps": steps, "init": "noise", "stream": True, "trajectory_every": 100}
    with httpx.stream("POST", f"{server.base}/sample", json=body, timeout=60) as stream:
        assert stream.status_code == 200
        frames = (line for line in stream.iter_lines() if line.startswith("event: frame"))
        next(frames), next(frames)  # step 0 and step 100: the chains are running
    figures: dict[str, tuple[float, float]] = {}

    def no_chain_runs() -> bool:
        figures.update(solo_figures(server))
        return all(running == 0 for running, _ in figures.values())

    wait_for(no_chain_runs, 30, "the replicas dropping the chains of the client that left")
    run = sum(done for _, done in figures.values()) - before
    assert 100 * chains <= run < steps * chains / 2, figures


BAD_INPUT = [
    ({"model": "nope"}, None),
    ({"model": "solo", "n": 0}, None),
    ({"model": "solo", "steps": 10**9}, None),
    ({"model": "gan", "init": "buffer"}, None),
    ({"model": "solo", "label": 3}, None),
    ({"model": "solo", "surprise": 1}, None),
    (None, b'{"model": "solo", "n": '),
    (None, b'{"model": "\xff\xfe"}'),
    (None, b'{"model": "solo", "pad": "' + b"x" * 70_000 + b'"}'),
]


def test_bad_input_gets_the_same_answers_as_the_local_server(server: RayServer, dirs: dict[str, Path]) -> None:
    from fastapi.testclient import TestClient

    from service.http.app import create_app
    from service.settings import Settings

    local = Settings(models_dir=dirs["models"], state_dir=dirs["root"] / "local-state", device="cpu")
    with TestClient(create_app(local)) as client:
        for body, raw in BAD_INPUT:
            content = raw if raw is not None else json.dumps(body).encode()
            headers = {"content-type": "application/json"}
            expected = client.post("/sample", content=content, headers=headers)
            answer = httpx.post(f"{server.base}/sample", content=content, headers=headers, timeout=30)
            assert 400 <= answer.status_code < 500, (body, answer.status_code)
            assert (answer.status_code, answer.json()) == (expected.status_code, expected.json()), body
            assert answer.headers["x-replica"]


def shard_sizes(state: Path) -> dict[str, int]:
    from safetensors.torch import load_file

    return {path.name: len(load_file(path)["samples"]) for path in sorted(state.glob("buffer-solo-*.safetensors"))}


def test_sigterm_saves_each_replicas_shard_and_a_restart_pools_them(server: RayServer, dirs: dict[str, Path]) -> None:
    """Runs last: it stops the module's cluster."""
    buffer_request = {"model": "solo", "n": 4, "init": "buffer"}
    from_each_replica(server, lambda: server.post(buffer_request), "buffer requests on both replicas")  # both changed
    seconds = stop(server)
    assert server.process.returncode == 0, server.log[-3000:]
    assert seconds < 60
    sizes = shard_sizes(dirs["state"])
    assert [re.sub(r"-[0-9a-f]{16}-", "-DIGEST-", name) for name in sizes] == [
        "buffer-solo-DIGEST-replica0.safetensors",
        "buffer-solo-DIGEST-replica1.safetensors",
    ]
    capacity = 64  # write_tiny_ebm's buffer
    assert all(size < capacity for size in sizes.values())  # so only pooling reaches the capacity below

    with ray_server(dirs["models"], dirs["state"], dirs["root"] / "ray-restart.log") as restarted:
        models = from_each_replica(restarted, lambda: httpx.get(f"{restarted.base}/models", timeout=10), "/models")
        buffer_sizes = [
            next(m for m in answer.json() if m["name"] == "solo")["buffer_size"] for answer in models.values()
        ]
        assert buffer_sizes == [min(capacity, sum(sizes.values()))] * 2
