"""`python -m training sample --seed S` and POST /sample with the same seed and settings give the same images."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import write_tiny_ebm, write_tiny_eqm, write_tiny_flow, write_tiny_gan
from PIL import Image
from server import running_server

from service.catalogue.buffer_store import BufferStore
from service.catalogue.registry import load_registry
from service.settings import Settings
from training.commands.cli import main as training_main


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    models = tmp_path_factory.mktemp("models")
    write_tiny_ebm(models / "ebm.safetensors")
    write_tiny_gan(models / "gan.safetensors")
    write_tiny_eqm(models / "eqm.safetensors")
    write_tiny_flow(models / "nice.safetensors", arch_name="nice")
    write_tiny_flow(models / "glow.safetensors", arch_name="glow")
    state = tmp_path_factory.mktemp("state")
    with running_server(Settings(models_dir=models, state_dir=state, device="cpu")) as (base, _):
        yield models, base


@pytest.mark.parametrize(
    ("model", "cli_flags", "request_fields"),
    [
        ("ebm", ["--steps", "6", "--init", "noise"], {"steps": 6, "init": "noise"}),
        ("eqm", ["--label", "3"], {"label": 3}),
        ("eqm", [], {}),  # no label: a class drawn from each chain's seed
        ("gan", [], {}),
        ("nice", [], {}),
        ("glow", [], {}),
    ],
)
def test_the_cli_and_the_server_draw_the_same_images_for_a_seed(
    served, tmp_path: Path, model: str, cli_flags: list[str], request_fields: dict
) -> None:
    models, base = served
    out = tmp_path / "cli.png"
    checkpoint = str(models / f"{model}.safetensors")
    training_main(["sample", checkpoint, "--n", "4", "--seed", "77", "--out", str(out), "--device", "cpu", *cli_flags])
    reply = httpx.post(f"{base}/sample", json={"model": model, "n": 4, "seed": 77, **request_fields}, timeout=60)
    assert reply.status_code == 200, reply.text
    from_cli = np.asarray(Image.open(out))
    from_server = np.asarray(Image.open(io.BytesIO(reply.content)))
    assert from_cli.shape == from_server.shape and from_cli.std() > 0
    assert np.array_equal(from_cli, from_server)


@pytest.mark.parametrize("model", ["solo", "pair_a"])  # a lone EBM, and one member of the ensemble 'pair'
def test_sample_state_dir_starts_from_the_buffer_the_server_saved(
    models_dir: Path, tmp_path: Path, model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    settings = Settings(models_dir=models_dir, state_dir=state, device="cpu", buffer_save_interval_s=3600)
    with running_server(settings) as (base, _):  # chains that finish go into the buffer, saved at shutdown
        reply = httpx.post(f"{base}/sample", json={"model": model, "n": 8, "steps": 10, "init": "noise"}, timeout=60)
        assert reply.status_code == 200, reply.text
    checkpoint = str(models_dir / f"{model}.safetensors")
    flags = ["--n", "4", "--seed", "5", "--steps", "3", "--device", "cpu"]
    training_main(["sample", checkpoint, *flags, "--state-dir", str(state), "--out", str(tmp_path / "cli.png")])
    assert f"start: the server's replay buffer {state}/buffer-" in capsys.readouterr().out
    training_main(["sample", checkpoint, *flags, "--init", "buffer", "--out", str(tmp_path / "checkpoint.png")])
    assert "start: the replay buffer saved in the checkpoint" in capsys.readouterr().out
    with running_server(settings) as (base, _):  # restarted: it starts from the buffer it saved
        request = {"model": model, "n": 4, "seed": 5, "steps": 3, "init": "buffer"}
        reply = httpx.post(f"{base}/sample", json=request, timeout=60)
        assert reply.status_code == 200, reply.text
    from_server = np.asarray(Image.open(io.BytesIO(reply.content)))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli.png")), from_server)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "checkpoint.png")), from_server)


def test_sample_state_dir_without_a_saved_buffer_says_what_the_server_does(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "buffer-solo-0123456789abcdef.safetensors").write_bytes(b"an older checkpoint's buffer")
    with pytest.raises(SystemExit):
        training_main(["sample", str(models_dir / "solo.safetensors"), "--state-dir", str(state), "--device", "cpu"])
    error = capsys.readouterr().err
    assert "has no replay buffer buffer-solo-" in error and "buffer-solo-0123456789abcdef" in error


def test_sample_state_dir_finds_the_files_the_server_pools_for_every_model(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lone EBM, an ensemble member, an exported energy (its digest covers the program and its sidecar), and
    a state dir holding an unsharded file and a Ray replica's shard: the CLI reads exactly the server's files."""
    training_main(["export", str(models_dir / "solo.safetensors"), "--out", str(models_dir / "exported.pt2")])
    state = tmp_path / "state"
    plain = Settings(models_dir=models_dir, state_dir=state, device="cpu", buffer_save_interval_s=3600)
    names = ("solo", "pair_a", "exported")
    for settings in (plain, plain.model_copy(update={"buffer_shard": "replica1"})):
        with running_server(settings) as (base, _):  # buffers are saved at shutdown: unsharded, then the shard
            for name in names:
                request = {"model": name, "n": 8, "steps": 10, "init": "noise"}
                assert httpx.post(f"{base}/sample", json=request, timeout=60).status_code == 200
    registry = load_registry(models_dir, torch.device("cpu"))
    for name in names:
        group = registry.models[name].pool
        served_files = BufferStore(state).saved_paths(group, registry.groups[group].digest)
        stem = f"buffer-{group}-{registry.groups[group].digest[:16]}"
        assert [path.name for path in served_files] == [f"{stem}-replica1.safetensors", f"{stem}.safetensors"]
        suffix = ".pt2" if name == "exported" else ".safetensors"
        flags = ["--n", "2", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / f"{name}.png")]
        training_main(["sample", str(models_dir / f"{name}{suffix}"), *flags, "--state-dir", str(state)])
        files = ", ".join(str(path) for path in served_files)
        assert f"start: the server's replay buffer {files} (" in capsys.readouterr().out
