"""The repository keeps its promises: CI runs the README's test command, the README's two commands exist, and
shipped checkpoints read as the repository's own."""

import json
import re
from pathlib import Path

from training.commands.ship_paths import portable_record
from training.runtime.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quick_start_gives_exactly_two_commands_serve_and_test() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    assert "python -m service" in commands[0]
    assert "test" in commands[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert script[-1].strip() == quick_start_commands()[1]
    assert (ROOT / quick_start_commands()[1].split()[-1]).is_file()


def test_torch_is_pinned_to_the_local_cpu_wheel_version() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject


def test_shipped_checkpoints_record_their_runs_in_the_repository_layout() -> None:
    for path in sorted((ROOT / "checkpoints").glob("*.safetensors")):
        training = load_checkpoint(path).config.training
        recorded = json.dumps(training)
        assert not re.search(r"(/root|/home|/work|/tmp|~)/", recorded), f"{path.name} records a machine's own paths"
        args = training.get("args") or {}
        if "out" in args:
            assert args["out"] == f"checkpoints/{path.stem}.safetensors"
            assert args["out"] in training["command"]


def test_portable_record_rewrites_paths_in_args_and_command_alike() -> None:
    record = {
        "args": {"out": "/root/r/x.safetensors", "run_dir": "/root/r/x.run", "data_dir": "/srv/m/mnist", "epochs": 3},
        "command": "python -m training ebm --data-dir /srv/m/mnist --out /root/r/x.safetensors --run-dir /root/r/x.run",
    }
    portable = portable_record(record, "eqm_mnist")
    assert portable["args"] == {
        "out": "checkpoints/eqm_mnist.safetensors",
        "run_dir": "runs/eqm_mnist",
        "data_dir": "data/mnist",
        "epochs": 3,
    }
    assert portable["command"] == (
        "python -m training ebm --data-dir data/mnist --out checkpoints/eqm_mnist.safetensors --run-dir runs/eqm_mnist"
    )
    assert record["args"]["out"] == "/root/r/x.safetensors"  # a copy: the run's own record is untouched
