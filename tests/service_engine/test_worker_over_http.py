"""Worker behaviour through real HTTP: shared steps, fairness, determinism, limits, cancellation, failures."""

import concurrent.futures
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from server import running_server, wait_for

from service.settings import Settings


def settings_for(models_dir: Path, tmp_path: Path, **overrides) -> Settings:
    fields = dict(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu", max_steps=20000)
    fields.update(overrides)
    return Settings(**fields)


def post(base: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{base}/sample", json=body, timeout=timeout)


def pixels(reply: httpx.Response) -> np.ndarray:
    assert reply.status_code == 200, reply.text
    return np.asarray(Image.open(io.BytesIO(reply.content)))


def test_concurrent_requests_share_langevin_steps(models_dir: Path, tmp_path: Path) -> None:
    with running_server(settings_for(models_dir, tmp_path)) as (base, app):
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            replies = list(
                pool.map(lambda seed: post(base, {"model": "solo", "n": 2, "steps": 300, "seed": seed}), range(6))
            )
        assert all(reply.status_code == 200 for reply in replies)
        stats = app.state.worker.pools["solo"].stats
        assert stats["max_jobs_in_step"] >= 2 and stats["max_chains_in_step"] >= 4
        assert stats["steps"] < 6 * 300  # fewer batched steps than the requests' steps added up


def test_a_short_request_completes_while_long_ones_run(models_dir: Path, tmp_path: Path) -> None:
    with running_server(settings_for(models_dir, tmp_path)) as (base, app):
        pool = app.state.worker.pools["solo"]
        with concurrent.futures.ThreadPoolExecutor(3) as executor:
            # Long requests whose clients give up after 4 s (their chains are then cancelled).
            longs = [executor.submit(post, base, {"model": "solo", "n": 4, "steps": 20000}, 4.0) for _ in range(2)]
            wait_for(lambda: pool.scheduler.running_chains == 8, 10, "8 chains running")
            started = time.monotonic()
            short = post(base, {"model": "solo", "steps": 5, "format": "json"})
            short_seconds = time.monotonic() - started
            assert short.status_code == 200
            assert not any(future.done() for future in longs)
            for future in longs:
                with pytest.raises(httpx.ReadTimeout):
                    future.result()
        assert short.json()["timings"]["queue_ms"] < 1000 and short_seconds < 3


def test_full_queue_answers_503_with_retry_after_at_once(models_dir: Path, tmp_path: Path) -> None:
    settings = settings_for(models_dir, tmp_path, chain_budget=2, max_queue=1, max_n=2)
    with running_server(settings) as (base, app):
        pool = app.state.worker.pools["solo"]
        with concurrent.futures.ThreadPoolExecutor(2) as executor:
            running = executor.submit(post, base, {"model": "solo", "n": 2, "steps": 20000}, 3.0)
            wait_for(lambda: pool.scheduler.running_chains == 2, 10, "2 chains running")
            waiting = executor.submit(post, base, {"model": "solo", "n": 2, "steps": 5})
            wait_for(lambda: app.state.worker.queue_depth() == 1, 10, "one request queued")
            started = time.monotonic()
            refused = post(base, {"model": "solo", "steps": 5})
            assert time.monotonic() - started < 2
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "busy" in refused.json()["detail"]
            with pytest.raises(httpx.ReadTimeout):
                running.result()  # its client gave up: its chains are dropped and the waiting one runs
            assert waiting.result().status_code == 200


def test_a_request_past_its_deadline_is_dropped_with_504(models_dir: Path, tmp_path: Path) -> None:
    with running_server(settings_for(models_dir, tmp_path, request_timeout_s=0.3)) as (base, app):
        reply = post(base, {"model": "solo", "n": 2, "steps": 20000, "init": "buffer"})
        assert reply.status_code == 504 and "deadline" in reply.json()["detail"]
        pool = app.state.worker.pools["solo"]
        wait_for(lambda: pool.scheduler.running_chains == 0, 10, "no chain running")
        assert not pool.buffer.in_use.any()  # its buffer slots were handed back


def test_client_disconnect_cancels_its_chains(models_dir: Path, tmp_path: Path) -> None:
    with running_server(settings_for(models_dir, tmp_path)) as (base, app):
        pool = app.state.worker.pools["solo"]
        with pytest.raises(httpx.ReadTimeout):
            post(base, {"model": "solo", "n": 3, "steps": 20000, "init": "buffer"}, timeout=0.5)
        wait_for(lambda: pool.scheduler.running_chains == 0, 5, "the chains being dropped")
        assert pool.stats["steps"] < 20000
        assert not pool.buffer.in_use.any()
        text = httpx.get(f"{base}/metrics").text
        assert 'samplebay_requests_total{model="solo",status="499"} 1.0' in text


def test_a_failing_batch_fails_only_its_requests(models_dir: Path, tmp_path: Path) -> None:
    with running_server(settings_for(models_dir, tmp_path)) as (base, app):
        pool = app.state.worker.pools["solo"]
        healthy = pool.modules[0]
        calls = {"n": 0}

        def exploding(x):
            calls["n"] += 1
            raise RuntimeError("CUDA out of memory (simulated)")

        pool.modules[0] = exploding
        failed = post(base, {"model": "solo", "steps": 5})
        assert failed.status_code == 503 and "RuntimeError" in failed.json()["detail"]
        assert post(base, {"model": "pair", "steps": 5}).status_code == 200  # other pools were untouched
        pool.modules[0] = healthy
        assert post(base, {"model": "solo", "steps": 5}).status_code == 200  # the worker kept serving
        assert calls["n"] == 1


def test_long_flow_trajectories_are_thinned_evenly_keeping_the_last_frame() -> None:
    from service.engine.pools.base import evenly_spaced

    frames = [torch.full((1,), float(index)) for index in range(200)]
    kept = evenly_spaced(frames, 65)
    assert len(kept) == 65 and kept[0][0] == 1 and kept[-1][0] == 200 and kept[-1][1].item() == 199
    assert evenly_spaced(frames[:10], 65) == list(enumerate(frames[:10], start=1))
