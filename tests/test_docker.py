"""The Dockerfile and compose files, checked statically (no Docker engine runs on these machines)."""

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


class ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it: `!reset` (Compose 2.24+) clears a value inherited from the base file."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def compose(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


def test_compose_reserves_a_gpu_and_keeps_buffers_on_a_named_volume() -> None:
    service = compose("docker-compose.yml")["services"]["samplebay"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "8000:8000" in service["ports"]
    assert "./checkpoints:/models:ro" in service["volumes"]
    assert "replay-buffers:/state" in service["volumes"]
    assert "replay-buffers" in compose("docker-compose.yml")["volumes"]
    assert service["restart"] == "unless-stopped"
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert service["healthcheck"]["start_period"] == "60s"


def test_compose_settings_are_real_settings() -> None:
    environment = compose("docker-compose.yml")["services"]["samplebay"]["environment"]
    fields = {name.upper() for name in Settings.model_fields}
    for variable in environment:
        assert variable.startswith("SAMPLEBAY_") and variable.removeprefix("SAMPLEBAY_") in fields, variable


def test_cpu_override_drops_the_gpu_reservation() -> None:
    override = compose("docker-compose.cpu.yml")["services"]["samplebay"]
    assert override["deploy"] is None  # !reset
    assert override["environment"]["SAMPLEBAY_DEVICE"] == "cpu"


def test_dockerfile_copies_every_folder_the_install_finds_packages_in() -> None:
    """pyproject finds the client in clients/python (its own distribution's folder); an image without that folder
    would install a server whose service.client fails to import."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for folder in find["where"]:
        for package in (pattern.rstrip("*") for pattern in find["include"]):
            if (ROOT / folder / package / "__init__.py").is_file():
                path = os.path.normpath(f"{folder}/{package}")
                assert any(
                    re.search(rf"^COPY {re.escape(copied)} \./{re.escape(copied)}$", dockerfile, re.M)
                    for copied in (path, os.path.normpath(folder))
                ), f"the Dockerfile does not copy {path}"
                assert package in dockerfile.split("pip install .")[1].splitlines()[0]  # the import check after it
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "clients" not in ignored and "clients/python" not in ignored


def test_dockerfile_pins_torch_runs_as_a_user_and_checks_readiness() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"pip install torch=={pinned}" in dockerfile  # the project layer then reuses it
    assert dockerfile.index("pip install torch") < dockerfile.index("pip install .")
    user = re.search(r"^USER (\S+)", dockerfile, re.M).group(1)
    assert user not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n.*/readyz", dockerfile, re.M)
    assert 'CMD ["python", "-m", "service"]' in dockerfile
    for variable in re.findall(r"(SAMPLEBAY_\w+)=", dockerfile):
        assert variable.removeprefix("SAMPLEBAY_").lower() in Settings.model_fields, variable


def test_an_empty_api_key_from_compose_turns_the_key_off(monkeypatch) -> None:
    monkeypatch.setenv("SAMPLEBAY_API_KEY", "")
    assert Settings().api_key is None


def compose_command() -> list[str] | None:
    """`docker compose` (v2) when the plugin is there, else Debian's `docker-compose` (v1), else None."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(compose_command() is None, reason="neither `docker compose` nor `docker-compose` is installed")
def test_compose_config_accepts_the_files() -> None:
    """Compose itself parses, validates and resolves the file (no engine needed for `config`)."""
    command = compose_command()
    resolved = subprocess.run(
        [*command, "-f", "docker-compose.yml", "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "SAMPLEBAY_API_KEY": ""},
    )
    assert resolved.returncode == 0, resolved.stderr
    service = yaml.safe_load(resolved.stdout)["services"]["samplebay"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    if command == ["docker", "compose"]:  # v1 predates `!reset`, which the CPU override needs
        merged = subprocess.run(
            [*command, "-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml", "config"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert merged.returncode == 0, merged.stderr
        assert "deploy" not in yaml.safe_load(merged.stdout)["services"]["samplebay"]
