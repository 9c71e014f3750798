"""Replay buffers at size: saved off the worker's thread, held in float16, within one byte budget per server."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest
import torch
from conftest import write_tiny_ebm
from engine_bench import FakeClock
from safetensors.torch import load_file, save_file
from server import running_server

from service.catalogue import buffer_store
from service.catalogue.budgets import BufferBudget
from service.catalogue.buffer_store import BufferStore
from service.catalogue.registry import load_registry
from service.engine.messages import SampleResult
from service.engine.worker import Worker
from service.http.orders import make_order
from service.http.schemas import SampleRequest
from service.metrics import Metrics
from service.settings import Settings
from training.commands.set_sampler import set_sampler
from training.runtime.buffer_files import read_saved_state
from training.sampling.replay_buffer import ReplayBuffer

SHAPE = (1, 28, 28)
SLOT_BYTES = ReplayBuffer.slot_bytes(SHAPE, torch.float16)  # 784 float16 values, a class, a lease flag


def worker_for(models: Path, state: Path, budget: BufferBudget | None = None) -> tuple[Worker, FakeClock]:
    clock = FakeClock()
    registry = load_registry(models, torch.device("cpu"))
    worker = Worker(
        registry, BufferStore(state), torch.device("cpu"), Metrics(), 64, 16, 1e9, 0.5, clock, buffer_budget=budget
    )
    return worker, clock


def submit(worker: Worker, clock: FakeClock, **fields) -> list[SampleResult | BaseException]:
    body = SampleRequest(**fields)
    order = asyncio.run(make_order(body, worker.served.registry.models[body.model], Settings(), streaming=False))
    answers: list[SampleResult | BaseException] = []
    worker.submit(order, answers.append, clock.now + 60)
    return answers


def test_a_buffer_save_never_holds_up_chain_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that is stuck half-way through its file (a slow disk) while a whole request runs and writes its
    chains back into the very buffer being saved: the request finishes, the save ends whole afterwards."""
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors")
    halfway, go_on = threading.Event(), threading.Event()
    real_write = buffer_store.atomic_write_bytes

    def slow_disk(path: Path, chunks: Iterable[bytes]) -> None:
        def held() -> Iterable[bytes]:
            for index, chunk in enumerate(chunks):
                yield chunk
                if index == 1:  # the header and the first chunk of samples are written
                    halfway.set()
                    assert go_on.wait(timeout=60), "the test never let the save finish"

        real_write(path, held())

    monkeypatch.setattr(buffer_store, "atomic_write_bytes", slow_disk)
    worker, clock = worker_for(models, tmp_path / "state")
    pool = worker.pools["solo"]
    assert pool.buffer.dtype == torch.float16
    pool.buffer_dirty = True
    worker.save_buffers()
    assert halfway.wait(timeout=60)
    answers = submit(worker, clock, model="solo", n=8, steps=10, seed=3, init="noise")
    while not answers:
        worker.run_once()  # each step: under way while the save is held
    assert isinstance(answers[0], SampleResult) and answers[0].samples.shape == (8, *SHAPE)
    assert len(pool.buffer) == 40 and worker.buffer_keeper.saver.saving  # written back; the save still under way
    go_on.set()
    worker.save_buffers(wait=True)  # the save under way, then the one the new chains asked for
    (saved,) = (tmp_path / "state").glob("buffer-solo-*.safetensors")
    state = read_saved_state(saved, SHAPE)
    assert state["samples"].dtype == torch.float16 and len(state["samples"]) == 40
    assert torch.equal(state["samples"], pool.buffer.samples[:40])


