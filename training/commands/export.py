"""`python -m training export`: a native checkpoint written as a torch.export program and its sidecar, the form
in which a server serves models trained elsewhere (training/runtime/exported.py reads it back)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import torch

from training.families import family_of
from training.runtime.checkpoint import atomic_write_bytes, first_line
from training.runtime.exported import DATA_KEYS, PROGRAM_SUFFIX, SIDECAR_SUFFIX, companion_paths, load_exported
from training.runtime.load import load_model
from training.runtime.loaded import LoadedModel
from training.sampling.sampler_config import to_dict


def export_model(model: LoadedModel, out: str | Path) -> tuple[Path, Path]:
    """Write a native model as OUT (.pt2, from torch.export with a dynamic batch dimension) and its sidecar
    beside it; the two are served like the checkpoint, and give the same seeded samples."""
    out = Path(out)
    if out.suffix != PROGRAM_SUFFIX:
        raise ValueError(f"--out must end in {PROGRAM_SUFFIX} (the sidecar goes beside it), not {out.name!r}")
    family = model.config.family
    model.module.cpu().eval()
    batch = torch.export.Dim("batch", min=1)
    sampler = dict(to_dict(model.sampler))
    data = {key: value for key, value in model.config.data.items() if key in DATA_KEYS}
    plan = family_of(model).export_plan(model, batch)
    for key in plan.data_dropped:
        data.pop(key, None)
    data.update(plan.data_set)
    sampler.update(plan.sampler_set)
    program = _traced(model, plan.wrapper, plan.example, plan.dynamic)
    companions = {
        companion_paths(out)[role]: _traced(model, *traced) for role, traced in sorted(plan.companions.items())
    }
    sidecar: dict[str, Any] = {"family": family, "data": data, "sampler": sampler}
    if model.config.ensemble:
        sidecar["ensemble"] = model.config.ensemble
    if model.config.metrics:
        sidecar["metrics"] = model.config.metrics
    sidecar_path = out.with_suffix(SIDECAR_SUFFIX)  # written first: a server takes a program beside its sidecar
    atomic_write_bytes(sidecar_path, (json.dumps(sidecar, indent=2) + "\n").encode())
    for path, companion in companions.items():  # then its companions (NAME.forward.pt2), read with the program
        atomic_write_bytes(path, _archive(companion))
    atomic_write_bytes(out, _archive(program))
    return out, sidecar_path


def _traced(
    model: LoadedModel, wrapper: torch.nn.Module, example: tuple[torch.Tensor, ...], dynamic: dict[str, Any]
) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(wrapper, example, dynamic_shapes=dynamic)
    except Exception as error:
        arch = model.config.arch.get("name")
        raise ValueError(f"torch.export cannot trace {model.name} ({arch}): {first_line(error)}") from error


def _archive(program: torch.export.ExportedProgram) -> bytes:
    archive = io.BytesIO()
    torch.export.save(program, archive)
    return archive.getvalue()


def run_export(args: argparse.Namespace) -> None:
    model = load_model(args.checkpoint)
    program, sidecar = export_model(model, args.out)
    load_exported(program)  # read back as a server reads it: the checked reader, the archive checks, the probe
    companions = [str(path) for path in companion_paths(program).values() if path.exists()]
    files = ", ".join([str(program), *companions])
    print(f"wrote {files} and {sidecar}: put them all in the models directory to serve {program.stem}")
