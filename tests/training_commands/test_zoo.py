"""Chunked, resumable training: --stop-after-minutes, --init-from warm starts, and the `zoo` command.

Every run here is a toy 2-D density of a few batches per epoch, so the tests need no MNIST."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.commands.cli import main
from training.commands.zoo import FILE_LIMIT, ShipRefused, check_sizes
from training.runtime.checkpoint import load_checkpoint

# family -> flags of a tiny toy-2D run (a few batches an epoch)
TOY_RUNS = {
    "ebm": ["ebm", "--dataset", "toy2d:8gaussians", "--steps", "5", "--buffer-capacity", "256"],
    "eqm": ["ebm", "--objective", "eqm", "--dataset", "toy2d:8gaussians", "--autocast", "none"],
    "gan": ["gan", "--dataset", "toy2d:checkerboard", "--latent-dim", "8"],
    "flow": ["flow", "--arch", "nice", "--dataset", "toy2d:moons", "--hidden", "16", "--test-batches", "1"],
}  # fmt: skip
BATCH_NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # they move in any forward pass


def toy_run(kind: str, directory: Path, *flags: str, epochs: int = 3) -> Path:
    """Train (or continue) a tiny run of 4 batches an epoch into `directory`; returns its output checkpoint."""
    out = directory / f"{kind}.safetensors"
    common = ["--out", str(out), "--epochs", str(epochs), "--batch-size", "64", "--max-batches", "4"]
    if kind in ("ebm", "eqm"):
        common += ["--validate-batches", "1"]
    main([*TOY_RUNS[kind], *common, "--device", "cpu", "--threads", "1", *flags])
    return out


def learned(checkpoint_path: Path) -> dict[str, torch.Tensor]:
    """The trained parameters of a checkpoint's network."""
    weights = load_checkpoint(checkpoint_path).weights
    return {name: tensor for name, tensor in weights.items() if not name.endswith(BATCH_NORM_STATISTICS)}


