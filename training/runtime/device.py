"""Which device to run on, how many CPU threads, and how a checkpoint names it: shared by training, the CLI
and the server."""

from __future__ import annotations

import torch

from training.runtime.cores import thread_count


def pick_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when present, else CPU; anything else is passed to torch as written."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return device


def use_threads(setting: int | str | None) -> str:
    """Set torch's CPU threads by training/runtime/cores.py's rule; the start-up line that says how many and why."""
    count, why = thread_count(setting)
    torch.set_num_threads(count)
    return f"torch threads: {count} ({why})"


def device_name(device: torch.device) -> str:
    """'cpu' or the GPU's marketing name, so a checkpoint says what it was trained on."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
