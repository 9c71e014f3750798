"""Hostile files in the models directory (issue 25), each built here: an architecture too large to build, a
FIFO, a directory, a link out of the folder, a file over the size cap, a file slower than the time limit,
sampler values no request could send. Start-up stays bounded, each is refused with one line in /readyz
(without echoing what a link out of the folder points at), and a good model beside them is served."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch
from conftest import write_tiny_ebm
from pydantic import ValidationError
from server import running_server, wait_for
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from service.catalogue.registry import load_registry
from service.http.schemas import SampleRequest
from service.settings import Settings
from training.models import MAX_MODULES, ArchitectureTooLarge, build_model
from training.runtime.checkpoint import Checkpoint, ModelConfig, read_metadata, save_checkpoint
from training.sampling.sampler_config import EBMSampler, FlowSampler, GANSampler

REPO = Path(__file__).resolve().parents[2]
SIZE_CAP = 1 << 20  # the test server's max_model_bytes; a tiny EBM is about 0.2 MB
SECRET = "top-secret-family"  # what the file behind the outward link says; /readyz must never show it
SHAPE = [1, 28, 28]


def write_arch(path: Path, family: str, arch: dict) -> Path:
    """A 2 KB checkpoint whose config asks for `arch`; its one tensor fits no architecture."""
    config = ModelConfig(
        family=family,
        arch=arch,
        data={"shape": SHAPE, "range": [-1.0, 1.0]},
        sampler={"temperature": 1.0} if family == "flow" else {},
        training={},
        metrics={},
    )
    save_checkpoint(path, Checkpoint(config, {"scale": torch.zeros(1)}))
    return path


def write_with_sampler(path: Path, **sampler: object) -> Path:
    """A tiny EBM whose stored sampler settings are replaced as a hand-edited (or hostile) file would be."""
    write_tiny_ebm(path)
    payload = path.read_bytes()
    config = json.loads(read_metadata(payload, path.name)["config"])
    config["sampler"] = sampler.pop("whole") if "whole" in sampler else {**config["sampler"], **sampler}
    tensors = safetensors.torch.load(payload)
    path.write_bytes(safetensors.torch.save(tensors, metadata={"config": json.dumps(config)}))
    return path


BAD_SAMPLERS = {  # file stem -> (its sampler settings, what its refusal must say)
    "steps_text": ({"steps": "6"}, "sampler steps must be an integer in [1, 2147483647], not '6'"),
    "steps_float": ({"steps": 1e12}, "sampler steps must be an integer in [1, 2147483647], not 1000000000000.0"),
    "steps_huge": ({"steps": 2**40}, "sampler steps must be an integer in [1, 2147483647], not 1099511627776"),
    "step_nan": ({"step_size": math.nan}, "sampler step_size must be a number in (0, 1000], not nan"),
    "noise_inf": ({"noise": math.inf}, "sampler noise must be a number in [0, 10], not inf"),
    "momentum_one": ({"momentum": 1.0}, "sampler momentum must be a number in [0, 0.999], not 1.0"),
    "cold": ({"temperature": 0}, "sampler temperature must be a number in [0.001, 100], not 0"),
    "clamp_text": ({"clamp": "yes"}, "sampler clamp must be true or false, not 'yes'"),
    "init_number": ({"init": 3}, "sampler init must be a string, not 3"),
    "not_an_object": ({"whole": [1, 2]}, "sampler settings must be an object of names and values, not a list"),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory):
    """A models directory with one good EBM among every hostile file, behind a running server; and how long
    the server took to become ready."""
    root = tmp_path_factory.mktemp("hostile")
    models = root / "models"
    models.mkdir()
    write_tiny_ebm(models / "good.safetensors")
    nice = {"shape": SHAPE, "couplings": 65_536, "hidden": 1, "depth": 65_536}  # each number under its cap
    write_arch(models / "nice_bomb.safetensors", "flow", {"name": "nice", "kwargs": nice})
    os.mkfifo(models / "fifo.pt2")  # read_bytes blocks until someone writes: start-up would never end
    (models / "fifo.json").write_text(json.dumps({"family": "ebm", "data": {"shape": SHAPE}, "sampler": {}}))
    os.mkfifo(models / "pipe.safetensors")
    os.mkfifo(models / "piped.json")  # a regular-looking program whose sidecar is a FIFO
    (models / "piped.pt2").write_bytes(b"PK\x05\x06" + bytes(18))
    (models / "folder.safetensors").mkdir()
    outside = root / "elsewhere"
    outside.mkdir()
    secret = write_tiny_ebm(outside / "secret.safetensors")
    config = json.loads(read_metadata(secret.read_bytes(), "secret")["config"])
    tensors = safetensors.torch.load(secret.read_bytes())
    secret.write_bytes(safetensors.torch.save(tensors, metadata={"config": json.dumps({**config, "family": SECRET})}))
    (models / "outward.safetensors").symlink_to(secret)
    (models / "alias.safetensors").symlink_to("good.safetensors")  # a link inside the folder is served
    (models / "dangling.safetensors").symlink_to(root / "gone.safetensors")
    with (models / "huge.safetensors").open("wb") as handle:
        handle.truncate(SIZE_CAP + 1)  # sparse: no disk, but reading it would allocate it
    for stem, (sampler, _) in BAD_SAMPLERS.items():
        write_with_sampler(models / f"{stem}.safetensors", **sampler)
    settings = Settings(
        models_dir=models, state_dir=root / "state", device="cpu", max_model_bytes=SIZE_CAP, model_load_timeout_s=30
    )
    started = time.monotonic()
    with running_server(settings) as (base, _):
        yield base, time.monotonic() - started


def test_start_up_is_bounded_and_the_good_model_is_served(hostile) -> None:
    base, seconds = hostile
    assert seconds < 30  # the nice bomb alone ran over 40 s and 1.6 GB; a FIFO hung start-up for good
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["ready"] and ready["models"] == ["alias", "good"]
    answer = httpx.post(f"{base}/sample", json={"model": "good", "n": 2, "steps": 2, "format": "json"}, timeout=60)
    assert answer.status_code == 200 and len(answer.json()["images"]) == 2


def test_each_hostile_file_is_refused_with_one_line(hostile) -> None:
    base, _ = hostile
    refused = httpx.get(f"{base}/readyz").json()["refused"]
    assert all("\n" not in reason and len(reason) <= 500 for reason in refused.values()), refused
    assert "arch 'nice' would build more than" in refused["nice_bomb.safetensors"]
    for name in ("fifo.pt2", "pipe.safetensors", "folder.safetensors"):
        assert "is not a regular file" in refused[name], name
    assert "piped.json is not a regular file" in refused["piped.pt2"]
    assert f"{SIZE_CAP + 1:,} bytes" in refused["huge.safetensors"] and "max_model_bytes" in refused["huge.safetensors"]
    assert "leads outside the models directory" in refused["outward.safetensors"]
    assert "does not resolve" in refused["dangling.safetensors"]


def test_a_link_out_of_the_models_dir_is_refused_before_it_is_read(hostile) -> None:
    base, _ = hostile
    text = httpx.get(f"{base}/readyz").text
    assert SECRET not in text and "elsewhere" not in text


def test_sampler_values_no_request_could_send_are_refused_at_load(hostile) -> None:
    base, _ = hostile
    refused = httpx.get(f"{base}/readyz").json()["refused"]
    for stem, (_, reason) in BAD_SAMPLERS.items():
        assert reason in refused[f"{stem}.safetensors"], (stem, refused.get(f"{stem}.safetensors"))


def test_a_file_slower_than_the_time_limit_is_given_up(tmp_path: Path) -> None:
    write_tiny_ebm(tmp_path / "slow.safetensors")
    registry = load_registry(tmp_path, torch.device("cpu"), load_timeout_s=1e-6)
    assert not registry.models
    assert "took longer than 1e-06 s to load (model_load_timeout_s)" in registry.refused["slow.safetensors"]


NEVER_FINISHES = """
import sys, threading
from pathlib import Path
import training.runtime.load
def stuck(*args):
    Path(sys.argv[1]).touch()  # start-up has reached this file
    threading.Event().wait()
