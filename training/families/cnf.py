"""Continuous normalizing flows: a "flow" file whose module is a velocity field v(x, t) (training/models/cnf.py),
sampled by integrating its ODE from a Gaussian prior, stepped by the server as chains; log p(x) by an adaptive
solve (training/sampling/likelihood.py). Its files, sidecars and sampler are a flow's."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.families.base import DrawRequest, ExportPlan, ProgramParts, Signature
from training.families.flow import ExactFlow, check_flow_data, refuse_langevin_settings
from training.models.cnf import MLPVelocity, UNetVelocity
from training.runtime.checkpoint import CheckpointError, ModelConfig
from training.runtime.draw import sample_cnf
from training.runtime.exported_modules import ExportedVelocity, expect_output
from training.runtime.loaded import LoadedModel
from training.sampling.likelihood import field_and_divergence, rademacher_probes
from training.sampling.noise import chain_seeds
from training.sampling.replay_buffer import ReplayBuffer
from training.sampling.sampler_config import FlowSampler, SamplerConfig


class _FieldProgram(nn.Module):
    """A class-conditional field as its program: v(x [B, *shape], t [B], y [B]) -> [B, *shape]; y = -1: null label."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.field(x, t, y)


class _UnconditionalField(_FieldProgram):
    """An unconditional field as its program: v(x [B, *shape], t [B]) -> [B, *shape]."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.field(x, t)


ODE_FIELDS = ("steps", "guidance", "init", "image", "mask", "trajectory_every")  # what its ODE chains read


class Cnf(ExactFlow):
    name = "cnf"
    pool = "ode"
    starts_from_images = True
    readers = "CNFs"
    fields = ("label", *ODE_FIELDS)
    likelihood = "ode"

    companion_roles = ()  # its program is the whole model: the field serves both directions

    def owns(self, model: LoadedModel) -> bool:
        """The one answer to "is this a CNF?": a flow whose module is a velocity field, not an invertible flow."""
        return isinstance(model.module, (UNetVelocity, MLPVelocity, ExportedVelocity))

    def states(self, sampler: dict[str, Any]) -> bool:
        return sampler.get("solver") is not None  # a flow sidecar whose sampler names the ODE's solver and steps

    def test_likelihood(self, model: LoadedModel) -> str:
        return self.likelihood

    def score_kind(self, model: LoadedModel) -> str:
        return "cnf"

    def signature(self, config: ModelConfig) -> Signature:
        shape = list(config.data["shape"])
        return [("x", shape), ("t", []), *([("y", [])] if config.data.get("classes") else [])]

    def check_sidecar(self, data: dict[str, Any], sampler: dict[str, Any], source: str) -> None:
        check_flow_data(data, source, variational=False)
        if sampler.get("base") not in (None, "gaussian"):
            raise CheckpointError(
                f"{source}: a velocity field's prior is Gaussian (sampler.base gaussian or unset), not "
                f"{sampler['base']!r}"
            )

    def program_module(
        self, program: nn.Module, config: ModelConfig, sampler: SamplerConfig, companions: dict[str, nn.Module]
    ) -> ProgramParts:
        return ProgramParts(ExportedVelocity(program, len(config.data.get("classes") or [])))

    def probe_program(self, model: LoadedModel, batch: int, first: bool) -> None:
        """v at random points, times and labels (the null label among them) is finite and of the data's shape;
        on the first batch the divergence the likelihood integrates (one Hutchinson probe, a vector-Jacobian product
        through the program) is finite too."""
        module, shape = model.module, model.shape
        assert isinstance(module, ExportedVelocity)
        device = next(module.parameters()).device
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *shape, generator=generator).to(device)
        t = torch.rand(batch, generator=generator).to(device)
        labels = None
        if module.num_classes:
            labels = torch.randint(-1, module.num_classes, (batch,), generator=generator).to(device)
        with torch.no_grad():
            velocity = module(x, t, labels)
        expect_output(velocity, [batch, *shape], "velocity", model.name)
        if first:
            probes = rademacher_probes(chain_seeds(0, batch), 1, shape).to(device)
            _, divergence = field_and_divergence(module, x, t, labels, probes)
            expect_output(
                divergence, [batch], "divergence of the velocity (through its vector-Jacobian product)", model.name
            )

    def describe(self, model: LoadedModel) -> str:
        return "CNF sampled by its ODE"

    def export_plan(self, model: LoadedModel, batch: Any) -> ExportPlan:
        field = model.module
        conditional = getattr(field, "num_classes", 0) > 0
        example: tuple[torch.Tensor, ...] = (torch.zeros(2, *model.shape), torch.full((2,), 0.5))
        dynamic: dict[str, Any] = {"x": {0: batch}, "t": {0: batch}}
        if conditional:
            example += (torch.zeros(2, dtype=torch.long),)
            dynamic["y"] = {0: batch}
        return ExportPlan(_FieldProgram(field) if conditional else _UnconditionalField(field), example, dynamic)

    def draw(self, members: list[LoadedModel], request: DrawRequest) -> torch.Tensor:
        r = request
        return sample_cnf(members[0], r.seeds, steps=r.steps, labels=r.labels, callback=r.callback, dtype=r.dtype)

    def chain_steps(self, model: LoadedModel, steps: int | None) -> int:
        return self._steps(model) if steps is None else steps

    @staticmethod
    def _steps(model: LoadedModel) -> int:
        steps = model.sampler_as(FlowSampler).steps
        assert steps is not None  # a CNF's sampler names its solver and steps together
        return steps

    def start_description(
        self, members: list[LoadedModel], init: str | None, buffer: ReplayBuffer | None, files: list[Path] | None
    ) -> str:
        sampler = members[0].sampler_as(FlowSampler)
        return (
            f"Gaussian noise (std {sampler.temperature:g}), the CNF's prior, then {sampler.solver} ODE steps "
            f"(guidance {sampler.guidance:g} on labelled chains)"
        )

    def override_sampler(self, members: list[LoadedModel], args: argparse.Namespace) -> None:
        refuse_langevin_settings(args)
        if args.guidance is not None:
            members[0].sampler = dataclasses.replace(members[0].sampler_as(FlowSampler), guidance=args.guidance)

    def refusals(self, body: Any, model: LoadedModel, name: str, has_buffer: bool) -> list[str]:
        problems = []
        if body.init == "buffer":
            problems.append(
                f"init 'buffer' needs a replay buffer; {name} is a CNF, started from its prior (use 'noise')"
            )
        if body.init == "image" and body.mask is None:
            problems.append(
                f"init 'image' for {name}, a CNF, completes a masked image: send a 'mask' (white marks the "
                "pixels to fill in)"
            )
        if body.steps == 0:
            problems.append(f"'steps' is 0; {name} is a CNF, whose ODE takes at least 1 solver step")
        return problems

    def requested_steps(self, model: LoadedModel, steps: int | None) -> int:
        return steps or self._steps(model)

    def order_settings(
        self, model: LoadedModel, body: Any, steps: int, every: int | None, frames: tuple[bool, int]
    ) -> dict[str, Any]:
        # ODE chains from its prior (temperature: the prior's scale)
        guidance = model.sampler_as(FlowSampler).guidance if body.guidance is None else body.guidance
        return {"label": body.label, "guidance": guidance, "init": body.init or "noise", "trajectory_every": every}

    def evaluates_labels(self, init: str | None) -> tuple[bool, bool]:
        return True, True

    def sampler_report(self, model: LoadedModel, args: argparse.Namespace, chain_steps: torch.Tensor | None) -> dict:
        sampler = model.sampler_as(FlowSampler)
        return {
            "n": args.n,
            "steps": sampler.steps if args.steps is None else args.steps,
            "solver": sampler.solver,
            "temperature": sampler.temperature,
            **({"guidance": sampler.guidance} if model.classes is not None else {}),
            **({"label": args.label} if args.label is not None else {}),
        }

    def record_key(self, key: str, model: LoadedModel, args: argparse.Namespace, report: dict) -> str:
        if args.steps is not None and args.steps != self._steps(model):  # at other ODE steps
            key += f"_steps_{args.steps}"
        if args.guidance is not None:
            key += f"_guidance_{args.guidance}"
        return key


CNF = Cnf()