def test_a_float32_buffer_saved_by_an_earlier_server_still_loads(tmp_path: Path) -> None:
    """Servers before float16 buffers saved float32 with safetensors' own writer: read back, held in float16."""
    state = tmp_path / "state"
    state.mkdir()
    old = ReplayBuffer(SHAPE, capacity=64)  # float32, as before
    old.write_back(torch.full((20,), -1), torch.rand(20, *SHAPE) * 2 - 1, torch.arange(20) % 3)
    store = BufferStore(state)
    save_file({key: value.contiguous() for key, value in old.state_dict().items()}, str(store.path("g", "ab" * 32)))
    loaded = store.load("g", "ab" * 32, SHAPE, dtype=torch.float16)
    assert loaded is not None and (len(loaded), loaded.capacity, loaded.dtype) == (20, 64, torch.float16)
    assert torch.equal(loaded.samples[:20], old.samples[:20].half())
    assert torch.equal(loaded.labels[:20], torch.arange(20) % 3)
    store.save("g", "ab" * 32, loaded)  # saved again: float16 now, half the bytes, readable by safetensors too
    again = load_file(str(store.path("g", "ab" * 32)))
    assert again["samples"].dtype == torch.float16 and torch.equal(again["samples"], loaded.samples[:20])


def test_a_saved_buffer_larger_than_its_grant_is_thinned_evenly_on_load(tmp_path: Path) -> None:
    store = BufferStore(tmp_path)
    full = ReplayBuffer(SHAPE, capacity=100, dtype=torch.float16)
    full.write_back(torch.full((100,), -1), torch.arange(100.0).view(100, 1, 1, 1).expand(100, *SHAPE) / 100)
    store.save("g", "ab" * 32, full)
    thinned = store.load("g", "ab" * 32, SHAPE, capacity=10, dtype=torch.float16)
    assert thinned is not None and (len(thinned), thinned.capacity) == (10, 10)
    kept = (thinned.samples[:10, 0, 0, 0].float() * 100).round().long().tolist()
    assert kept[0] == 0 and kept[-1] == 99 and kept == sorted(kept)  # old and new chains alike


def test_the_buffer_budget_thins_then_refuses_with_its_reason_in_the_log_and_in_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three EBMs asking for 64 slots each; the budget holds 64 + 40 slots: the first gets all, the second is
    thinned to what is left, the third (fewer than 16 slots left) gets none and starts every chain from noise."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a", "b", "c"):
        write_tiny_ebm(models / f"{name}.safetensors")
    budget_mb = (64 + 40) * SLOT_BYTES / 2**20
    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu", buffer_budget_mb=budget_mb)
    with caplog.at_level(logging.WARNING), running_server(settings) as (base, app):
        listed = {model["name"]: model for model in httpx.get(f"{base}/models").json()}
        assert [listed[name]["buffer_capacity"] for name in "abc"] == [64, 40, 0]
        assert listed["a"]["buffer_note"] is None and listed["a"]["buffer_bytes"] == 64 * SLOT_BYTES
        assert listed["b"]["buffer_note"].startswith("thinned from 64 to 40 slots")
        assert "--buffer-budget-mb" in listed["b"]["buffer_note"]
        assert listed["c"]["buffer_note"].startswith("refused: 64 slots")
        assert listed["b"]["buffer_size"] == 32  # the checkpoint's 32 saved chains fit
        reply = httpx.post(f"{base}/sample", json={"model": "c", "n": 4, "steps": 10, "init": "buffer"})
        assert reply.status_code == 200  # served: from noise, and nothing kept
        assert len(app.state.worker.pools["c"].buffer) == 0
    refusals = [
        record.getMessage() for record in caplog.records if "replay buffer of c is refused" in record.getMessage()
    ]
    assert len(refusals) == 1 and "raise --buffer-budget-mb" in refusals[0]
    assert not list((tmp_path / "state").glob("buffer-c-*"))  # a refused buffer never overwrites a saved one


def test_a_capacity_from_the_sampler_replaces_the_checkpoints(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    set_sampler(write_tiny_ebm(models / "solo.safetensors"), ["buffer_capacity=500"])  # its CLI: set-sampler
    worker, _ = worker_for(models, tmp_path / "state")
    buffer = worker.pools["solo"].buffer
    assert (buffer.capacity, len(buffer), buffer.dtype) == (500, 32, torch.float16)
