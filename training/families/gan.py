"""GANs (family "gan"): one generator pass G(z); with the critic saved beside it, z is first refined by DDLS
(Langevin steps on the latent, training/sampling/ddls.py), stepped by the server as chains of their own.

A checkpoint keeps its critic among its tensors; an exported generator NAME.pt2 brings it as the companion
program NAME.critic.pt2 (x [B, *shape] -> d(x) [B], a logit, or a probability its sidecar declares)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.families.base import DrawRequest, ExportPlan, Family, ProgramParts, Signature, WeightGroup
from training.runtime.checkpoint import Checkpoint, CheckpointError, ModelConfig, first_line
from training.runtime.draw import default_latent_steps, sample_generator
from training.runtime.exported_modules import ExportedCritic, ExportedGenerator, expect_output
from training.runtime.loaded import LoadedModel
from training.sampling.noise import latent_gaussian
from training.sampling.replay_buffer import ReplayBuffer
from training.sampling.sampler_config import GANSampler, SamplerConfig, to_dict

DDLS_FIELDS = ("steps", "step_size", "noise", "trajectory_every")  # what its latent chains read (with a critic)
DDLS_SETTINGS = ("steps", "step_size", "noise", "critic_output")  # sampler keys that apply only with a critic
CRITIC_ROLE = "critic"  # its companion program NAME.critic.pt2
STEPS_SUFFIX = re.compile(r"_steps_\d+")


def gan_record_key(key: str, steps: int, default_steps: int) -> str:
    """Where `evaluate --record` files a GAN's figures drawn with `steps` DDLS steps: `key` with `_steps_S` right
    after "evaluate" when S is not the checkpoint's default (any steps suffix it had is replaced)."""
    rest = STEPS_SUFFIX.sub("", key, count=1).removeprefix("evaluate")
    return "evaluate" + ("" if steps == default_steps else f"_steps_{steps}") + rest


class _NativeGenerator(nn.Module):
    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)


class _NativeCritic(nn.Module):
    def __init__(self, critic: nn.Module) -> None:
        super().__init__()
        self.critic = critic

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, *shape] -> logit [B]
        return self.critic(x).reshape(-1)


def without_critic(model: LoadedModel, name: str) -> str:
    """How a refusal says that `model` (served as `name`) has no critic, as it is: a checkpoint saved without
    one, or a program with none beside it."""
    if model.exported:
        return f"{name} is an exported generator served without a critic program ({name}.critic.pt2 beside it)"
    return f"{name} was saved without its critic"


