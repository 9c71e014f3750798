"""The repository keeps its promises: CI runs the README's test command, the README's two commands exist, its
examples name models a fresh clone serves, its links lead somewhere, the docs site is built strictly by the test
command, and shipped checkpoints read as the repository's own."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from training.commands.ship_paths import portable_record
from training.runtime.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


README = (ROOT / "README.md").read_text()


def readme_section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def quick_start_commands() -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", readme_section("Quick start"), flags=re.S)]


def test_quick_start_gives_exactly_two_commands_serve_and_test() -> None:
    install_and_serve, install_and_test = quick_start_commands()
    assert install_and_serve.startswith("pip install") and install_and_serve.endswith("python -m service")
    assert install_and_test == "bash scripts/test.sh"
    assert "pip install" in (ROOT / "scripts" / "test.sh").read_text()  # the test command installs what it needs


def test_readme_fits_a_first_read() -> None:
    assert len(README.splitlines()) <= 300


def shipped_model_names() -> set[str]:
    names = set()
    for path in (ROOT / "checkpoints").glob("*.safetensors"):
        names.add(path.stem)
        if ensemble := load_checkpoint(path).config.ensemble:
            names.add(ensemble)
    return names


def test_the_readme_samples_shipped_models_until_it_trains_one() -> None:
    """A fresh clone serves checkpoints/ only: every model the README names before its Training section is
    one of them, and its first request is for eqm_mnist, the one that draws digits from noise."""
    before_training = README.split("\n## Training\n", 1)[0]
    named = re.findall(r'"model": "([^"]+)"|client\.\w+\("([^"]+)"', before_training)
    names = [json_name or client_name for json_name, client_name in named]
    assert names[0] == "eqm_mnist"
    assert set(names) <= shipped_model_names(), set(names) - shipped_model_names()


def test_links_from_the_readme_lead_to_files_in_the_repository() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [target for target in targets if "://" not in target]
    assert local, "the README links to the docs pages"
    assert [target for target in local if not (ROOT / target).exists()] == []


def docs_build_command() -> str:
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert ".[test,dev,ray,train,docs]" in script
    (command,) = re.findall(r"^[^#\n]*mkdocs build --strict[^#\n]*", script, flags=re.M)
    return command


@pytest.mark.parametrize(
    ("page", "link"),
    [("api.md", "[a heading that is not there](serving.md#no-such-heading)"), ("api.md", "[a page](no-such-page.md)")],
)
def test_the_test_commands_docs_build_fails_on_a_broken_link(tmp_path: Path, page: str, link: str) -> None:
    pytest.importorskip("mkdocs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    build = subprocess.run(
        ["bash", "-c", docs_build_command()], cwd=tmp_path, env={**os.environ, "site": str(tmp_path / "site")}
    )
    assert build.returncode == 0, "the docs as they are build"
    with (tmp_path / "docs" / page).open("a") as file:
        file.write(f"\n{link}\n")
    build = subprocess.run(
        ["bash", "-c", docs_build_command()], cwd=tmp_path, env={**os.environ, "site": str(tmp_path / "site")}
    )
    assert build.returncode != 0


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