@pytest.mark.parametrize("kind", sorted(TOY_RUNS))
def test_stop_after_zero_minutes_ends_after_one_epoch_and_resume_continues_exactly(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    straight = toy_run(kind, tmp_path / "straight")
    chunked = toy_run(kind, tmp_path / "chunked", "--stop-after-minutes", "0")
    assert "--stop-after-minutes 0: stopped after epoch 1 of 3" in capsys.readouterr().out
    assert load_checkpoint(chunked).config.training["epochs_done"] == 1
    assert "stop-after-minutes" not in load_checkpoint(chunked).config.training["command"]  # schedule, not recipe
    toy_run(kind, tmp_path / "chunked", "--stop-after-minutes", "0", "--resume")
    assert load_checkpoint(chunked).config.training["epochs_done"] == 2
    toy_run(kind, tmp_path / "chunked", "--resume")
    assert load_checkpoint(chunked).config.training["epochs_done"] == 3
    expected, resumed = learned(straight), learned(chunked)
    for name, tensor in expected.items():
        assert torch.allclose(tensor, resumed[name], atol=1e-6), name


@pytest.mark.parametrize("kind", ["ebm", "gan", "flow"])
def test_init_from_starts_at_the_shipped_weights_and_counts_its_epochs_on(kind: str, tmp_path: Path) -> None:
    shipped = toy_run(kind, tmp_path / "shipped", epochs=1)
    warm = toy_run(kind, tmp_path / "warm", "--init-from", str(shipped), "--lr", "0", epochs=2)
    record = load_checkpoint(warm).config.training
    assert record["epochs_done"] == 2 and "--init-from" in record["command"]
    for name, tensor in learned(shipped).items():  # a learning rate of 0 leaves the shipped weights as they were
        assert torch.equal(tensor, learned(warm)[name]), name
    if kind == "gan":
        critic = load_checkpoint(warm).extras["critic"]
        for name, tensor in load_checkpoint(shipped).extras["critic"].items():
            assert name.endswith(BATCH_NORM_STATISTICS) or torch.equal(tensor, critic[name]), name
        assert record["generator_updates"] > load_checkpoint(shipped).config.training["generator_updates"]


@pytest.mark.parametrize("kind", ["ebm", "gan", "flow"])
def test_init_from_a_different_arch_is_refused_with_a_message(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shipped = toy_run(kind, tmp_path / "shipped", epochs=1)
    other = {"ebm": ["--spectral"], "gan": ["--latent-dim", "4"], "flow": ["--couplings", "2"]}[kind]
    with pytest.raises(SystemExit) as stopped:
        toy_run(kind, tmp_path / "other", "--init-from", str(shipped), *other, epochs=2)
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert f"--init-from {shipped}: its arch" in message and "differs from this run's" in message


def test_zoo_dry_run_warm_starts_without_a_run_dir_and_resumes_with_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoints, runs = tmp_path / "checkpoints", tmp_path / "runs"
    toy_run("gan", checkpoints, epochs=1)  # the 'shipped' model: checkpoints/gan.safetensors
    zoo = ["zoo", "--checkpoints", str(checkpoints), "--runs-dir", str(runs), "--preset", "cpu", "--epochs-more", "2"]
    capsys.readouterr()

    main([*zoo, "--dry-run"])
    planned = capsys.readouterr().out
    assert f"--init-from {(checkpoints / 'gan.safetensors').resolve()}" in planned and "--resume" not in planned
    assert f"--out {(runs / 'gan.safetensors').resolve()}" in planned and "--epochs 3" in planned
    assert not runs.exists()  # a dry run writes nothing

    main([*zoo, "--stop-after-minutes", "0"])  # one chunk: the warm start's first epoch (epoch 2 of 3)
    assert load_checkpoint(runs / "gan.safetensors").config.training["epochs_done"] == 2
    assert "stopped after epoch 2 of 3" in (runs / "gan.log").read_text()

    main([*zoo, "--dry-run"])
    planned = capsys.readouterr().out
    assert "# gan: resume (epoch 2 of 3)" in planned and "--resume" in planned

    main(zoo)  # the next chunk finishes the run
    capsys.readouterr()
    main([*zoo, "--dry-run", "--ship"])
    planned = capsys.readouterr().out
    assert "gan: finished" in planned and "would ship" in planned and "evaluate" in planned


def test_ship_copies_a_finished_run_as_float16_then_records_figures_and_prints_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from training.commands import zoo

    checkpoints, runs = tmp_path / "checkpoints", tmp_path / "runs"
    toy_run("flow", checkpoints, epochs=1)
    plan = zoo.plan(checkpoints, runs, epochs_more=1)
    main([*TOY_RUNS["flow"], *plan[0].argv[1:]])  # the zoo's command, in this process
    called: list[list[str]] = []
    monkeypatch.setattr(zoo.subprocess, "call", lambda argv: called.append(argv) or 0)  # evaluate needs MNIST
    assert zoo.ship(zoo.plan(checkpoints, runs, epochs_more=1), checkpoints, data_dir="D", device="cpu") == 0
    shipped = load_checkpoint(checkpoints / "flow.safetensors")
    assert shipped.config.training["epochs_done"] == 2
    assert shipped.config.training["args"]["out"] == "checkpoints/flow.safetensors"  # not this machine's runs dir
    assert shipped.config.training["args"]["run_dir"] == "runs/flow"
    assert str(runs) not in shipped.config.training["command"]
    assert {tensor.dtype for tensor in shipped.weights.values() if tensor.is_floating_point()} == {torch.float16}
    evaluate, table = called
    shipped_path = str(checkpoints / "flow.safetensors")
    assert evaluate[3:] == ["evaluate", shipped_path, "--record", "--device", "cpu", "--data-dir", "D"]
    assert table[1].endswith("bench/models_table.py") and table[2] == str(checkpoints)
    capsys.readouterr()
    zoo.ship(zoo.plan(checkpoints, runs, epochs_more=1), checkpoints, data_dir=None, device="cpu")
    assert "nothing to ship" in capsys.readouterr().out  # shipped already; the next plan aims 1 epoch further
    following = zoo.plan(checkpoints, runs, epochs_more=1)[0]
    assert following.action == "resume" and following.note == "epoch 2 of 3"


def test_an_ensemble_is_evaluated_with_all_its_members_once(models_dir: Path) -> None:
    from training.commands.zoo import evaluations

    members = [models_dir / "pair_a.safetensors", models_dir / "pair_b.safetensors"]
    metrics = {path: load_checkpoint(path).config.metrics for path in members}
    assert evaluations(models_dir, members, metrics) == [
        [*map(str, members), "--record", "--init", "buffer", "--steps", "10"]
    ]


def test_the_size_guard_refuses_a_file_over_the_limit_and_a_directory_over_its_own(tmp_path: Path) -> None:
    (tmp_path / "kept.safetensors").write_bytes(b"x" * 1000)
    check_sizes({tmp_path / "new.safetensors": FILE_LIMIT - 1}, tmp_path)  # just under: fine
    with pytest.raises(ShipRefused, match=r"new.safetensors would be 5.00 MiB; shipped files stay under 5 MiB"):
        check_sizes({tmp_path / "new.safetensors": FILE_LIMIT}, tmp_path)
    with pytest.raises(ShipRefused, match="would hold"):
        check_sizes({tmp_path / "new.safetensors": 600}, tmp_path, directory_limit=1500)
    check_sizes({tmp_path / "kept.safetensors": 1400}, tmp_path, directory_limit=1500)  # a replaced file counts once


def test_zoo_refuses_chunks_longer_than_a_lent_gpus_command_limit(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["zoo", "--checkpoints", str(tmp_path), "--runs-dir", str(tmp_path), "--stop-after-minutes", "10"])
    assert stopped.value.code == 2


def test_a_gans_ddls_figures_are_renewed_at_the_steps_they_were_measured_with(tmp_path: Path) -> None:
    from conftest import write_tiny_gan

    from training.commands.zoo import evaluations
    from training.runtime.checkpoint import save_checkpoint

    path = write_tiny_gan(tmp_path / "gan.safetensors")
    checkpoint = load_checkpoint(path)
    checkpoint.config.metrics.update(
        evaluate={"n": 2000, "steps": 0},
        evaluate_steps_100={"n": 2000, "steps": 100},
        **{"evaluate_steps_50_step_size_0.001_noise_0.02": {"n": 2000, "steps": 50}},
    )
    save_checkpoint(path, checkpoint)
    assert evaluations(tmp_path, [path], {path: checkpoint.config.metrics}) == [
        [str(path), "--record"],
        [str(path), "--record", "--steps", "100"],
        [str(path), "--record", "--steps", "50", "--step-size", "0.001", "--noise", "0.02"],
    ]
