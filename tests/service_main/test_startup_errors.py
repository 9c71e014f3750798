"""What a newcomer sees when `python -m service` cannot start: one line naming the problem and its fix,
exit status 2, no traceback; and `--help` explains every flag."""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import write_tiny_ebm

from service.__main__ import build_parser
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def run_service(*args: str, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **environment}
    command = [sys.executable, "-m", "service", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def one_checkpoint(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    write_tiny_ebm(directory / "solo.safetensors")
    return directory


def assert_one_line_error(result: subprocess.CompletedProcess, *naming: str) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("python -m service: error: ")
    for words in naming:
        assert words in line
    return line


def test_a_missing_or_empty_models_dir_is_one_line(tmp_path: Path) -> None:
    missing = run_service("--models-dir", str(tmp_path / "nope"))
    assert_one_line_error(missing, f"models directory {tmp_path / 'nope'} does not exist", "point --models-dir")
    (tmp_path / "empty").mkdir()
    empty = run_service("--models-dir", str(tmp_path / "empty"))
    assert_one_line_error(empty, "holds no *.safetensors checkpoint or *.pt2 program", "python -m training")
    (tmp_path / "a-file").write_text("")
    not_a_folder = run_service("--models-dir", str(tmp_path / "a-file"))
    assert_one_line_error(not_a_folder, "is not a directory", "point --models-dir")


def test_a_state_dir_that_cannot_be_made_is_one_line(one_checkpoint: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    is_a_file = run_service("--models-dir", str(one_checkpoint), "--state-dir", str(blocker))
    assert_one_line_error(is_a_file, f"state directory {blocker} is a file", "point --state-dir")
    under_a_file = run_service("--models-dir", str(one_checkpoint), "--state-dir", str(blocker / "state"))
    assert_one_line_error(under_a_file, f"cannot make state directory {blocker / 'state'}", "point --state-dir")


def test_a_port_in_use_is_one_line(one_checkpoint: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        places = ("--models-dir", str(one_checkpoint), "--state-dir", str(tmp_path / "state"))
        result = run_service(*places, "--port", str(port))
    assert_one_line_error(result, f"port {port} on 127.0.0.1 is already in use", "choose another --port")


def test_bad_settings_are_one_line_naming_flag_and_variable() -> None:
    flags = run_service("--max-n", "0", "--port", "http")
    line = assert_one_line_error(flags, "bad setting", "--max-n (or SAMPLEBAY_MAX_N) '0'", "greater than or equal to 1")
    assert "--port (or SAMPLEBAY_PORT) 'http'" in line and "valid integer" in line
    environment = run_service(SAMPLEBAY_BODY_TIMEOUT_S="soon")
    assert_one_line_error(environment, "--body-timeout-s (or SAMPLEBAY_BODY_TIMEOUT_S) 'soon'", "valid number")
    unknown = run_service("--modles-dir", "x")
    assert_one_line_error(unknown, "unrecognized arguments: --modles-dir", "--help")


def test_every_flag_has_help_with_its_default_and_the_help_has_examples() -> None:
    for action in build_parser()._actions:
        if action.dest != "help":
            assert action.help and "(default: " in action.help, action.option_strings
    result = run_service("--help")
    assert result.returncode == 0 and result.stderr == ""
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in result.stdout
    assert result.stdout.count("(default:") == len(Settings.model_fields)
    assert "examples:" in result.stdout and "samplebay-serve" in result.stdout


def test_samplebay_serve_is_a_console_script_for_the_same_main() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["samplebay-serve"].split(":")
    assert getattr(importlib.import_module(module), function) is importlib.import_module("service.__main__").main
