"""Energy-based models (family "ebm"): Langevin chains on E(x), from noise, a replay buffer or an image; ensembles
share one buffer."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.families.base import DrawRequest, ExportPlan, Family, ProgramParts, Signature
from training.runtime.checkpoint import CheckpointError, ModelConfig, max_buffer_capacity
from training.runtime.device import chain_precision
from training.runtime.draw import pooled_buffer, sample_ebm
from training.runtime.exported_modules import ExportedEnergy, expect_output
from training.runtime.loaded import LoadedModel
from training.sampling.replay_buffer import ReplayBuffer
from training.sampling.sampler_config import EBMSampler, SamplerConfig

REPLAY_CAPACITY = 8192  # slots of an exported energy's replay buffer when its sidecar's sampler names none
# The request fields its chains read (all of them an EBM reads; guidance when it is class-conditional).
LANGEVIN_FIELDS = (
    "steps",
    "step_size",
    "noise",
    "momentum",
    "guidance",
    "tolerance",
    "init",
    "image",
    "mask",
    "trajectory_every",
)


class _NativeEnergy(nn.Module):
    def __init__(self, energy: nn.Module) -> None:
        super().__init__()
        self.energy = energy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy(x)


class _NativeConditionalEnergy(_NativeEnergy):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.energy(x, y)


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


class Energy(Family):
    name = stated = "ebm"
    sampler_type = EBMSampler
    pool = "langevin"
    starts_from_images = True
    readers = "EBMs"
    fields = ("label", *LANGEVIN_FIELDS)
    keeps_buffers = True

    def describe(self, model: LoadedModel) -> str:
        return "EBM"

    def score_kind(self, model: LoadedModel) -> str:
        return "energy"

    def signature(self, config: ModelConfig) -> Signature:
        return [("x", list(config.data["shape"])), *([("y", [])] if config.data.get("classes") else [])]

    def check_sidecar(self, data: dict[str, Any], sampler: dict[str, Any], source: str) -> None:
        pass  # data.classes makes an energy conditional

    def program_module(
        self, program: nn.Module, config: ModelConfig, sampler: SamplerConfig, companions: dict[str, nn.Module]
    ) -> ProgramParts:
        assert isinstance(sampler, EBMSampler)
        module = ExportedEnergy(program, len(config.data.get("classes") or []))
        if sampler.init != "buffer":
            return ProgramParts(module)
        # It samples from a replay buffer: one the server fills, empty at first.
        shape = tuple(config.data["shape"])
        capacity = min(sampler.buffer_capacity or REPLAY_CAPACITY, max_buffer_capacity(shape))
        low, high = config.data.get("range", [-1.0, 1.0])
        buffer = ReplayBuffer.empty_state(shape, capacity, sampler.restart_prob, (low, high))
        return ProgramParts(module, {"replay_buffer": buffer})

    def probe_program(self, model: LoadedModel, batch: int, first: bool) -> None:
        module, shape, source = model.module, model.shape, model.name
        assert isinstance(module, ExportedEnergy)
        device = next(module.parameters()).device
        low, high = model.data_range
        x = (torch.rand(batch, *shape, device=device) * (high - low) + low).requires_grad_(True)
        labels = torch.arange(batch, device=device) % (module.num_classes + 1) - 1
        energy = module(x, labels if module.num_classes else None)
        expect_output(energy, [batch], "energy", source)
        if not first:
            return
        try:
            (gradient,) = torch.autograd.grad(energy.sum(), x)
        except RuntimeError as error:
            raise CheckpointError(
                f"{source}: the energy has no gradient with respect to x ({error}); Langevin "
                "sampling needs one (export without torch.no_grad or detach)"
            ) from error
        expect_output(gradient, [batch, *shape], "gradient of the energy", source)

    def export_plan(self, model: LoadedModel, batch: Any) -> ExportPlan:
        if model.classes is None:  # an unconditional energy samples no classes
            return ExportPlan(
                _NativeEnergy(model.module), (torch.zeros(2, *model.shape),), {"x": {0: batch}}, ("classes",)
            )
        example = (torch.zeros(2, *model.shape), torch.tensor([0, -1]))
        return ExportPlan(_NativeConditionalEnergy(model.module), example, {"x": {0: batch}, "y": {0: batch}})

    def draw(self, members: list[LoadedModel], request: DrawRequest) -> torch.Tensor:
        r = request
        with chain_precision(next(members[0].module.parameters()).device, r.dtype):
            return sample_ebm(
                members, r.seeds, r.steps, r.init, r.generator, r.callback, r.labels, r.buffer, r.chain_steps
            )

    def chain_steps(self, model: LoadedModel, steps: int | None) -> int:
        return model.sampler_as(EBMSampler).steps if steps is None else steps

    def chain_tolerance(self, model: LoadedModel) -> float:
        return model.sampler_as(EBMSampler).tolerance

    def start_description(
        self, members: list[LoadedModel], init: str | None, buffer: ReplayBuffer | None, files: list[Path] | None
    ) -> str:
        sampler = members[0].sampler_as(EBMSampler)
        if (init or sampler.init) == "noise":
            prior = "uniform noise" if sampler.prior == "uniform" else f"Gaussian noise (std {sampler.prior_std:g})"
            return f"{prior}, the checkpoint's prior (--init noise)"
        if files:
            assert buffer is not None
            return f"the server's replay buffer {', '.join(str(path) for path in files)} ({len(buffer)} samples)"
        return (
            f"the replay buffer saved in the checkpoint ({len(pooled_buffer(members))} samples); a server that has "
            "been sampling starts from its own, newer one: --state-dir DIR uses what it saved"
        )

    def override_sampler(self, members: list[LoadedModel], args: argparse.Namespace) -> None:
        self._replace_sampler(members, args)

    def refusals(self, body: Any, model: LoadedModel, name: str, has_buffer: bool) -> list[str]:
        problems = []
        if body.init == "buffer" and not has_buffer:
            why = (
                f'{name} is an exported energy whose sidecar asks for none (sampler "init": "buffer" keeps one)'
                if model.exported
                else f"{name} was trained without one"
            )
            problems.append(f"init 'buffer' needs a replay buffer; {why} (use 'noise')")
        if body.steps == 0:
            problems.append(f"'steps' is 0; {name} is an EBM, whose chains take at least 1 Langevin step")
        return problems

    def requested_steps(self, model: LoadedModel, steps: int | None) -> int:
        return steps or model.sampler_as(EBMSampler).steps

    def order_settings(
        self, model: LoadedModel, body: Any, steps: int, every: int | None, frames: tuple[bool, int]
    ) -> dict[str, Any]:
        sampler = model.sampler_as(EBMSampler)
        return {
            "step_size": _given(body.step_size, sampler.step_size),
            "noise": _given(body.noise, sampler.noise),
            "momentum": _given(body.momentum, sampler.momentum),
            "label": body.label,
            "guidance": _given(body.guidance, sampler.guidance),
            "tolerance": _given(body.tolerance, sampler.tolerance),
            "init": body.init or sampler.init,
            "trajectory_every": every,
        }

    def evaluates_labels(self, init: str | None) -> tuple[bool, bool]:
        return True, init != "buffer"  # chains from a replay buffer keep their slot's class unless one is asked

    def evaluate_key(self, init: str) -> str:
        return f"evaluate_{init}"

    def sampler_report(self, model: LoadedModel, args: argparse.Namespace, chain_steps: torch.Tensor | None) -> dict:
        sampler = model.sampler_as(EBMSampler)
        report: dict[str, Any] = {"init": args.init, "steps": args.steps or sampler.steps, "n": args.n}
        report.update(step_size=sampler.step_size, noise=sampler.noise)
        if chain_steps is not None:  # steps is then the most a chain ran; the gradient steps each ran:
            ran = chain_steps.double()
            report.update(
                tolerance=sampler.tolerance,
                mean_steps=round(float(ran.mean()), 1),
                p95_steps=int(ran.quantile(0.95)),
                max_chain_steps=int(ran.max()),
            )
        if model.classes is not None:
            report["guidance"] = sampler.guidance
        if args.label is not None:
            report["label"] = args.label
        return report

    def pinned(self, key: str, record: dict[str, Any]) -> set[str]:
        return {"init"}  # evaluate_noise, evaluate_buffer

    def evaluation_words(self, key: str, figures: dict[str, Any]) -> list[str]:
        init = key.removeprefix("evaluate_ensemble_").removeprefix("evaluate_").partition("_label_")[0]
        return ["--init", init, *(["--steps", str(figures["steps"])] if figures.get("steps") else [])]


ENERGY = Energy()
