"""What a newcomer reads before running anything: every command's --help explains every flag with its default
and shows an example; long commands report progress in plain lines when their output goes to a file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import write_tiny_ebm, write_tiny_gan

from training.commands.cli import HelpFormatter, build_parser, main
from training.train.progress import PlainProgress

COMMANDS = (
    "ebm",
    "gan",
    "flow",
    "sample",
    "evaluate",
    "score",
    "export",
    "classifier",
    "zoo",
    "set-sampler",
    "fetch-data",
)


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def test_every_command_is_covered_here() -> None:
    assert set(command_parsers()) == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_with_its_default_and_the_command_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = command_parsers()[command]
    formatter = HelpFormatter(parser.prog)
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{command} {action.option_strings or action.dest}: no help"
        if action.option_strings and action.default is not argparse.SUPPRESS:
            assert action.option_strings[-1] in text
            assert "default" in formatter._get_help_string(action), f"{command} {action.option_strings}: no default"
    assert "\nexample" in text and f"python -m training {command}" in text.split("\nexample")[-1]


def test_sample_says_where_its_chains_started_and_reports_progress_in_lines_when_piped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PlainProgress, "interval", 0.0)  # a line per step: the test's stderr is not a terminal
    checkpoint = write_tiny_ebm(tmp_path / "tiny.safetensors", steps=5)
    out = tmp_path / "grid.png"
    main(["sample", str(checkpoint), "--n", "4", "--init", "noise", "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert "start: uniform noise, the checkpoint's prior" in captured.out
    lines = captured.err.splitlines()
    assert lines[0].startswith("sample tiny: 1/5 (20%)") and lines[-1].startswith("sample tiny: 5/5 (100%)")
    assert "\r" not in captured.err and out.is_file()

    main(["sample", str(checkpoint), "--n", "4", "--init", "buffer", "--out", str(out), "--device", "cpu"])
    assert "start: the replay buffer saved in the checkpoint (32 samples)" in capsys.readouterr().out


def test_evaluate_reports_progress_while_it_samples(
    tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PlainProgress, "interval", 0.0)
    checkpoint = write_tiny_gan(tmp_path / "gan.safetensors")
    main(["evaluate", str(checkpoint), "--data-dir", str(idx_dir), "--n", "40", "--batch", "20", "--device", "cpu"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["model"]["n"] == 40
    assert "evaluate gan: 40 samples: 2/2 (100%)" in captured.err
