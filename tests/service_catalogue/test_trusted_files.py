"""Issue 37: every value a model file states goes through one schema, every file is read once, and the live models
directory keeps one file's failure to that file. Each fault is built here as a real file and tried through real
HTTP (the app under uvicorn) or the real command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import restate, write_tiny_ebm, write_tiny_eqm
from programs import SHAPE, WellEnergy, save_program, well_sidecar
from server import running_server, wait_for

from service.catalogue.budgets import MemoryBudgets, ModelBudget
from service.catalogue.buffer_store import BufferStore
from service.catalogue.model_watch import ModelRepository
from service.engine.worker import Worker
from service.metrics import Metrics
from service.settings import Settings
from training.commands.cli import main
from training.commands.quality import frechet_distance
from training.runtime.load import load_model_file
from training.runtime.stated import MAX_METRICS_DEPTH

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 30  # generous: a swap takes two watch intervals, but CI shares its cores


def stating(**data) -> Callable[[dict], None]:
    """A config change that states other `data` values."""
    return lambda config: config["data"].update(data)


def nan_weights(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return torch.full_like(tensor, math.nan) if name.startswith("weights/") and tensor.is_floating_point() else tensor


def deep_metrics(depth: int) -> Callable[[dict], str]:
    """Metrics nested `depth` lists deep, as the config's text (json.dumps itself would recurse too far)."""

    def change(config: dict) -> str:
        config["metrics"] = {"deep": "DEEP"}
        return json.dumps(config).replace('"DEEP"', "[" * depth + "]" * depth)

    return change


# file stem -> (how it is built from a good file, what its one-line refusal must say)
BAD_FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "text_range": (lambda p: restate(write_tiny_ebm(p), stating(range=["a", "b"])), "data.range must be [low, high]"),
    "flat_range": (lambda p: restate(write_tiny_ebm(p), stating(range=[0, 0])), "low < high, not [0, 0]"),
    "nan_range": (lambda p: restate(write_tiny_ebm(p), stating(range=[math.nan, math.inf])), "two finite numbers"),
    "number_classes": (lambda p: restate(write_tiny_eqm(p), stating(classes=list(range(10)))), "data.classes must"),
    "object_dataset": (lambda p: restate(write_tiny_ebm(p), stating(dataset={"name": "mnist"})), "data.dataset"),
    "many_classes": (
        lambda p: restate(write_tiny_eqm(p), stating(classes=[f"c{i}" for i in range(1000)])),
        "data.classes lists 1,000 class names, but the network has 10 classes",
    ),
    "nan_weights": (lambda p: restate(write_tiny_ebm(p), weights=nan_weights), "holds NaN or infinite values"),
    "deep_metrics": (lambda p: restate(write_tiny_ebm(p), deep_metrics(5000)), "nests too deeply"),
    "nested_metrics": (lambda p: restate(write_tiny_ebm(p), deep_metrics(50)), f"deeper than {MAX_METRICS_DEPTH}"),
}


def settings_for(models: Path, **overrides) -> Settings:
    return Settings(models_dir=models, state_dir=models.parent / "state", device="cpu", **overrides)


def readyz(base: str) -> httpx.Response:
    return httpx.get(f"{base}/readyz", timeout=10)


def sample(base: str, model: str) -> httpx.Response:
    return httpx.post(f"{base}/sample", json={"model": model, "n": 1, "steps": 2}, timeout=60)


@pytest.fixture(scope="module")
def beside_good(tmp_path_factory: pytest.TempPathFactory):
    """A server started on one good EBM beside every bad file, and a program whose sidecar states a bad dataset."""
    models = tmp_path_factory.mktemp("trusted") / "models"
    models.mkdir()
    write_tiny_ebm(models / "good.safetensors")
    for stem, (build, _) in BAD_FILES.items():
        build(models / f"{stem}.safetensors")
    sidecar = well_sidecar()
    sidecar["data"] = {**sidecar["data"], "dataset": {"name": "wells"}}
    save_program(WellEnergy(), (torch.zeros(2, *SHAPE),), models / "object_sidecar.pt2", sidecar)
    with running_server(settings_for(models, watch_interval_s=0.25)) as (base, app):
        yield base, models, app


