"""What `python -m service` says while it starts, read line by line as a newcomer's terminal shows it: its
threads, what it is loading and how long that took, and the address only once the address answers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import write_tiny_ebm, write_tiny_gan
from server import free_port

REPO = Path(__file__).resolve().parents[2]


def test_the_address_is_printed_once_it_answers_after_what_loaded(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors")
    write_tiny_gan(models / "gan.safetensors")
    port = free_port()
    command = [sys.executable, "-m", "service", "--models-dir", str(models), "--state-dir", str(tmp_path / "state")]
    command += ["--device", "cpu", "--port", str(port)]
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    environment["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip())
            if "listening on" in line:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)  # at once: no retry, no wait
                break
        else:
            raise AssertionError("the server ended without saying where it listens:\n" + "\n".join(lines))
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    log = "\n".join(lines)
    assert ready.status_code == 200 and ready.json()["models"] == ["gan", "solo"], log
    assert lines[-1].endswith(f"listening on http://127.0.0.1:{port} (Ctrl+C to stop)"), log
    threads = re.search(r"torch threads: (\d+) \(auto: (\d+) of (\d+) cores idle\)", log)
    assert threads and threads[1] == threads[2] and 1 <= int(threads[1]) <= int(threads[3]), log
    said = [
        f"loading 2 model files from {models} ...",
        "loaded gan.safetensors (gan): version ",
        "loaded solo.safetensors (solo): version ",
        "serving 2 models on cpu: gan, solo (loaded in ",
        "listening on",
    ]
    where = [log.find(words) for words in said]
    assert -1 not in where and where == sorted(where), log
    assert re.search(r"loaded solo\.safetensors \(solo\): version \w+ in \d+\.\d s", log), log