training.runtime.load._load_checkpoint = stuck
from service.__main__ import main
main(sys.argv[2:])
"""


def test_sigterm_during_a_long_start_up_ends_the_process(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_ebm(models / "stuck.safetensors")
    reached = tmp_path / "loading"
    flags = ["--models-dir", str(models), "--state-dir", str(tmp_path / "state"), "--device", "cpu", "--port", "0"]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", NEVER_FINISHES, str(reached), *flags],
        cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: reached.exists() or process.poll() is not None, 60, "start-up reaching the checkpoint")
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)  # was: only SIGKILL ended it
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGTERM


BLOW_UPS = [  # every number under MAX_ARCH_NUMBER (65,536), the product not
    ("nice", {"shape": SHAPE, "couplings": 65_536, "hidden": 1, "depth": 65_536}),
    ("nice", {"shape": SHAPE, "couplings": 2, "hidden": 65_536, "depth": 2}),
    ("glow", {"shape": SHAPE, "levels": 1, "steps": 1, "hidden": 65_536}),
    ("iresnet", {"shape": SHAPE, "blocks": 1, "hidden": 65_536}),
    ("conv_energy", {"width": 65_536}),
    ("unet_energy", {"width": 65_536}),
    ("mlp_generator", {"latent_dim": 65_536, "hidden": 65_536}),
    ("conv_generator", {"latent_dim": 128, "width": 65_536}),
    ("unet_velocity", {"width": 65_536}),
]


@pytest.mark.parametrize(("name", "kwargs"), BLOW_UPS, ids=[f"{name}-{i}" for i, (name, _) in enumerate(BLOW_UPS)])
def test_an_architecture_past_the_build_limits_is_refused_before_anything_is_allocated(name: str, kwargs: dict) -> None:
    started = time.monotonic()
    with pytest.raises(ArchitectureTooLarge, match=f"arch '{name}' would build more than"):
        build_model({"name": name, "kwargs": kwargs})
    assert time.monotonic() - started < 20


LOW_CAPS = [("MAX_MODULES", "10 modules"), ("MAX_VALUES", "1,000 parameter"), ("MAX_BUILD_CALLS", "100 torch")]


@pytest.mark.parametrize(("limit", "what"), LOW_CAPS)
def test_each_build_limit_refuses_on_its_own(limit: str, what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each counter at a low cap, on an i-ResNet (modules, parameters, and power iterations while it is built)."""
    monkeypatch.setattr(f"training.models.{limit}", int(what.split()[0].replace(",", "")))
    with pytest.raises(ArchitectureTooLarge, match=f"more than {what}"):
        build_model({"name": "iresnet", "kwargs": {"shape": SHAPE, "blocks": 2, "hidden": 8}})


