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
from training.sampling.dequantization import dequantizer_noise, level_values, variational_log_prob
from training.sampling.replay_buffer import ReplayBuffer
from training.sampling.sampler_config import FlowSampler, SamplerConfig

# The probe of a flow's forward program against its inverse program (`check_directions`): base points at the
# sampler's temperature -> x -> z' (float32 through the shipped Glow's and NICE's 28x28 passes: z' within 2e-4
# relative, log p within 3e-3 nats). log p must agree within LOG_P_TOLERANCE_PER_DIM x D nats (0.78 nats on MNIST,
# 0.0014 bits/dim): a forward program whose log det is off by more describes another density than its inverse.
ROUND_TRIP_TOLERANCE = 1e-2  # |z' - z| <= this x (1 + |z|)
LOG_P_TOLERANCE_PER_DIM = 1e-3
PROBE_SEED = 0


class _NativeFlow(nn.Module):
    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, *shape] -> [B, *shape], [B]
        x, log_prob, _ = self.flow.decode(z.flatten(1))
        return x, log_prob


class _NativeForward(nn.Module):
    """The data-to-noise pass as a flow's forward program: x [B, *shape] -> (z [B, *shape], log|det dz/dx| [B]),
    log p(x) = log p_base(z) + log det."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det = self.flow(x)  # [B, D], [B]
        return z.reshape(x.shape), log_det


def check_flow_data(data: dict[str, Any], source: str, variational: bool = True) -> None:
    """CheckpointError unless a flow sidecar's levels are what the server draws and scores: 8-bit images; and
    (`variational` False: a velocity field's) unless its dequantization is one it scores."""
    if data.get("levels") not in (None, 256):
        raise CheckpointError(
            f"{source}: data.levels is {data['levels']}; this server draws and scores 8-bit images, so a flow's data "
            "have 256 levels (state 256, or leave it out)"
        )
    if not variational and data.get("dequantization") == "variational":
        raise CheckpointError(
            f'{source}: data.dequantization "variational" is served for invertible flows with a dequantizer '
            'program; a velocity field\'s likelihood is scored with "uniform" or "none"'
        )


def check_dequantizer(model: LoadedModel, batch: int) -> None:
    """CheckpointError unless a variationally dequantized flow's dequantizer, on seeded levels and noise, returns u
    of the data's shape within [0, 1] and a finite log q(u | x) [B], and the bound it gives is finite."""
    module = model.module
    assert isinstance(module, ExportedFlow) and module.dequantizer is not None
    source = f"{model.name}.dequantizer.pt2"
    generator = torch.Generator().manual_seed(PROBE_SEED)
    levels = torch.randint(0, model.levels, (batch, *model.shape), generator=generator)  # [B, *shape]
    seeds = torch.randint(0, 2**32, (batch,), generator=generator)
    device = next(module.parameters()).device
    eps = dequantizer_noise(seeds, 0, model.shape).to(device)
    with torch.no_grad():
        u, log_q = module.dequantize(level_values(levels, model.data_range, model.levels).to(device), eps)
    expect_output(u, [batch, *model.shape], "u of its dequantizer", source)
    expect_output(log_q, [batch], "log q(u | x) of its dequantizer", source)
    if u.min().item() < 0 or u.max().item() > 1:
        raise CheckpointError(
            f"{source}: its u spans [{u.min().item():.4g}, {u.max().item():.4g}]; u is the offset within each level's "
            "bin, in [0, 1] (e.g. a sigmoid of its output)"
        )
    with torch.no_grad():
        bound = variational_log_prob(
            module.log_prob, module.dequantize, levels, seeds, model.data_range, model.levels, 1, device
        )
    if not bool(torch.isfinite(bound).all()):
        raise CheckpointError(
            f"{source}: the variational bound log p(x + u) - log q(u | x) of probe images is not finite: "
            f"{model.name}.forward.pt2 is not finite at the points its u makes"
        )


def check_companions(config: ModelConfig, companions: dict[str, nn.Module]) -> None:
    """CheckpointError unless a dequantizer program comes exactly with data.dequantization "variational", and then
    with the forward program the bound scores its points by."""
    name = Path(config.training.get("exported", "NAME.pt2")).stem
    stated = config.data.get("dequantization")
    if stated == "variational":
        missing = [f"{name}.{role}.pt2" for role in ("dequantizer", "forward") if role not in companions]
        if missing:
            raise CheckpointError(
                f'{name}.json: data.dequantization "variational" scores images by the bound E_q[log p(x + u) - '
                f"log q(u | x)], which needs {' and '.join(missing)} beside {name}.pt2"
            )
    elif "dequantizer" in companions:
        raise CheckpointError(
            f'{name}.dequantizer.pt2: a dequantizer serves data.dequantization "variational"; {name}.json states '
            f'{stated or "none (uniform)"}: state "variational", or remove the dequantizer'
        )


def check_directions(model: LoadedModel, batch: int) -> None:
    """CheckpointError unless an exported flow's forward program inverts its inverse program on base points at
    the sampler's temperature (z -> x -> z' close) and gives the log p(x) the inverse pass gave (the forward
    program's log det is what scores and bits/dim of real data are made of)."""
    module = model.module
    assert isinstance(module, ExportedFlow) and module.forward_program is not None
    source = f"{model.name}.forward.pt2"
    temperature = model.sampler_as(FlowSampler).temperature
    generator = torch.Generator().manual_seed(PROBE_SEED)
    device = next(module.parameters()).device
    z = module.base.sample((batch, math.prod(model.shape)), temperature, generator).to(device)  # [B, D]
    with torch.no_grad():
        x, log_prob = module.program(z.reshape(batch, *model.shape))
        back, log_det = module.forward_program(x)
    expect_output(back, [batch, *model.shape], "z of its forward program", source)
    expect_output(log_det, [batch], "log det of its forward program", source)
    moved = ((back.flatten(1) - z).abs() / (1 + z.abs())).max().item()
    if moved > ROUND_TRIP_TOLERANCE:
        raise CheckpointError(
            f"{source}: the forward program does not invert {model.name}.pt2: base points z -> x -> z' move by "
            f"{moved:.3g} (relative; at most {ROUND_TRIP_TOLERANCE:g})"
        )
    forward_log_prob = module.base.log_prob(back.flatten(1)) + log_det
    gap = (forward_log_prob - log_prob).abs().max().item()
    allowed = LOG_P_TOLERANCE_PER_DIM * math.prod(model.shape)
    if not gap <= allowed:
        raise CheckpointError(
            f"{source}: its log p(x) = log p_base(z) + log det disagrees with {model.name}.pt2's log p(x) on the "
            f"same points by up to {gap:.4g} nats (at most {allowed:.3g}: {LOG_P_TOLERANCE_PER_DIM:g} a dimension); "
            "its log det is not the inverse pass's"
        )


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
    companion_roles: tuple[str, ...] = ("forward", "dequantizer")

    def describe(self, model: LoadedModel) -> str:
        return "flow sampled by one pass of its inverse"

    @staticmethod
    def _one_way(model: LoadedModel) -> bool:
        """An exported flow served without its data-to-noise program."""
        return isinstance(model.module, ExportedFlow) and model.module.forward_program is None

    def score_kind(self, model: LoadedModel) -> str:
        if self._one_way(model):
            raise ValueError(
                f"{model.name} is an exported flow without its data-to-noise program: scores of given images need "
                f"{model.name}.forward.pt2 (x -> (z, log det)) beside {model.name}.pt2"
            )
        return "flow"

    def test_likelihood(self, model: LoadedModel) -> str:
        return "" if self._one_way(model) else self.likelihood

    def states(self, sampler: dict[str, Any]) -> bool:
        return sampler.get("solver") is None  # a flow sampler naming an ODE solver is a CNF's (families/cnf.py)

    def signature(self, config: ModelConfig) -> Signature:
        return [("z", list(config.data["shape"]))]

    def companion_signature(self, config: ModelConfig, role: str) -> Signature:
        shape = list(config.data["shape"])
        if role == "dequantizer":
            return [("x", shape), ("eps", shape)]  # (x, eps) -> (u, log q(u | x))
        return [("x", shape)]  # role "forward": x -> (z, log det)

    def check_loaded(self, model: LoadedModel) -> None:
        if model.variational and not model.exported:
            raise CheckpointError(
                'data.dequantization "variational" is served for exported flows with their dequantizer program '
                "(NAME.dequantizer.pt2); a checkpoint has none"
            )

    def check_sidecar(self, data: dict[str, Any], sampler: dict[str, Any], source: str) -> None:
        super().check_sidecar(data, sampler, source)
        check_flow_data(data, source)
        if sampler.get("base") not in (None, *BASES):
            raise CheckpointError(f"{source}: sampler.base must be one of {', '.join(BASES)}, not {sampler['base']!r}")

    def program_module(
        self, program: nn.Module, config: ModelConfig, sampler: SamplerConfig, companions: dict[str, nn.Module]
    ) -> ProgramParts:
        assert isinstance(sampler, FlowSampler)
        check_companions(config, companions)
        quantized = None
        if config.data.get("dequantization") in ("uniform", "variational"):  # discrete: samples go back to the levels
            low, high = config.data.get("range", [-1.0, 1.0])
            quantized = ((float(low), float(high)), int(config.data.get("levels") or 256))
        shape = tuple(config.data["shape"])
        forward, dequantizer = companions.get("forward"), companions.get("dequantizer")
        return ProgramParts(ExportedFlow(program, shape, sampler.base or "gaussian", forward, quantized, dequantizer))

    def probe_program(self, model: LoadedModel, batch: int, first: bool) -> None:
        module, shape = model.module, model.shape
        assert isinstance(module, ExportedFlow)
        with torch.no_grad():
            x, log_prob = module.program(torch.randn(batch, *shape, device=next(module.parameters()).device))
        expect_output(x, [batch, *shape], "sample", model.name)
        expect_output(log_prob, [batch], "log p(x)", model.name)
        if module.forward_program is not None:
            check_directions(model, batch)
        if module.dequantizer is not None:
            check_dequantizer(model, batch)

    def export_plan(self, model: LoadedModel, batch: Any) -> ExportPlan:
        module = model.module
        assert isinstance(module, Flow)
        example = (torch.zeros(2, *model.shape),)
        # The sidecar names the distribution the server draws z from, and the levels its bits/dim count (this
        # project's flows: 8-bit images, uniformly dequantized; samples left continuous, as the checkpoint's).
        return ExportPlan(
            _NativeFlow(module),
            example,
            {"z": {0: batch}},
            sampler_set={"base": module.base_name},
            data_set={"levels": 256},
            companions={"forward": ExportPlan(_NativeForward(module), example, {"x": {0: batch}})},
        )

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
        return images, states, bits_per_dim(log_prob, math.prod(model.shape), model.data_range, model.levels)


FLOW = ExactFlow()
