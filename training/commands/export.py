"""`python -m training export`: a native checkpoint written as a torch.export program and its sidecar, the form
in which a server serves models trained elsewhere (training/runtime/exported.py reads it back)."""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from training.families import family_of
from training.families.base import ExportPlan
from training.runtime.checkpoint import atomic_write_bytes, first_line
from training.runtime.exported import DATA_KEYS, PROGRAM_SUFFIX, SIDECAR_SUFFIX, companion_paths, load_exported
from training.runtime.load import load_model
from training.runtime.loaded import LoadedModel
from training.sampling.sampler_config import to_dict


def export_model(model: LoadedModel, out: str | Path) -> tuple[Path, Path]:
    """Write a native model as OUT (.pt2, from torch.export with a dynamic batch dimension), its sidecar beside
    it and the companion programs its family exports with it (a GAN's critic as OUT's NAME.critic.pt2); they
    are served like the checkpoint, and give the same seeded samples."""
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
    for key in plan.sampler_dropped:
        sampler.pop(key, None)
    sampler.update(plan.sampler_set)
    program = _archive(plan, model, "")
    companions = {role: _archive(part, model, f"its {role}") for role, part in plan.companions.items()}
    sidecar: dict[str, Any] = {"family": family, "data": data, "sampler": sampler}
    if model.config.ensemble:
        sidecar["ensemble"] = model.config.ensemble
    if model.config.metrics:
        sidecar["metrics"] = model.config.metrics
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
    return out, sidecar_path


def _archive(plan: ExportPlan, model: LoadedModel, what: str) -> bytes:
    """The .pt2 bytes of one traced module of `model` (`what`: "" for its own, "its critic", ...)."""
    try:
        program = torch.export.export(plan.wrapper, plan.example, dynamic_shapes=plan.dynamic)
    except Exception as error:
        arch = model.config.arch.get("name")
        named = f"{model.name} ({arch})" + (f", {what}" if what else "")
        raise ValueError(f"torch.export cannot trace {named}: {first_line(error)}") from error
    archive = io.BytesIO()
    torch.export.save(program, archive)
    return archive.getvalue()


def run_export(args: argparse.Namespace) -> None:
    model = load_model(args.checkpoint)
    program, sidecar = export_model(model, args.out)
    load_exported(program)  # read back as a server reads it: the checked reader, the archive checks, the probe
    written = [program, sidecar, *(path for path in companion_paths(program).values() if path.exists())]
    names = ", ".join(str(path) for path in written[:-1]) + f" and {written[-1]}"
    print(f"wrote {names}: put them in the models directory to serve {program.stem}")