def test_each_value_outside_the_schema_is_one_refusal_line_and_the_rest_serve(beside_good) -> None:
    base, _, _ = beside_good
    ready = readyz(base)
    assert ready.status_code == 200 and ready.json()["models"] == ["good"]  # was: exit 3 at start (text_range)
    refused = ready.json()["refused"]
    for stem, (_, reason) in BAD_FILES.items():
        assert reason in refused.get(f"{stem}.safetensors", ""), (stem, refused.get(f"{stem}.safetensors"))
    assert "data.dataset" in refused["object_sidecar.pt2"]
    assert all("\n" not in line and len(line) <= 300 for line in refused.values())
    listed = httpx.get(f"{base}/models", timeout=10)
    assert listed.status_code == 200 and [model["name"] for model in listed.json()] == ["good"]  # was: 500
    assert sample(base, "good").status_code == 200
    assert sample(base, "many_classes").status_code == 404  # was: 503 "IndexError", Retry-After: 1


def test_a_bad_file_added_while_serving_never_stops_a_later_one(beside_good, tmp_path: Path) -> None:
    base, models, _ = beside_good
    bad = BAD_FILES["text_range"][0](tmp_path / "late_bad.safetensors")
    os.replace(bad, models / "late_bad.safetensors")
    wait_for(lambda: "late_bad.safetensors" in readyz(base).json()["refused"], DEADLINE_S, "/readyz naming late_bad")
    os.replace(write_tiny_ebm(tmp_path / "later.safetensors", seed=3), models / "later.safetensors")
    wait_for(lambda: "later" in readyz(base).json()["models"], DEADLINE_S, "the later good file being served")
    assert sample(base, "later").status_code == 200
    report = httpx.post(f"{base}/models/reload", timeout=60).json()
    assert "late_bad" not in report["versions"] and report["applied"]


def test_a_replacement_with_nan_weights_is_refused_and_the_old_version_serves(beside_good, tmp_path: Path) -> None:
    base, models, _ = beside_good
    write_tiny_ebm(tmp_path / "steady.safetensors", seed=1)
    os.replace(tmp_path / "steady.safetensors", models / "steady.safetensors")
    wait_for(lambda: "steady" in readyz(base).json()["models"], DEADLINE_S, "steady being served")
    old = sample(base, "steady").headers["x-model-version"]
    broken = restate(write_tiny_ebm(tmp_path / "steady.safetensors", seed=2), weights=nan_weights)
    os.replace(broken, models / "steady.safetensors")
    wait_for(lambda: "steady.safetensors" in readyz(base).json()["refused"], DEADLINE_S, "/readyz naming steady")
    reason = readyz(base).json()["refused"]["steady.safetensors"]
    assert "NaN" in reason and f"version {old}" in reason and "still serves" in reason
    answer = sample(base, "steady")
    assert answer.status_code == 200 and answer.headers["x-model-version"] == old  # was: 422 "chains diverged"


