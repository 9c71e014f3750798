import json
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_ebm

from training.commands.cli import main
from training.runtime.checkpoint import load_checkpoint
from training.runtime.load import load_model
from training.train.data import toy2d
from training.train.ebm_cd import train_ebm
from training.train.ebm_config import EBMTrainConfig


def toy_config(tmp_path: Path, **overrides) -> EBMTrainConfig:
    fields = dict(
        dataset="toy2d:8gaussians",
        out=str(tmp_path / "toy.safetensors"),
        epochs=2,
        batch_size=64,
        lr=1e-3,
        steps=10,
        step_size=0.01,
        noise=0.01,
        grad_clip=1.0,
        buffer_capacity=512,
        max_batches=25,
        validate_batches=4,
        seed=0,
        device="cpu",
    )
    fields.update(overrides)
    return EBMTrainConfig(**fields)


def test_tiny_ebm_learns_lower_energy_on_data_than_on_noise(tmp_path: Path) -> None:
    path = train_ebm(toy_config(tmp_path, epochs=3, max_batches=60))
    model = load_model(path)
    data = toy2d("8gaussians", 1000, torch.Generator().manual_seed(5))
    noise = torch.rand(1000, 2, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        assert model.module(data).mean() < model.module(noise).mean()
    run_dir = Path(str(path).removesuffix(".safetensors") + ".run")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2, 3]
    assert records[-1]["val_cd"] < 0
    assert (run_dir / "samples_epoch003.png").is_file()


def test_checkpoint_records_how_it_was_made(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(train_ebm(toy_config(tmp_path, epochs=1, ensemble="toys")))
    config = checkpoint.config
    assert config.family == "ebm" and config.ensemble == "toys"
    assert config.data["shape"] == [2]
    assert config.sampler["step_size"] == 0.01 and config.sampler["restart_prob"] == 0.05
    assert config.training["seed"] == 0 and config.training["device"] == "cpu"
    assert config.training["wall_seconds"] > 0
    assert "val_cd" in config.metrics
    assert checkpoint.extras["replay_buffer"]["samples"].shape[1:] == (2,)


def test_same_seed_gives_the_same_weights(tmp_path: Path) -> None:
    first = load_checkpoint(train_ebm(toy_config(tmp_path / "a", epochs=1, max_batches=5)))
    second = load_checkpoint(train_ebm(toy_config(tmp_path / "b", epochs=1, max_batches=5)))
    for name, tensor in first.weights.items():
        assert torch.equal(tensor, second.weights[name])


def test_resume_continues_where_the_run_stopped(tmp_path: Path) -> None:
    straight = load_checkpoint(train_ebm(toy_config(tmp_path / "straight", epochs=2, max_batches=5)))
    train_ebm(toy_config(tmp_path / "resumed", epochs=1, max_batches=5))
    resumed = load_checkpoint(train_ebm(toy_config(tmp_path / "resumed", epochs=2, max_batches=5, resume=True)))
    assert resumed.config.training["epochs_done"] == 2
    for name, tensor in straight.weights.items():
        assert torch.allclose(tensor, resumed.weights[name], atol=1e-6), name


def test_cli_trains_samples_and_evaluates_on_idx_data(tmp_path: Path, idx_dir: Path, capsys) -> None:
    checkpoint = tmp_path / "digits.safetensors"
    main(
        [
            "ebm",
            "--data-dir",
            str(idx_dir),
            "--epochs",
            "1",
            "--max-batches",
            "2",
            "--batch-size",
            "16",
            "--steps",
            "3",
            "--width",
            "8",
            "--out",
            str(checkpoint),
            "--device",
            "cpu",
        ]
    )
    grid = tmp_path / "grid.png"
    main(
        [
            "sample",
            str(checkpoint),
            "--n",
            "4",
            "--steps",
            "3",
            "--init",
            "buffer",
            "--trajectory",
            "1",
            "--out",
            str(grid),
            "--device",
            "cpu",
        ]
    )
    from PIL import Image

    with Image.open(grid) as image:
        assert image.size == (2 + 2 * 30, 2 + 2 * 30)
    with Image.open(grid.with_suffix(".gif")) as animation:
        assert animation.n_frames == 3

    classifier = tmp_path / "classifier.safetensors"
    main(["classifier", "--data-dir", str(idx_dir), "--epochs", "1", "--out", str(classifier), "--device", "cpu"])
    capsys.readouterr()
    main(
        [
            "evaluate",
            str(checkpoint),
            "--data-dir",
            str(idx_dir),
            "--n",
            "64",
            "--steps",
            "2",
            "--classifier",
            str(classifier),
            "--device",
            "cpu",
            "--record",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    recorded = load_checkpoint(checkpoint).config.metrics["evaluate_noise"]
    assert recorded["frechet_distance"] == report["model"]["frechet_distance"] and recorded["steps"] == 2
    assert set(report["model"]) == {
        "frechet_distance",
        "coverage_bits",
        "precision",
        "recall",
        "n",
        "second_classifier",
    }
    assert set(report["second_classifier"]) == {"model", "real_data_floor"}  # the figures again, another network
    assert report["real_data_floor"]["frechet_distance"] < report["model"]["frechet_distance"]

    members = [write_tiny_ebm(tmp_path / f"pair_{seed}.safetensors", seed=seed, ensemble="pair") for seed in (1, 2)]
    ensemble = [*map(str, members), "--data-dir", str(idx_dir), "--n", "32", "--init", "buffer"]
    ensemble += ["--classifier", str(classifier), "--device", "cpu", "--record"]
    for flags, key in (([], "evaluate_ensemble_buffer"), (["--noise", "0.02"], "evaluate_ensemble_buffer_noise_0.02")):
        main(["evaluate", *ensemble, *flags])
        report = json.loads(capsys.readouterr().out)
        for member in members:  # an ensemble's figures are recorded in every member, a noisier check apart
            recorded = load_checkpoint(member).config.metrics[key]
            assert recorded["frechet_distance"] == report["model"]["frechet_distance"]
    metrics = load_checkpoint(members[0]).config.metrics
    assert metrics["evaluate_ensemble_buffer"]["noise"] == 0.005 and metrics[key]["noise"] == 0.02
    with pytest.raises(SystemExit):  # a lone EBM and an ensemble member are not one ensemble
        main(
            [
                "evaluate",
                str(checkpoint),
                str(members[0]),
                "--data-dir",
                str(idx_dir),
                "--n",
                "8",
                "--classifier",
                str(classifier),
                "--device",
                "cpu",
            ]
        )