class Gan(Family):
    name = stated = "gan"
    sampler_type = GANSampler
    pool = "one_pass"
    readers = "GANs with a critic"
    fields = DDLS_FIELDS
    one_pass_name = "generator"
    companion_roles = (CRITIC_ROLE,)

    def describe(self, model: LoadedModel) -> str:
        if model.critic is not None:
            return "GAN whose critic refines its latent by DDLS"
        if model.exported:
            return "exported GAN served without a critic program, sampled by one generator pass"
        return "GAN saved without its critic, sampled by one generator pass"

    def score_kind(self, model: LoadedModel) -> str:
        if model.critic is None:
            raise ValueError(f"{without_critic(model, model.name)}: it has no score for an image")
        return "critic"

    def shown_sampler(self, model: LoadedModel) -> dict[str, Any]:
        # An exported generator has no EMA or raw weights to choose between; without a critic no DDLS setting
        # applies; a checkpoint's critic is its own module, whose output is always the logit.
        dropped = {
            *(("weights",) if model.exported else ()),
            *(DDLS_SETTINGS if model.critic is None else ()),
            *(("critic_output",) if not model.exported else ()),
        }
        return {key: value for key, value in to_dict(model.sampler).items() if key not in dropped}

    def served_weights(self, checkpoint: Checkpoint, sampler: SamplerConfig) -> dict[str, torch.Tensor]:
        assert isinstance(sampler, GANSampler)
        return checkpoint.extras["ema"] if sampler.weights == "ema" else checkpoint.weights

    def weight_groups(self, checkpoint: Checkpoint) -> list[WeightGroup]:
        groups = super().weight_groups(checkpoint)
        if "ema" in checkpoint.extras:
            groups.append(("ema", checkpoint.config.arch, checkpoint.extras["ema"]))  # what it serves by default
        if (critic := self.critic(checkpoint)) is not None:
            groups.append(("critic", *critic))  # DDLS's energy
        return groups

    def critic(self, checkpoint: Checkpoint) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        if "critic" in checkpoint.extras and "critic" in checkpoint.config.arch:
            return checkpoint.config.arch["critic"], checkpoint.extras["critic"]
        return None

    def check_loaded(self, model: LoadedModel) -> None:
        """A GAN is served only if one latent of its declared size makes one image of its declared shape."""
        latent_dim = model.sampler_as(GANSampler).latent_dim
        device = next(model.module.parameters()).device
        try:
            with torch.no_grad():
                shape = tuple(model.module(torch.zeros(1, latent_dim, device=device)).shape[1:])
        except RuntimeError as error:
            raise CheckpointError(f"sampler.latent_dim {latent_dim} does not fit the generator ({error})") from error
        if shape != model.shape:
            raise CheckpointError(
                f"the generator makes images of shape {list(shape)}, the config says {list(model.shape)}"
            )
        if not model.exported and model.sampler_as(GANSampler).critic_output != "logit":
            raise CheckpointError(
                "sampler.critic_output describes an exported critic program; a checkpoint's critic returns its "
                "logit (leave critic_output out)"
            )

    def probe_steps(self, model: LoadedModel) -> int:
        return 0 if model.critic is None else 1  # served without a critic: its plain pass, no DDLS step

    def signature(self, config: ModelConfig) -> Signature:
        return [("z", [config.sampler.get("latent_dim", 0)])]

    def check_sidecar(self, data: dict[str, Any], sampler: dict[str, Any], source: str) -> None:
        super().check_sidecar(data, sampler, source)
        if "latent_dim" not in sampler:
            raise CheckpointError(f"{source}: a generator's sampler must give latent_dim (the size of z)")

    def companion_signature(self, config: ModelConfig, role: str) -> Signature:
        return [("x", list(config.data["shape"]))]  # the critic: x [B, *shape] -> d(x) [B]

    def program_module(
        self, program: nn.Module, config: ModelConfig, sampler: SamplerConfig, companions: dict[str, nn.Module]
    ) -> ProgramParts:
        assert isinstance(sampler, GANSampler)
        critic = companions.get(CRITIC_ROLE)
        probability = sampler.critic_output == "probability"
        return ProgramParts(
            ExportedGenerator(program), critic=None if critic is None else ExportedCritic(critic, probability)
        )

    def probe_program(self, model: LoadedModel, batch: int, first: bool) -> None:
        latent_dim = model.sampler_as(GANSampler).latent_dim
        device = next(model.module.parameters()).device
        with torch.no_grad():
            images = model.module(torch.randn(batch, latent_dim, device=device))
        expect_output(images, [batch, *model.shape], "image", model.name)
        if model.critic is not None:
            self._probe_critic(model, images, first)

    def _probe_critic(self, model: LoadedModel, images: torch.Tensor, first: bool) -> None:
        """The critic on the generator's images as DDLS runs it: d(x) [B], finite, and (first batch) a gradient
        in x; a declared probability within [0, 1]."""
        critic, batch, source = model.critic, images.shape[0], f"{model.name}.{CRITIC_ROLE}.pt2"
        assert isinstance(critic, ExportedCritic)
        x = images.detach().requires_grad_(True)
        with torch.no_grad():
            output = critic.output(x)
        expect_output(output, [batch], "critic's output", source)
        if critic.probability and bool(((output < 0) | (output > 1)).any()):
            raise CheckpointError(
                f'{source}: the sidecar says critic_output "probability", but the critic returns values outside '
                f"[0, 1] (from {float(output.min()):.3g} to {float(output.max()):.3g}); leave critic_output out "
                '(or "logit") for a critic that returns its logit'
            )
        if not first:
            return
        try:
            (gradient,) = torch.autograd.grad(critic(x).sum(), x)
        except RuntimeError as error:
            raise CheckpointError(
                f"{source}: the critic has no gradient with respect to x ({first_line(error)}); DDLS needs one "
                "(export without torch.no_grad or detach)"
            ) from error
        expect_output(gradient, [batch, *model.shape], "gradient of the critic", source)

    def export_plan(self, model: LoadedModel, batch: Any) -> ExportPlan:
        # The wrapper holds the weights the checkpoint samples with (EMA by default); its critic, when it kept
        # one, goes beside it as NAME.critic.pt2.
        latent = torch.zeros(2, model.sampler_as(GANSampler).latent_dim)
        companions = {}
        if model.critic is not None:
            model.critic.cpu().eval()
            images = torch.zeros(2, *model.shape)
            companions[CRITIC_ROLE] = ExportPlan(_NativeCritic(model.critic), (images,), {"x": {0: batch}})
        return ExportPlan(
            _NativeGenerator(model.module), (latent,), {"z": {0: batch}}, sampler_dropped=("weights",),
            companions=companions,
        )  # fmt: skip

    def draw(self, members: list[LoadedModel], request: DrawRequest) -> torch.Tensor:
        first, callback = members[0], request.callback
        if request.labels is not None:
            raise ValueError(f"{first.name} is a {first.config.family} model; it takes no label")
        decoded = None
        if callback is not None:  # DDLS steps report the images their latents decode to

            def decoded(step: int, z: torch.Tensor, energy: torch.Tensor) -> None:
                with torch.no_grad(), torch.autocast(z.device.type, enabled=False):  # frames: float32 passes
                    callback(step, first.module(z).clamp(*first.data_range), energy)

        samples = sample_generator(first, request.seeds, steps=request.steps, callback=decoded, dtype=request.dtype)
        return samples.clamp(*first.data_range)

    def chain_steps(self, model: LoadedModel, steps: int | None) -> int:
        return default_latent_steps(model) if steps is None else steps

    def start_description(
        self, members: list[LoadedModel], init: str | None, buffer: ReplayBuffer | None, files: list[Path] | None
    ) -> str:
        return f"Gaussian latents at temperature {members[0].sampler_as(GANSampler).temperature:g}"

    def override_sampler(self, members: list[LoadedModel], args: argparse.Namespace) -> None:
        if args.guidance is not None:
            raise ValueError("--guidance applies to class-conditional EBMs; a GAN takes --steps, --step-size, --noise")
        if args.tolerance is not None:
            raise ValueError("--tolerance applies to EBMs; a GAN takes --steps, --step-size, --noise")
        self._replace_sampler(members, args)

    def chain_fields(self, model: LoadedModel) -> tuple[str, ...]:
        return DDLS_FIELDS if model.critic is not None else ()

    def refused_apart(self, model: LoadedModel) -> tuple[str, ...]:
        return DDLS_FIELDS if model.critic is None else ()

    def refusals(self, body: Any, model: LoadedModel, name: str, has_buffer: bool) -> list[str]:
        if model.critic is not None:
            return []
        asked = [
            field for field in DDLS_FIELDS if getattr(body, field) is not None and (field != "steps" or body.steps)
        ]
        if not asked and not self.requested_steps(model, body.steps):
            return []
        return [
            f"{', '.join(repr(field) for field in asked) or 'steps'}: {without_critic(model, name)}, "
            "so its latents cannot be refined (DDLS runs Langevin steps on ||z||^2/2 - d(G(z)), d the critic); "
            "leave these out or ask for steps 0"
        ]

    def requested_steps(self, model: LoadedModel, steps: int | None) -> int:
        return default_latent_steps(model) if steps is None else steps

    def pools(self, model: LoadedModel) -> tuple[str, ...]:
        return (self.pool, "ddls") if model.critic is not None else (self.pool,)

    def pool_for(self, model: LoadedModel, steps: int) -> str:
        return "ddls" if steps > 0 else self.pool

    def order_settings(
        self, model: LoadedModel, body: Any, steps: int, every: int | None, frames: tuple[bool, int]
    ) -> dict[str, Any]:
        if steps == 0:
            return super().order_settings(model, body, steps, every, frames)
        ddls = model.sampler_as(GANSampler)  # DDLS: Langevin steps on the latent, frames decoded
        step_size = ddls.step_size if body.step_size is None else body.step_size
        noise = ddls.noise if body.noise is None else body.noise
        return {"step_size": step_size, "noise": noise, "trajectory_every": every}

    def one_pass(
        self,
        model: LoadedModel,
        module: nn.Module,
        seeds: torch.Tensor,
        scale: torch.Tensor,
        device: torch.device,
        keep_states: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        latent_dim = model.sampler_as(GANSampler).latent_dim
        return module(latent_gaussian(seeds, latent_dim).mul(scale).to(device)), [], None

    def sampler_report(self, model: LoadedModel, args: argparse.Namespace, chain_steps: torch.Tensor | None) -> dict:
        sampler = model.sampler_as(GANSampler)
        ddls_steps = default_latent_steps(model) if args.steps is None else args.steps
        report: dict[str, Any] = {"n": args.n, "steps": ddls_steps}
        if ddls_steps:
            report.update(step_size=sampler.step_size, noise=sampler.noise)
        return report

    def record_key(self, key: str, model: LoadedModel, args: argparse.Namespace, report: dict) -> str:
        return gan_record_key(key, report["steps"], default_latent_steps(model))  # other DDLS steps are named

    def pinned(self, key: str, record: dict[str, Any]) -> set[str]:
        # Its figures say the steps; the key follows the defaults (`rekeyed`). A plain pass uses neither setting.
        return {"steps", *(("step_size", "noise") if record.get("steps") == 0 else ())}

    def check_new_sampler(self, new: SamplerConfig, checkpoint: Checkpoint, source: str) -> None:
        assert isinstance(new, GANSampler)
        if new.critic_output != "logit":
            raise ValueError(
                f"{source}: critic_output describes an exported critic program; a checkpoint's critic returns its "
                'logit, so it stays "logit"'
            )
        if new.steps and "critic" not in checkpoint.extras:
            raise ValueError(
                f"{source} was saved without its critic, so it cannot refine latents by DDLS: its default steps stay 0"
            )

    def rekeyed(self, key: str, record: dict[str, Any], new: SamplerConfig, changed: set[str]) -> str:
        assert isinstance(new, GANSampler)
        if "steps" in changed and "steps" in record:
            return gan_record_key(key, int(record["steps"]), new.steps)
        return key

    def evaluation_words(self, key: str, figures: dict[str, Any]) -> list[str]:
        named = STEPS_SUFFIX.search(key)
        return ["--steps", named.group(0).removeprefix("_steps_")] if named else []  # DDLS at other steps


GAN = Gan()
