"""Every shipped model exported and served beside its checkpoint at each --sampling-dtype: the copy's seeded
samples over HTTP against the checkpoint's (issue 36).

    python bench/export_parity.py checkpoints
    python bench/export_parity.py checkpoints --dtypes float32 --n 4

Each checkpoint in FOLDER is copied into a fresh models directory and written beside it by `python -m training
export` as NAME_export.pt2 (with its sidecar and companions: a GAN's critic); a checkpoint export refuses (the
i-ResNet, whose inverse iterates) is listed with the reason. Then one server per dtype serves them all, and each
model and its copy are asked for the same seeded JSON samples (an energy from noise: its replay buffer would
make them depend on earlier requests). A row per model and dtype: both statuses and the DDLS, Langevin or ODE
steps each took; how far the copy's PNGs are from the checkpoint's at that dtype and at float32, and how far the
checkpoint's own are from its float32 ones (what bfloat16 rounding does to it): each as the largest difference
in 8-bit levels and the share of pixels that differ at all.
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import launch  # bench/launch.py, beside this script
import numpy as np
from PIL import Image

from training.commands.export import export_model
from training.runtime.checkpoint import first_line
from training.runtime.exported import load_exported
from training.runtime.load import load_model

SUFFIX = "_export"  # a copy's name: the checkpoint's and this


def export_all(folder: Path, models: Path) -> dict[str, str]:
    """Copy every checkpoint of `folder` into `models` and export it there; the reason for each one refused."""
    refused = {}
    for checkpoint in sorted(folder.glob("*.safetensors")):
        copy = models / checkpoint.name
        shutil.copy(checkpoint, copy)
        out = models / f"{checkpoint.stem}{SUFFIX}.pt2"
        started = time.perf_counter()
        try:
            export_model(load_model(copy), out)
            load_exported(out)  # read back as the server will
        except Exception as error:
            refused[checkpoint.stem] = first_line(error)
            for leftover in models.glob(f"{checkpoint.stem}{SUFFIX}.*"):
                leftover.unlink()
            continue
        print(f"exported {checkpoint.stem} in {time.perf_counter() - started:.1f} s", flush=True)
    return refused


def images(reply: httpx.Response) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.open(io.BytesIO(base64.b64decode(image)))) for image in reply.json()["images"]]
    ).astype(int)


def draw(base: str, name: str, family: str, n: int, seed: int) -> tuple[str, np.ndarray | None]:
    """A model's seeded samples: (its status and steps, or the start of its refusal; its pixels when 200)."""
    body = {"model": name, "n": n, "seed": seed, "format": "json", **({"init": "noise"} if family == "ebm" else {})}
    reply = httpx.post(f"{base}/sample", json=body, timeout=600)
    if reply.status_code != 200:
        return f"{reply.status_code} {reply.text[:60]}", None
    return f"200, {reply.json().get('steps')} steps", images(reply)


def distance(a: np.ndarray | None, b: np.ndarray | None) -> str:
    """How far two sets of 8-bit images are: the largest difference in levels, the share of pixels that differ."""
    if a is None or b is None:
        return ""
    difference = np.abs(a - b)
    return f"{int(difference.max())}, {(difference > 0).mean():.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the checkpoints to export (checkpoints/)")
    parser.add_argument("--dtypes", default="auto,float32,bfloat16", help="the servers' --sampling-dtype, in turn")
    parser.add_argument("--n", type=int, default=8, help="samples per request")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    work = Path(tempfile.mkdtemp(prefix="export-parity-"))
    models = work / "models"
    models.mkdir()
    drawn: dict[tuple[str, str], tuple[str, np.ndarray | None]] = {}  # (model, dtype) -> its answer
    families: dict[str, str] = {}
    try:
        refused = export_all(args.folder, models)
        for dtype in ["float32", *(dtype for dtype in dtypes if dtype != "float32")]:  # float32: the reference
            flags = ["--models-dir", str(models), "--state-dir", str(work / f"state-{dtype}"), "--device", "cpu"]
            flags += ["--sampling-dtype", dtype, "--watch-interval-s", "0"]
            process, base = launch.start_server(flags, args.threads, work / f"server-{dtype}.log")
            try:
                listed = {model["name"]: model for model in httpx.get(f"{base}/models", timeout=60).json()}
                for name in sorted(name for name in listed if name + SUFFIX in listed):
                    families[name] = listed[name]["family"]
                    for served in (name, name + SUFFIX):
                        drawn[served, dtype] = draw(base, served, families[name], args.n, args.seed)
            finally:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
        print(
            "| model | family | --sampling-dtype | checkpoint | copy | copy vs checkpoint | copy vs checkpoint "
            "at float32 | checkpoint vs itself at float32 |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for dtype in dtypes:
            for name, family in families.items():
                (said, native), (copy_said, copy) = drawn[name, dtype], drawn[name + SUFFIX, dtype]
                reference = drawn[name, "float32"][1]
                cells = [name, family, dtype, said, copy_said, distance(copy, native), distance(copy, reference)]
                cells.append(distance(native, reference))
                print("| " + " | ".join(cells) + " |", flush=True)
        for name, reason in refused.items():
            print(f"not exported: {name}: {reason}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
