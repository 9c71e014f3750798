"""Names, paths and state read from files the server does not trust: a checkpoint's ensemble name, a file's
stem, a replay buffer in the state directory. None of them writes outside the state directory, none takes
the device worker down, and a worker that stops anyway is reported by /healthz and /readyz and ends the
process with a non-zero status, so its supervisor restarts it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import write_tiny_ebm
from safetensors.torch import save_file
from server import free_port, running_server, wait_for

from service.catalogue.buffer_store import BufferStore
from service.settings import Settings
from training.runtime.checkpoint import CheckpointError, max_buffer_capacity
from training.runtime.exported import read_sidecar
from training.sampling.replay_buffer import ReplayBuffer

REPO = Path(__file__).resolve().parents[2]
SHAPE = (1, 28, 28)


def settings_for(models_dir: Path, state_dir: Path, **overrides) -> Settings:
    fields = dict(models_dir=models_dir, state_dir=state_dir, device="cpu", buffer_save_interval_s=3600.0)
    return Settings(**{**fields, **overrides})


def post(base: str, model: str, **fields) -> httpx.Response:
    body = {"model": model, "n": 2, "steps": 10, "init": "buffer", "format": "json", **fields}
    return httpx.post(f"{base}/sample", json=body, timeout=60)


def models_with(tmp_path: Path, **ensembles: str | None) -> Path:
    """A models directory with the lone EBM 'solo' and one EBM per keyword, named by it, in that ensemble."""
    directory = tmp_path / "models"
    directory.mkdir()
    write_tiny_ebm(directory / "solo.safetensors", seed=0)
    for seed, (stem, ensemble) in enumerate(ensembles.items(), start=1):
        write_tiny_ebm(directory / f"{stem}.safetensors", seed=seed, ensemble=ensemble)
    return directory


def files_outside(root: Path, *kept: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if not any(path.is_relative_to(keep) for keep in kept))


# --- names from files -------------------------------------------------------------------------------------


def test_an_ensemble_name_with_a_null_byte_is_refused_at_load_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    models = models_with(tmp_path, nul="bad\u0000name")
    with running_server(settings_for(models, tmp_path / "state", buffer_save_interval_s=0.05)) as (base, app):
        ready = httpx.get(f"{base}/readyz").json()
        assert "ensemble" in ready["refused"].get("nul.safetensors", ""), ready
        assert "[A-Za-z0-9_.-]" in ready["refused"]["nul.safetensors"]
        assert post(base, "nul").status_code == 404
        assert post(base, "solo").status_code == 200
        wait_for(lambda: not app.state.worker.pools["solo"].buffer_dirty, 10, "the solo buffer being saved")
        assert app.state.worker.running and post(base, "solo").status_code == 200
        assert httpx.get(f"{base}/healthz").status_code == 200


def test_an_ensemble_name_that_climbs_out_of_the_state_dir_is_refused_and_nothing_is_written_outside(
    tmp_path: Path,
) -> None:
    models = models_with(tmp_path, climber="x/../../outside/escape")
    state = tmp_path / "state"
    with running_server(settings_for(models, state)) as (base, _):
        ready = httpx.get(f"{base}/readyz").json()
        assert "ensemble 'x/../../outside/escape'" in ready["refused"].get("climber.safetensors", ""), ready
        assert post(base, "climber").status_code == 404
        assert post(base, "x/../../outside/escape").status_code == 404
        assert post(base, "solo").status_code == 200
    assert files_outside(tmp_path, models, state) == []
    assert [path.name for path in state.iterdir()] == [path.name for path in sorted(state.glob("buffer-solo-*"))]


def test_a_model_named_by_a_stem_with_odd_characters_is_refused_with_its_reason(tmp_path: Path) -> None:
    models = models_with(tmp_path)
    write_tiny_ebm(models / "two words!.safetensors", seed=3)
    write_tiny_ebm(models / "line\nbreak.safetensors", seed=4)
    with running_server(settings_for(models, tmp_path / "state")) as (base, _):
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["models"] == ["solo"]
        for name in ("two words!.safetensors", "line\nbreak.safetensors"):
            assert "model name" in ready["refused"].get(name, ""), ready


def test_a_sidecar_ensemble_name_passes_the_same_check(tmp_path: Path) -> None:
    sidecar = {"family": "ebm", "data": {"shape": [1, 8, 8]}, "sampler": {}}
    for bad in ("../up", "a/b", "bad\u0000name", ".", "..", "x" * 65, ""):
        (tmp_path / "well.json").write_text(json.dumps({**sidecar, "ensemble": bad}))
        with pytest.raises(CheckpointError, match="ensemble"):
            read_sidecar(tmp_path / "well.json")
    (tmp_path / "well.json").write_text(json.dumps({**sidecar, "ensemble": "wells-v1.2_a"}))
    assert read_sidecar(tmp_path / "well.json").ensemble == "wells-v1.2_a"


def test_buffer_paths_never_leave_the_state_dir(tmp_path: Path) -> None:
    """Defence in depth: group names are checked at load, and the store checks every path it builds again."""
    state = tmp_path / "state"
    store = BufferStore(state)
    buffer = ReplayBuffer((2,), capacity=4)
    for group in ("../up", "a/b", "bad\u0000name", ".."):
        with pytest.raises(ValueError, match="buffer group"):
            store.path(group, "ab" * 32)
        with pytest.raises(ValueError, match="buffer group"):
            store.save(group, "ab" * 32, buffer)
    outside = tmp_path / "elsewhere.safetensors"
    store.save("g", "ab" * 32, ReplayBuffer((2,), capacity=4))
    os.replace(store.path("g", "ab" * 32), outside)
    store.path("g", "ab" * 32).symlink_to(outside)  # a planted link to a file outside the state dir
    assert store.load("g", "ab" * 32, (2,)) is None
    assert files_outside(tmp_path, state) == [outside]


# --- replay buffers read from the state dir ------------------------------------------------------------


def saved_state(claimed: int, count: int, **replace: torch.Tensor) -> dict[str, torch.Tensor]:
    """A buffer file's tensors as the server writes them, claiming capacity `claimed` and holding `count`."""
    state = {
        "samples": torch.rand(count, *SHAPE) * 2 - 1,
        "labels": torch.full((count,), -1),
        "capacity": torch.tensor(claimed),
        "restart_prob": torch.tensor(0.05, dtype=torch.float64),
        "next_replace": torch.tensor(0),
        "data_range": torch.tensor([-1.0, 1.0], dtype=torch.float64),
    }
    return {**state, **replace}


