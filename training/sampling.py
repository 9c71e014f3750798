"""Checkpoints -> ready modules, and drawing samples from them outside the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from training.checkpoint import Checkpoint, ModelConfig, load_checkpoint
from training.langevin import LangevinSettings, ReplayBuffer, StepCallback, frozen_energy, sample_langevin
from training.models import build_model


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    module: nn.Module
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def data_range(self) -> tuple[float, float]:
        low, high = self.config.data.get("range", [-1.0, 1.0])
        return float(low), float(high)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.config.data["shape"])


def instantiate(checkpoint: Checkpoint, name: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the module in eval mode with frozen parameters (a GAN uses its EMA weights by default)."""
    module = build_model(checkpoint.config.arch)
    weights = checkpoint.weights
    if checkpoint.config.family == "gan" and checkpoint.config.sampler.get("weights") == "ema":
        weights = checkpoint.extras["ema"]
    module.load_state_dict({key: value.float() for key, value in weights.items()})
    module.to(device).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return LoadedModel(name=name, config=checkpoint.config, module=module, extras=checkpoint.extras)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    return instantiate(load_checkpoint(path), Path(path).stem, device)


def langevin_settings(config: ModelConfig, steps: int | None = None, **overrides: float) -> LangevinSettings:
    sampler = config.sampler
    low, high = config.data.get("range", [-1.0, 1.0])
    return LangevinSettings(
        steps=steps if steps is not None else int(sampler.get("steps", 60)),
        step_size=float(overrides.get("step_size", sampler.get("step_size", 10.0))),
        noise=float(overrides.get("noise", sampler.get("noise", 0.005))),
        grad_clip=float(overrides.get("grad_clip", sampler.get("grad_clip", 0.03))),
        temperature=float(overrides.get("temperature", sampler.get("temperature", 1.0))),
        data_min=float(low), data_max=float(high),
    )


def sample_generator(model: LoadedModel, n: int, temperature: float | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """GAN samples: G(z) with z ~ N(0, T^2 I); T defaults to the checkpoint's sampler temperature."""
    device = next(model.module.parameters()).device
    scale = temperature if temperature is not None else float(model.config.sampler.get("temperature", 1.0))
    latents = torch.randn(n, int(model.config.sampler["latent_dim"]), generator=generator) * scale
    with torch.no_grad():
        return model.module(latents.to(device))


def draw_samples(model: LoadedModel, n: int, steps: int | None = None, init: str = "noise",
                 generator: torch.Generator | None = None, callback: StepCallback | None = None) -> torch.Tensor:
    """One entry point for every family, used by the `sample` and `evaluate` commands."""
    if model.config.family == "ebm":
        return sample_ebm(model, n, langevin_settings(model.config, steps), init, generator, callback)
    if model.config.family == "gan":
        return sample_generator(model, n, generator=generator)
    if model.config.family == "flow":
        temperature = float(model.config.sampler.get("temperature", 1.0))
        return model.module.sample(n, temperature, generator).clamp(*model.data_range)
    raise ValueError(f"sampling {model.config.family} checkpoints is not supported yet")


def sample_ebm(model: LoadedModel, n: int, settings: LangevinSettings, init: str = "noise",
               generator: torch.Generator | None = None, callback: StepCallback | None = None) -> torch.Tensor:
    """Run n chains for settings.steps from uniform noise or from the checkpoint's replay buffer."""
    device = next(model.module.parameters()).device
    if init == "buffer":
        if "replay_buffer" not in model.extras:
            raise ValueError(f"{model.name} has no saved replay buffer; use init='noise'")
        buffer = ReplayBuffer.from_state_dict(model.extras["replay_buffer"])
        start, _ = buffer.draw(n, generator)
    elif init == "noise":
        low, high = settings.data_min, settings.data_max
        start = torch.rand(n, *model.shape, generator=generator) * (high - low) + low
    else:
        raise ValueError(f"init must be 'noise' or 'buffer', got {init!r}")
    return sample_langevin(frozen_energy(model.module), start.to(device), settings, generator, callback)
