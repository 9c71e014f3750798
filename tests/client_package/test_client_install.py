"""The client is its own light distribution: `pip install ./clients/python` in a fresh virtual environment that has
no torch, and the installed package speaks to a real server.

It costs one pip install, about 25 s on CI's machine with pip's cache warm (measured: 5 s building the client with
flit_core, 9 s resolving httpx, numpy and pillow against the index, 8 s unpacking them, numpy most); the first run on a
machine also downloads about 25 MB of wheels. Byte-compiling them is skipped (--no-compile): it doubled the time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_tiny_ebm
from server import running_server

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

# Run by the fresh environment's Python: no torch, no server code; the client alone against the server at argv[1].
USE_THE_CLIENT = """
import importlib.util, json, sys
from samplebay_client import Client, NotFound, Samples

missing = [name for name in ("torch", "service", "training", "fastapi") if importlib.util.find_spec(name)]
with Client(sys.argv[1]) as client:
    names = [model.name for model in client.models()]
    samples = client.sample("solo", n=3, steps=2, seed=4)
    items = list(client.stream("solo", n=2, steps=4, trajectory_every=2))
    try:
        client.sample("nothing-by-that-name")
        not_found = None
    except NotFound as error:
        not_found = error.status
print(json.dumps({
    "found": missing, "names": names, "shape": list(samples.array().shape), "seed": samples.seed,
    "stream": [type(item).__name__ for item in items], "not_found": not_found,
    "file": __import__("samplebay_client").__file__,
}))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("install")
    (root / "models").mkdir()
    write_tiny_ebm(root / "models" / "solo.safetensors", seed=0)
    settings = Settings(models_dir=root / "models", state_dir=root / "state", device="cpu")
    with running_server(settings) as (base, _):
        yield base


def test_the_client_installs_without_torch_and_speaks_to_a_real_server(server: str, tmp_path: Path) -> None:
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=False)  # the outer pip installs into it (--python): no pip of its own to set up
    python = environment / "bin" / "python"
    source = ROOT / "clients" / "python"  # flit_core builds from it without writing into it
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile", str(source)]
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    subprocess.run(install, check=True, env=env, timeout=300)

    ran = subprocess.run(
        [str(python), "-c", USE_THE_CLIENT, server], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stderr
    seen = json.loads(ran.stdout)
    assert seen["found"] == []  # neither torch nor the server's code came along
    assert seen["file"].startswith(str(environment))
    assert seen["names"] == ["solo"] and seen["shape"] == [3, 28, 28] and seen["seed"] == 4
    assert seen["stream"] == ["Frame", "Frame", "Frame", "Samples"] and seen["not_found"] == 404