def test_the_build_limits_count_only_the_thread_that_builds() -> None:
    """torch's registration hooks are global: a model built in another thread meanwhile (a training run beside
    a server's start-up) is neither counted nor refused."""
    beside: list[int] = []
    started: list[threading.Thread] = []

    def build_beside() -> None:
        beside.append(len(nn.Sequential(*[nn.ReLU() for _ in range(2 * MAX_MODULES)])))

    def meanwhile(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        if not started:  # the first registration of the checked build: build another model beside it
            started.append(threading.Thread(target=build_beside))
            started[0].start()
            started[0].join()

    handle = register_module_module_registration_hook(meanwhile)
    try:
        model = build_model({"name": "nice", "kwargs": {"shape": SHAPE, "couplings": 2, "hidden": 8, "depth": 1}})
    finally:
        handle.remove()
    assert beside == [2 * MAX_MODULES] and sum(p.numel() for p in model.parameters()) > 0


# Request field -> (the sampler that stores its default, a value just outside, one on the edge inside)
SHARED_BOUNDS = {
    "step_size": (EBMSampler, 1000.5, 1000),
    "noise": (EBMSampler, 10.5, 10),
    "momentum": (EBMSampler, 0.9995, 0.999),
    "guidance": (EBMSampler, 20.5, 20),
    "temperature": (FlowSampler, 0.0005, 0.001),
    "steps": (GANSampler, -1, 0),
}


@pytest.mark.parametrize("field", sorted(SHARED_BOUNDS))
def test_a_checkpoints_default_and_a_request_are_bounded_alike(field: str) -> None:
    kind, outside, edge = SHARED_BOUNDS[field]
    with pytest.raises(ValidationError):
        SampleRequest(model="m", **{field: outside})
    with pytest.raises(ValueError, match=f"sampler {field} must be"):
        kind(**{field: outside})
    SampleRequest(model="m", **{field: edge})
    kind(**{field: edge})


def test_a_build_refused_for_its_torch_calls_leaves_gradients_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal is raised once: the calls that unwind the build (a no_grad block's exit) still run, so the
    thread's grad mode is restored and training after it still has gradients."""
    import training.models as models

    for cap in range(20, 400, 9):  # refused at many points of the build, inside and outside no_grad blocks
        monkeypatch.setattr(models, "MAX_BUILD_CALLS", cap)
        with pytest.raises(models.ArchitectureTooLarge):
            models.skeleton({"name": "iresnet", "kwargs": {"shape": SHAPE, "blocks": 2, "hidden": 8}})
        assert torch.is_grad_enabled(), cap
