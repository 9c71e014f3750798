"""Normalizing flows with an exact inverse (family "flow": NICE, Glow, i-ResNet): one pass of the inverse from
the module's own base distribution; log p(x), and so bits/dim, from one pass the other way."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.families.base import DrawRequest, ExportPlan, Family, ProgramParts, Signature
from training.models.flows import BASES, Flow, bits_per_dim
from training.runtime.checkpoint import CheckpointError, ModelConfig
from training.runtime.draw import sample_flow
from training.runtime.exported_modules import ExportedFlow, expect_output
from training.runtime.loaded import LoadedModel
from training.sampling.replay_buffer import ReplayBuffer
from training.sampling.sampler_config import FlowSampler, SamplerConfig


class _NativeFlow(nn.Module):
    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, *shape] -> [B, *shape], [B]
        x, log_prob, _ = self.flow.decode(z.flatten(1))
        return x, log_prob


def refuse_langevin_settings(args: argparse.Namespace) -> None:
    """ValueError where a flow (or a CNF) is given the settings of Langevin chains."""
    if args.step_size is not None or args.noise is not None or args.tolerance is not None:
        raise ValueError(
            "--step-size, --noise and --tolerance apply to EBMs (the first two to GAN DDLS too); a flow takes "
            "--steps (a CNF's ODE)"
        )


class ExactFlow(Family):
    name = stated = "flow"
    sampler_type = FlowSampler
    pool = "one_pass"
    one_pass_name = "flow's inverse"
    exact_log_det = True
    likelihood = "exact"

    def describe(self, model: LoadedModel) -> str:
        return "flow sampled by one pass of its inverse"

    def score_kind(self, model: LoadedModel) -> str:
        return "flow"

    def signature(self, config: ModelConfig) -> Signature:
        return [("z", list(config.data["shape"]))]

    def check_sidecar(self, data: dict[str, Any], sampler: dict[str, Any], source: str) -> None:
        super().check_sidecar(data, sampler, source)
        if sampler.get("base") not in (None, *BASES):
            raise CheckpointError(f"{source}: sampler.base must be one of {', '.join(BASES)}, not {sampler['base']!r}")

    def program_module(
        self, program: nn.Module, config: ModelConfig, sampler: SamplerConfig, companions: dict[str, nn.Module]
    ) -> ProgramParts:
        assert isinstance(sampler, FlowSampler)
        return ProgramParts(ExportedFlow(program, tuple(config.data["shape"]), sampler.base or "gaussian"))

    def probe_program(self, model: LoadedModel, batch: int, first: bool) -> None:
        module, shape = model.module, model.shape
        assert isinstance(module, ExportedFlow)
        with torch.no_grad():
            x, log_prob = module.program(torch.randn(batch, *shape, device=next(module.parameters()).device))
        expect_output(x, [batch, *shape], "sample", model.name)
        expect_output(log_prob, [batch], "log p(x)", model.name)

    def export_plan(self, model: LoadedModel, batch: Any) -> ExportPlan:
        module = model.module
        assert isinstance(module, Flow)
        example = (torch.zeros(2, *model.shape),)
        # The sidecar names the distribution the server draws z from.
        return ExportPlan(_NativeFlow(module), example, {"z": {0: batch}}, sampler_set={"base": module.base_name})

    def draw(self, members: list[LoadedModel], request: DrawRequest) -> torch.Tensor:
        if request.labels is not None:
            raise ValueError(f"{members[0].name} is not class-conditional; it takes no label")
        return sample_flow(members[0], request.seeds)

    def start_description(
        self, members: list[LoadedModel], init: str | None, buffer: ReplayBuffer | None, files: list[Path] | None
    ) -> str:
        return f"the flow's base distribution at temperature {members[0].sampler_as(FlowSampler).temperature:g}"

    def override_sampler(self, members: list[LoadedModel], args: argparse.Namespace) -> None:
        refuse_langevin_settings(args)
        if args.guidance is not None:
            raise ValueError(f"--guidance applies to conditional EBMs and CNFs; {members[0].name} is neither")

    def one_pass(
        self,
        model: LoadedModel,
        module: nn.Module,
        seeds: torch.Tensor,
        scale: torch.Tensor,
        device: torch.device,
        keep_states: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        flow = module
        assert isinstance(flow, Flow)  # a CNF's field runs in its own pool of ODE chains (service/ode_pool.py)
        images, log_prob, states = flow.decode(flow.base_sample(seeds, scale).to(device), keep_states)
        return images, states, bits_per_dim(log_prob, math.prod(model.shape))


FLOW = ExactFlow()
