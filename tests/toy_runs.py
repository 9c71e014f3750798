"""Tiny toy-2D training runs of each family, as the CLI starts them, for the trainers' tests."""

from __future__ import annotations

from pathlib import Path

TOY_RUNS = {  # family (and EBM objective) -> the flags of a tiny toy-2D run
    "ebm": ["ebm", "--dataset", "toy2d:8gaussians", "--steps", "5", "--buffer-capacity", "256"],
    "eqm": ["ebm", "--objective", "eqm", "--dataset", "toy2d:8gaussians", "--autocast", "none"],
    "gan": ["gan", "--dataset", "toy2d:checkerboard", "--latent-dim", "8"],
    "flow": ["flow", "--arch", "nice", "--dataset", "toy2d:moons", "--hidden", "16", "--test-batches", "1"],
}  # fmt: skip


def toy_command(kind: str, out: Path, *flags: str, epochs: int = 1) -> list[str]:
    common = ["--out", str(out), "--epochs", str(epochs), "--batch-size", "64", "--max-batches", "4"]
    if kind in ("ebm", "eqm"):
        common += ["--validate-batches", "1"]
    return [*TOY_RUNS[kind], *common, "--device", "cpu", "--threads", "1", *flags]
