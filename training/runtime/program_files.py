"""Writing a served program bundle: a module traced by torch.export into `.pt2` bytes, and `NAME.pt2` written with
its sidecar `NAME.json` and companions `NAME.<role>.pt2` in the order a watching server reads safely. Shared by
`python -m training export` (this project's checkpoints) and training/convert.py (users' own modules);
training/runtime/exported.py reads the bundle back."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.runtime.checkpoint import atomic_write_bytes, first_line
from training.runtime.exported import PROGRAM_SUFFIX, SIDECAR_SUFFIX, companion_paths


def trace_program(module: nn.Module, example: tuple[torch.Tensor, ...], dynamic: Any, named: str) -> bytes:
    """The .pt2 bytes of `module` traced on `example` with `dynamic` shapes; ValueError naming `named` when
    torch.export cannot trace it."""
    try:
        program = torch.export.export(module, example, dynamic_shapes=dynamic)
    except Exception as error:
        raise ValueError(f"torch.export cannot trace {named}: {first_line(error)}") from error
    archive = io.BytesIO()
    torch.export.save(program, archive)
    return archive.getvalue()


def check_program_path(out: str | Path, flag: str = "out") -> Path:
    """`out` as a Path; ValueError unless it ends in .pt2 (the sidecar and companions go beside it)."""
    out = Path(out)
    if out.suffix != PROGRAM_SUFFIX:
        raise ValueError(f"{flag} must end in {PROGRAM_SUFFIX} (the sidecar goes beside it), not {out.name!r}")
    return out


def write_bundle(out: Path, sidecar: dict[str, Any], program: bytes, companions: Mapping[str, bytes]) -> Path:
    """Write OUT's sidecar, its companions by role and OUT itself, each atomically; an earlier bundle's companion
    that this one lacks is removed. Returns the sidecar's path."""
    # The sidecar and the companions first, the program last: a server that scans between two renames sees a
    # companion without its program (refused until the program comes), never the program without them.
    sidecar_path = out.with_suffix(SIDECAR_SUFFIX)
    atomic_write_bytes(sidecar_path, (json.dumps(sidecar, indent=2) + "\n").encode())
    for role, path in companion_paths(out).items():
        if role in companions:
            atomic_write_bytes(path, companions[role])
        elif os.path.lexists(path):
            path.unlink()  # an earlier export's: the bundle written is this model's whole
    atomic_write_bytes(out, program)
    return sidecar_path
