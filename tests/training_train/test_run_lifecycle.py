"""A run's files are safe from a rerun of its own command: `--resume` on a finished run says so and writes
nothing, a fresh start over an earlier run is refused unless `--force` (which then replaces it whole), and the
zoo, which restarts runs that have no resume state, passes `--force` itself.

Every run is a toy 2-D density of 4 batches an epoch, through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_runs import TOY_RUNS, toy_command

from training.commands import zoo
from training.commands.cli import main
from training.runtime.checkpoint import load_checkpoint


def toy_run(kind: str, directory: Path, *flags: str, epochs: int = 1) -> Path:
    """Train (or continue) `directory/<kind>.safetensors` in this process; returns the checkpoint's path."""
    out = directory / f"{kind}.safetensors"
    main(toy_command(kind, out, *flags, epochs=epochs))
    return out


def files_of(out: Path) -> dict[str, bytes]:
    """The checkpoint and everything in its run directory, byte for byte."""
    run_dir = out.with_suffix(".run")
    return {path.name: path.read_bytes() for path in [out, *sorted(run_dir.iterdir())]}


@pytest.mark.parametrize("kind", sorted(TOY_RUNS))
def test_resume_on_a_finished_run_says_so_and_writes_nothing(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = toy_run(kind, tmp_path, epochs=2)
    before = files_of(out)
    capsys.readouterr()
    toy_run(kind, tmp_path, "--resume", epochs=2)  # returns: the command exits 0
    said = capsys.readouterr().out
    assert "the run already finished at epoch 2/2" in said and "Raise --epochs above 2 to continue it" in said
    assert str(out) in said
    toy_run(kind, tmp_path, "--resume", epochs=1)
    assert "already finished at epoch 2, past --epochs 1" in capsys.readouterr().out
    assert files_of(out) == before

    toy_run(kind, tmp_path, "--resume", epochs=3)  # raising --epochs continues it
    assert load_checkpoint(out).config.training["epochs_done"] == 3


@pytest.mark.parametrize("kind", sorted(TOY_RUNS))
def test_a_fresh_start_over_an_earlier_run_is_refused_and_leaves_it_as_it_was(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = toy_run(kind, tmp_path, epochs=2)
    before = files_of(out)
    capsys.readouterr()
    for flags in ([], ["--init-from", str(out)]):  # a warm start is a fresh start too
        with pytest.raises(SystemExit) as stopped:
            toy_run(kind, tmp_path, *flags, epochs=2)
        assert stopped.value.code == 2
        error = capsys.readouterr().err
        run_dir = out.with_suffix(".run")
        assert error.startswith("error: a fresh start would overwrite an earlier run: ")
        assert str(out) in error and str(run_dir / "metrics.jsonl") in error and "resume.safetensors" in error
        assert f"2 sample grids in {run_dir}" in error
        assert "continue it with --resume, start afresh over it with --force" in error
    assert files_of(out) == before


def test_force_starts_afresh_and_keeps_nothing_of_the_earlier_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The forced run is the run an empty directory gives, and its run directory holds only its own files."""
    out = toy_run("gan", tmp_path / "reused", epochs=3)
    capsys.readouterr()
    toy_run("gan", tmp_path / "reused", "--force", "--seed", "1", epochs=1)
    assert "--force: removed the earlier run's 5 file(s)" in capsys.readouterr().out  # metrics, resume, 3 grids
    run_dir = out.with_suffix(".run")
    assert sorted(path.name for path in run_dir.iterdir()) == [
        "metrics.jsonl",
        "resume.safetensors",
        "samples_epoch001.png",
    ]
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    assert load_checkpoint(run_dir / "resume.safetensors").config.training["resume_epoch"] == 1

    fresh = load_checkpoint(toy_run("gan", tmp_path / "fresh", "--seed", "1", epochs=1))
    forced = load_checkpoint(out)
    assert forced.config.training["epochs_done"] == 1 and forced.config.training["seed"] == 1
    for name, tensor in fresh.weights.items():
        assert torch.equal(tensor, forced.weights[name]), name
    assert "force" not in forced.config.training["args"] and "--force" not in forced.config.training["command"]


def test_a_checkpoint_without_a_run_is_not_overwritten_and_resume_is_not_offered(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = toy_run("gan", tmp_path, epochs=1)
    (tmp_path / "someone_elses.safetensors").write_bytes(out.read_bytes())
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(toy_command("gan", tmp_path / "someone_elses.safetensors"))
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"overwrite an earlier run: {tmp_path / 'someone_elses.safetensors'}; start afresh" in error
    assert "--resume" not in error and "--force" in error


def test_resume_without_a_resume_state_and_resume_with_force_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as stopped:
        toy_run("gan", tmp_path, "--resume")
    assert stopped.value.code == 2
    assert "start the run once without --resume" in capsys.readouterr().err
    assert not (tmp_path / "gan.run").exists()  # refused before the data or the run directory

    toy_run("gan", tmp_path)
    with pytest.raises(SystemExit) as stopped:
        toy_run("gan", tmp_path, "--resume", "--force", epochs=2)
    assert stopped.value.code == 2
    assert "--resume continues the run in" in capsys.readouterr().err


def test_the_commands_exit_status_is_0_for_a_finished_run_and_2_for_a_refused_start(tmp_path: Path) -> None:
    out = toy_run("gan", tmp_path)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(*flags: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "training", *toy_command("gan", out, *flags)]
        return subprocess.run(argv, capture_output=True, text=True, env=environment, timeout=120)

    finished = command("--resume")
    assert finished.returncode == 0 and "already finished at epoch 1/1" in finished.stdout
    refused = command()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and "--force" in refused.stderr


def test_the_zoo_warm_starts_with_force_over_what_an_unfinished_chunk_left(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoints, runs = tmp_path / "checkpoints", tmp_path / "runs"
    toy_run("gan", checkpoints)  # the 'shipped' model, at epoch 1
    left = toy_run("gan", runs, "--seed", "7")  # a chunk's checkpoint and metrics; its resume state is gone
    (runs / "gan.run" / "resume.safetensors").unlink()
    (planned,) = zoo.plan(checkpoints, runs, epochs_more=1)
    assert planned.action == "init-from" and "--force" in planned.argv
    main(planned.argv)
    assert load_checkpoint(left).config.training["epochs_done"] == 2
    epochs = [json.loads(line)["epoch"] for line in (runs / "gan.run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [2]  # the earlier chunk's epoch-1 line went with it

    (following,) = zoo.plan(checkpoints, runs, epochs_more=1)
    assert following.action == "finished" and following.argv == []
    capsys.readouterr()


def test_a_warm_start_past_its_epochs_says_how_to_train_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--epochs counts the warm start's epochs too: a run that would end at once says so (it printed nothing)."""
    out = toy_run("gan", tmp_path / "first", epochs=2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        toy_run("gan", tmp_path / "warm", "--init-from", str(out), epochs=2)
    assert stopped.value.code == 2
    assert "has trained 2 epochs, and --epochs counts them too: give --epochs above 2" in capsys.readouterr().err
    assert not (tmp_path / "warm" / "gan.safetensors").exists()
    toy_run("gan", tmp_path / "warm", "--init-from", str(out), epochs=3)  # one more epoch on top of its two
    assert (tmp_path / "warm" / "gan.safetensors").exists()