def test_a_models_directory_moved_away_keeps_serving_and_readyz_says_so(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors")
    with running_server(settings_for(models, watch_interval_s=0.25)) as (base, _):
        models.rename(tmp_path / "moved")
        key = f"{models}/"
        wait_for(lambda: key in readyz(base).json()["refused"], DEADLINE_S, "/readyz naming the missing directory")
        ready = readyz(base)
        assert ready.status_code == 200 and ready.json()["models"] == ["solo"]  # was: 503, every request 404
        assert "cannot list the models directory" in ready.json()["refused"][key]
        assert sample(base, "solo").status_code == 200
        (tmp_path / "moved").rename(models)
        wait_for(lambda: key not in readyz(base).json()["refused"], DEADLINE_S, "the refusal going once it is back")
        assert readyz(base).json()["models"] == ["solo"]


def test_a_byte_budget_for_loaded_models_refuses_new_files_past_it(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for index, name in enumerate(("a", "b", "c")):
        write_tiny_ebm(models / f"{name}.safetensors", seed=index)
    size = (models / "a.safetensors").stat().st_size
    with running_server(settings_for(models, watch_interval_s=0.25, max_loaded_model_bytes=2 * size + 10)) as (base, _):
        ready = readyz(base).json()
        assert ready["models"] == ["a", "b"]  # was: every copy loaded, whatever their sum
        assert "past max_loaded_model_bytes" in ready["refused"]["c.safetensors"]
        (models / "a.safetensors").unlink()  # room again: the refused file is taken at the next scan
        wait_for(lambda: readyz(base).json()["models"] == ["b", "c"], DEADLINE_S, "c being served once a went")


def test_one_object_accounts_loaded_models_buffers_and_chains(tmp_path: Path) -> None:
    """The server's three byte budgets come from its settings in one place (service/catalogue/budgets.py); the
    loaded models' share follows the files: a new version takes its old version's share, a removed file frees it."""
    budgets = MemoryBudgets.from_settings(
        Settings(max_loaded_model_bytes=1000, buffer_budget_mb=2, device_budget_mb=3, models_dir=tmp_path)
    )
    assert (budgets.models.total_bytes, budgets.buffers.total_bytes) == (1000, 2 * 2**20)
    assert budgets.device.total_bytes == 3 * 2**20
    assert MemoryBudgets.from_settings(Settings(device_budget_mb=None, models_dir=tmp_path)).device.total_bytes is None
    models = tmp_path / "models"
    models.mkdir()
    for index, name in enumerate(("a", "b")):
        write_tiny_ebm(models / f"{name}.safetensors", seed=index)
    size = (models / "a.safetensors").stat().st_size
    repository = ModelRepository(models, torch.device("cpu"), 1 << 30, 60, ModelBudget(2 * size + 10))
    repository.scan(everything=True)
    assert repository.budget.loaded == {"a.safetensors": size, "b.safetensors": size}
    write_tiny_ebm(models / "a.safetensors", seed=5)  # a new version of the same size fits in a's share
    assert repository.scan(everything=True).replaced == ["a"]
    write_tiny_ebm(models / "c.safetensors", seed=2)
    report = repository.scan(everything=True)
    assert "past max_loaded_model_bytes" in report.failed["c.safetensors"]
    (models / "b.safetensors").unlink()
    assert repository.scan(everything=True).removed == ["b"]  # its share freed: c is taken at the next scan
    assert repository.scan(everything=True).added == ["c"]
    assert set(repository.budget.loaded) == {"a.safetensors", "c.safetensors"}


def test_reload_requests_coalesce_and_leave_the_answer_threads_free(tmp_path: Path) -> None:
    """No API key: anyone may call POST /models/reload. While one scan is held up, 32 more calls wait for its
    report (one scan at a time, none on the pool that encodes answers), and a PNG is still answered."""
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors")
    with running_server(settings_for(models, watch_interval_s=0)) as (base, app):
        repository = app.state.watcher.repository
        scan, release, threads = repository.scan, threading.Event(), []

        def held_scan(*args, **kwargs):
            threads.append(threading.current_thread().name)
            release.wait(30)
            return scan(*args, **kwargs)

        repository.scan = held_scan
        with ThreadPoolExecutor(32) as clients:
            reloads = [clients.submit(httpx.post, f"{base}/models/reload", timeout=60) for _ in range(32)]
            wait_for(lambda: threads, DEADLINE_S, "a scan starting")
            wait_for(lambda: app.state.reloads.calls == 32, DEADLINE_S, "every call arriving during the held scan")
            answer = httpx.post(f"{base}/sample", json={"model": "solo", "n": 1, "steps": 2}, timeout=20)
            release.set()
            statuses = [reload.result().status_code for reload in reloads]
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        assert statuses == [200] * 32
        assert len(threads) == 2 and all(name.startswith("model-reload") for name in threads), threads
        assert app.state.reloads.started == 2  # the held scan, then one shared by the 31 calls that came during it


def test_a_pool_that_cannot_be_built_fails_only_its_own_models(models_dir: Path, tmp_path: Path) -> None:
    """Defence in depth behind the loader's checks: the worker builds every pool it can and refuses the models
    of one it cannot (was: the whole swap failed, so no change after it was ever served)."""
    repository = ModelRepository(models_dir, torch.device("cpu"), 1 << 30, 60)
    repository.scan(everything=True)

    class Fussy(Worker):
        def _langevin_pool(self, group):
            if group.name == "solo":
                raise ValueError("could not convert string to float: 'a'")
            return super()._langevin_pool(group)

    worker = Fussy(
        repository.registry(), BufferStore(tmp_path / "state"), torch.device("cpu"), Metrics(), 64, 16, 1e9, 0
    )
    assert sorted(worker.served.registry.models) == ["pair", "pair_a", "pair_b"]
    assert "its pool could not be built" in worker.served.registry.refused["solo"]
    write_tiny_ebm(models_dir / "pair_b.safetensors", seed=7, ensemble="pair")
    repository.scan()
    swapped = worker.replace_registry(repository.registry())
    worker.run_once()
    assert (
        swapped.is_set()
        and worker.served.registry.models["pair_b"].version == repository.loaded["pair_b.safetensors"].version
    )


def test_a_program_and_its_sidecar_are_each_opened_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sidecar was parsed from a second read (Path.read_text) after the checked one: a file renamed over it
    in between was read whole, past every cap."""
    program = save_program(WellEnergy(), (torch.zeros(2, *SHAPE),), tmp_path / "well.pt2", well_sidecar())
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(Path, "read_text", lambda *_: pytest.fail("a model file read around the checked reader"))
    monkeypatch.setattr(Path, "read_bytes", lambda *_: pytest.fail("a model file read around the checked reader"))
    model, _ = load_model_file(program, tmp_path, torch.device("cpu"))
    assert model.name == "well" and opened.count("well.pt2") == 1 and opened.count("well.json") == 1


# --- the command line -------------------------------------------------------------------------------------------


def refused_by_cli(words: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line a command prints (after its progress lines) before it exits with 2."""
    with pytest.raises(SystemExit) as ended:
        main(words)
    assert ended.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("stem", ["nan_weights", "many_classes", "deep_metrics", "nested_metrics", "flat_range"])
def test_sample_refuses_a_crafted_file_with_one_line(stem: str, tmp_path: Path, capsys) -> None:
    build, reason = BAD_FILES[stem]
    path = build(tmp_path / f"{stem}.safetensors")
    out = tmp_path / "grid.png"
    line = refused_by_cli(
        ["sample", str(path), "--n", "2", "--steps", "2", "--out", str(out), "--device", "cpu"], capsys
    )
    assert reason in line and not out.exists()  # was: a black PNG, exit 0 (NaN weights); tracebacks


def test_evaluate_refuses_nan_weights_and_never_ends_in_a_linalg_traceback(
    idx_dir: Path, tmp_path: Path, capsys
) -> None:
    path = BAD_FILES["nan_weights"][0](tmp_path / "nan.safetensors")
    words = ["evaluate", str(path), "--data-dir", str(idx_dir), "--n", "20", "--batch", "20", "--device", "cpu"]
    assert "holds NaN or infinite values" in refused_by_cli(words, capsys)
    with pytest.raises(ValueError, match="NaN or infinite"):
        frechet_distance(torch.full((8, 4), math.nan), torch.randn(8, 4))


def test_set_sampler_reads_through_the_loaders_checks(tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    command = [sys.executable, "-m", "training", "set-sampler", str(fifo), "steps=3"]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    ended = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=60)
    assert ended.returncode == 2 and "is not a regular file but a FIFO" in ended.stderr  # was: waited for ever
    huge = tmp_path / "huge.safetensors"
    with huge.open("wb") as handle:
        handle.truncate(2**31)  # sparse: reading it would allocate 2 GiB
    assert "bytes" in refused_by_cli(["set-sampler", str(huge), "steps=3"], capsys)
    bad = BAD_FILES["object_dataset"][0](tmp_path / "bad.safetensors")
    assert "data.dataset" in refused_by_cli(["set-sampler", str(bad), "steps=3"], capsys)
