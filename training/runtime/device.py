"""Which device to run on, how many CPU threads, what chain steps compute in, and how a checkpoint names the
device: shared by training, the CLI and the server."""

from __future__ import annotations

import contextlib

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


SAMPLING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SAMPLING_DTYPE_CHOICES = ("auto", *SAMPLING_DTYPES)
SAMPLING_DTYPE_HELP = (
    "what the steps of chains (Langevin, DDLS, a CNF's ODE) compute the energy or field in: float32, bfloat16"
    " (autocast; the chains' states stay float32), or auto: bfloat16 where the device has bfloat16 arithmetic"
    " (a CPU with AVX512-BF16 or AMX, a CUDA GPU of compute capability 8+), else float32"
)


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware (emulated bfloat16 would be slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return False


def sampling_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype named by --sampling-dtype on `device` (SAMPLING_DTYPE_HELP says what auto picks)."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if name not in SAMPLING_DTYPES:
        raise ValueError(f"sampling dtype must be one of {', '.join(SAMPLING_DTYPE_CHOICES)}, not {name!r}")
    return SAMPLING_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: how logs, reports and --sampling-dtype name it."""
    return str(dtype).removeprefix("torch.")


def chain_precision(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """Where one step of chains runs: under autocast to `dtype` (float32: plain float32), so the energy's or
    field's convolutions and matrix products run in it while the states, noise and clamps stay float32. The
    CLI's draws (training/runtime/draw.py) and the server's chain pools step inside it, and nothing else does."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