def test_a_saved_buffer_claiming_more_capacity_than_the_server_allocates_is_moved_aside(tmp_path: Path) -> None:
    models, state = models_with(tmp_path), tmp_path / "state"
    with running_server(settings_for(models, state)) as (base, app):
        assert post(base, "solo", init="noise").status_code == 200
        path = app.state.store.path("solo", app.state.registry.groups["solo"].digest)
    assert path.is_file()
    huge = max_buffer_capacity(SHAPE) + 1  # 1 GiB of float32 and a sample more: within what torch would allocate
    save_file(saved_state(huge, 40), str(path))
    with running_server(settings_for(models, state)) as (base, _):
        solo = next(model for model in httpx.get(f"{base}/models").json() if model["name"] == "solo")
        assert (solo["buffer_size"], solo["buffer_capacity"]) == (32, 64)  # the checkpoint's own buffer
        assert post(base, "solo").status_code == 200
    assert len(list(state.glob(f"{path.name}.corrupt-*"))) == 1


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(lambda: saved_state(8, 40), id="more-samples-than-capacity"),
        pytest.param(lambda: saved_state(0, 0), id="capacity-zero"),
        pytest.param(lambda: saved_state(2**40, 4), id="capacity-2**40"),
        pytest.param(lambda: saved_state(64, 4, capacity=torch.tensor(64.0)), id="float-capacity"),
        pytest.param(lambda: saved_state(64, 4, capacity=torch.tensor([64, 64])), id="capacity-not-a-scalar"),
        pytest.param(lambda: saved_state(64, 4, samples=torch.zeros(4, *SHAPE, dtype=torch.uint8)), id="uint8-samples"),
        pytest.param(lambda: saved_state(64, 4, samples=torch.full((4, *SHAPE), float("nan"))), id="nan-samples"),
        pytest.param(lambda: saved_state(64, 4, labels=torch.zeros(4)), id="float-labels"),
        pytest.param(lambda: saved_state(64, 4, labels=torch.zeros(3, dtype=torch.int64)), id="too-few-labels"),
        pytest.param(lambda: saved_state(64, 4, next_replace=torch.tensor(99)), id="next-replace-past-capacity"),
        pytest.param(lambda: saved_state(64, 4, restart_prob=torch.tensor(7.0)), id="restart-prob-7"),
        pytest.param(lambda: saved_state(64, 4, data_range=torch.tensor([1.0, -1.0])), id="empty-data-range"),
    ],
)
def test_a_saved_buffer_this_server_would_not_write_is_moved_aside(tmp_path: Path, hostile) -> None:
    store = BufferStore(tmp_path)
    path = store.path("g", "ab" * 32)
    save_file(hostile(), str(path))
    assert store.load("g", "ab" * 32, SHAPE) is None
    assert not path.exists() and len(list(tmp_path.glob(f"{path.name}.corrupt-*"))) == 1


def test_a_saved_buffer_file_larger_than_any_buffer_is_not_read(tmp_path: Path) -> None:
    store = BufferStore(tmp_path)
    path = store.path("g", "ab" * 32)
    with path.open("wb") as handle:  # sparse: no disk used, but its size is past any buffer of shape [2]
        handle.truncate(max_buffer_capacity((2,)) * (4 * 2 + 8) + 2**20)
    assert store.load("g", "ab" * 32, (2,)) is None
    assert len(list(tmp_path.glob(f"{path.name}.corrupt-*"))) == 1


# --- the device worker -----------------------------------------------------------------------------------


