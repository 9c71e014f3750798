"""`python -m training export`: a native checkpoint written as a torch.export program and its sidecar, the form
in which a server serves models trained elsewhere (training/runtime/exported.py reads it back)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from training.families import family_of
from training.families.base import ExportPlan
from training.runtime.exported import DATA_KEYS, companion_paths, load_exported
from training.runtime.load import load_model
from training.runtime.loaded import LoadedModel
from training.runtime.program_files import check_program_path, trace_program, write_bundle
from training.sampling.sampler_config import to_dict


def export_model(model: LoadedModel, out: str | Path) -> tuple[Path, Path]:
    """Write a native model as OUT (.pt2, from torch.export with a dynamic batch dimension), its sidecar beside
    it and the companion programs its family exports with it (a GAN's critic as OUT's NAME.critic.pt2); they
    are served like the checkpoint, and give the same seeded samples."""
    out = check_program_path(out, "--out")
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
    sidecar_path = write_bundle(out, sidecar, program, companions)
    return out, sidecar_path


def _archive(plan: ExportPlan, model: LoadedModel, what: str) -> bytes:
    """The .pt2 bytes of one traced module of `model` (`what`: "" for its own, "its critic", ...)."""
    named = f"{model.name} ({model.config.arch.get('name')})" + (f", {what}" if what else "")
    return trace_program(plan.wrapper, plan.example, plan.dynamic, named)


def run_export(args: argparse.Namespace) -> None:
    model = load_model(args.checkpoint)
    program, sidecar = export_model(model, args.out)
    load_exported(program)  # read back as a server reads it: the checked reader, the archive checks, the probe
    written = [program, sidecar, *(path for path in companion_paths(program).values() if path.exists())]
    names = ", ".join(str(path) for path in written[:-1]) + f" and {written[-1]}"
    print(f"wrote {names}: put them in the models directory to serve {program.stem}")
