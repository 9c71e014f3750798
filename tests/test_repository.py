"""The repository keeps its promises: CI runs the README's test command, and the README's two commands exist."""

import re
from pathlib import Path

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