def test_a_save_that_raises_is_logged_once_and_the_worker_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = {"n": 0}

    def refuse(*args, **kwargs) -> None:
        calls["n"] += 1
        raise ValueError("embedded null byte")  # not an OSError: as a bad path made the save raise before

    monkeypatch.setattr("service.catalogue.buffer_store.atomic_write_bytes", refuse)
    models = models_with(tmp_path)
    with (
        caplog.at_level(logging.INFO),
        running_server(settings_for(models, tmp_path / "state", buffer_save_interval_s=0.05)) as (base, app),
    ):
        for attempt in range(1, 4):
            assert post(base, "solo").status_code == 200
            wait_for(lambda attempt=attempt: calls["n"] > attempt, 10, f"save attempt {attempt + 1}")
        assert app.state.worker.running and httpx.get(f"{base}/healthz").status_code == 200
        monkeypatch.undo()
        wait_for(lambda: not app.state.worker.pools["solo"].buffer_dirty, 10, "the buffer being saved at last")
    failures = [record for record in caplog.records if "ValueError: embedded null byte" in record.getMessage()]
    assert len(failures) == 1 and "solo" in failures[0].getMessage()
    assert any("saving the replay buffer of solo works again" in record.getMessage() for record in caplog.records)


def test_a_failing_publish_drain_or_shutdown_fails_only_what_it_concerns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = models_with(tmp_path, pair_a="pair", pair_b="pair")
    with caplog.at_level(logging.INFO), running_server(settings_for(models, tmp_path / "state")) as (base, app):
        worker = app.state.worker

        def broken_publish() -> None:
            raise RuntimeError("metrics backend gone (simulated)")

        worker._publish_buffers = broken_publish  # every busy round publishes: 10 steps, 10 failures
        assert post(base, "solo").status_code == 200 and post(base, "pair").status_code == 200
        del worker._publish_buffers
        solo_scheduler = worker.pools["solo"].scheduler
        healthy_add = solo_scheduler.add

        def refusing_add(job) -> None:
            raise RuntimeError("scheduler bug (simulated)")

        solo_scheduler.add = refusing_add
        refused = post(base, "solo")
        assert refused.status_code == 503 and "RuntimeError" in refused.json()["detail"]
        assert post(base, "pair").status_code == 200  # the other pool never noticed
        solo_scheduler.add = healthy_add
        assert post(base, "solo").status_code == 200 and worker.running
        real_save = worker.store.save

        def save_fails_for_solo(group: str, digest: str, buffer: ReplayBuffer) -> bool:
            if group == "solo":
                raise RuntimeError("serializer bug (simulated)")
            return real_save(group, digest, buffer)

        worker.store.save = save_fails_for_solo
    messages = [record.getMessage() for record in caplog.records]
    assert sum("publishing the buffer figures failed" in message for message in messages) == 1
    assert sum("serializer bug" in message for message in messages) == 1  # at shutdown, for solo alone
    assert any("saved replay buffer" in message and "buffer-pair-" in message for message in messages)


class InjectedCrash(BaseException):
    """Escapes every guard (they catch Exception): a worker thread that ends anyway."""


def crash(*args, **kwargs) -> None:
    raise InjectedCrash("simulated: the worker thread ends")


def test_a_worker_that_stops_anyway_is_reported_by_healthz_and_readyz(tmp_path: Path) -> None:
    models = models_with(tmp_path)
    with running_server(settings_for(models, tmp_path / "state", request_timeout_s=5)) as (base, app):
        app.state.worker.pools["solo"].step = crash
        failed = post(base, "solo")
        assert failed.status_code == 503 and "device worker stopped" in failed.json()["detail"]
        wait_for(lambda: not app.state.worker.running, 10, "the worker thread ending")
        health = httpx.get(f"{base}/healthz")
        assert health.status_code == 503 and health.json()["status"] == "worker stopped"
        assert "InjectedCrash" in health.json()["detail"]
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503 and ready.json()["worker_running"] is False
        assert post(base, "solo").status_code == 503


CRASHING_SERVER = """
import sys
from service.engine.pools.langevin import LangevinPool
from service.__main__ import main

class InjectedCrash(BaseException):
    pass

def crash(self):
    raise InjectedCrash("simulated: the worker thread ends")

LangevinPool.step = crash
main(sys.argv[1:])
"""


def test_a_server_process_whose_worker_stops_exits_non_zero(tmp_path: Path) -> None:
    models, port = models_with(tmp_path), free_port()
    script = tmp_path / "crashing_server.py"
    script.write_text(CRASHING_SERVER)
    command = [sys.executable, str(script), "--models-dir", str(models), "--state-dir", str(tmp_path / "state")]
    command += ["--device", "cpu", "--port", str(port), "--request-timeout-s", "10"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 60, "the server becoming ready")
        failed = post(base, "solo")
        assert failed.status_code == 503 and "device worker stopped" in failed.json()["detail"]
        assert process.wait(timeout=30) == 1
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    output = log_path.read_text()
    assert "the device worker stopped" in output and "InjectedCrash" in output
    assert "exiting with status 1" in output
