"""`python -m training export`: a native checkpoint written as a torch.export program and its sidecar, the form
in which a server serves models trained elsewhere (training/runtime/exported.py reads it back)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.models.cnf import is_velocity_field
from training.models.flows import Flow
from training.runtime.checkpoint import atomic_write_bytes, first_line
from training.runtime.exported import DATA_KEYS, PROGRAM_SUFFIX, SIDECAR_SUFFIX, load_exported
from training.runtime.load import load_model
from training.runtime.loaded import LoadedModel
from training.sampling.sampler_config import GANSampler, to_dict


class _NativeEnergy(nn.Module):
    def __init__(self, energy: nn.Module) -> None:
        super().__init__()
        self.energy = energy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy(x)


class _NativeConditionalEnergy(_NativeEnergy):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.energy(x, y)


class _NativeGenerator(nn.Module):
    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)


class _NativeFlow(nn.Module):
    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, *shape] -> [B, *shape], [B]
        x, log_prob, _ = self.flow.decode(z.flatten(1))
        return x, log_prob


def export_model(model: LoadedModel, out: str | Path) -> tuple[Path, Path]:
    """Write a native model as OUT (.pt2, from torch.export with a dynamic batch dimension) and its sidecar
    beside it; the two are served like the checkpoint, and give the same seeded samples."""
    out = Path(out)
    if out.suffix != PROGRAM_SUFFIX:
        raise ValueError(f"--out must end in {PROGRAM_SUFFIX} (the sidecar goes beside it), not {out.name!r}")
    family, shape = model.config.family, model.shape
    module = model.module.cpu().eval()
    batch = torch.export.Dim("batch", min=1)
    sampler = dict(to_dict(model.sampler))
    data = {key: value for key, value in model.config.data.items() if key in DATA_KEYS}
    if family == "ebm":
        conditional = model.classes is not None
        wrapper: nn.Module = _NativeConditionalEnergy(module) if conditional else _NativeEnergy(module)
        example: tuple[torch.Tensor, ...] = (torch.zeros(2, *shape),)
        dynamic: dict[str, Any] = {"x": {0: batch}}
        if conditional:
            example += (torch.tensor([0, -1]),)
            dynamic["y"] = {0: batch}
        else:
            data.pop("classes", None)  # an unconditional energy samples no classes
    elif family == "gan":
        wrapper = _NativeGenerator(module)  # holds the weights the checkpoint samples with (EMA by default)
        example = (torch.zeros(2, model.sampler_as(GANSampler).latent_dim),)
        dynamic = {"z": {0: batch}}
    elif family == "flow":
        assert isinstance(module, Flow)
        wrapper = _NativeFlow(module)
        example = (torch.zeros(2, *shape),)
        dynamic = {"z": {0: batch}}
        sampler["base"] = module.base_name  # the distribution the server draws z from
    else:
        raise ValueError(f"{model.name} is a {family} model; only ebm, gan and flow models are exported")
    try:
        program = torch.export.export(wrapper, example, dynamic_shapes=dynamic)
    except Exception as error:
        arch = model.config.arch.get("name")
        raise ValueError(f"torch.export cannot trace {model.name} ({arch}): {first_line(error)}") from error
    sidecar: dict[str, Any] = {"family": family, "data": data, "sampler": sampler}
    if model.config.ensemble:
        sidecar["ensemble"] = model.config.ensemble
    if model.config.metrics:
        sidecar["metrics"] = model.config.metrics
    archive = io.BytesIO()
    torch.export.save(program, archive)
    sidecar_path = out.with_suffix(SIDECAR_SUFFIX)  # written first: a server takes a program beside its sidecar
    atomic_write_bytes(sidecar_path, (json.dumps(sidecar, indent=2) + "\n").encode())
    atomic_write_bytes(out, archive.getvalue())
    return out, sidecar_path


def run_export(args: argparse.Namespace) -> None:
    model = load_model(args.checkpoint)
    if is_velocity_field(model.module):
        raise ValueError(
            f"export: {model.name} is a continuous normalizing flow, sampled by integrating its ODE; exporting "
            "its velocity field is not supported yet (serve or sample the .safetensors checkpoint itself)"
        )
    program, sidecar = export_model(model, args.out)
    load_exported(program)  # read back as a server reads it: the checked reader, the archive checks, the probe
    print(f"wrote {program} and {sidecar}: put both in the models directory to serve {program.stem}")
