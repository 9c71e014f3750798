"""Checkpoints -> ready modules, and drawing samples from them outside the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from training.checkpoint import Checkpoint, ModelConfig, load_checkpoint
from training.langevin import LangevinSettings, ReplayBuffer, StepCallback, ensemble_energy, sample_langevin
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
        data_min=float(low),
        data_max=float(high),
    )


def sample_generator(
    model: LoadedModel, n: int, temperature: float | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """GAN samples: G(z) with z ~ N(0, T^2 I); T defaults to the checkpoint's sampler temperature."""
    device = next(model.module.parameters()).device
    scale = temperature if temperature is not None else float(model.config.sampler.get("temperature", 1.0))
    latents = torch.randn(n, int(model.config.sampler["latent_dim"]), generator=generator) * scale
    with torch.no_grad():
        return model.module(latents.to(device))


def draw_samples(
    model: LoadedModel | list[LoadedModel],
    n: int,
    steps: int | None = None,
    init: str = "noise",
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """One entry point for every family, used by the `sample` and `evaluate` commands.

    A list of EBM checkpoints of one ensemble samples as the server samples the ensemble: chains move
    under the members in turn and start from their pooled buffers.
    """
    members = model if isinstance(model, list) else [model]
    first = members[0]
    if len(members) > 1:
        ensembles = {member.config.ensemble for member in members}
        if first.config.family != "ebm" or len(ensembles) != 1 or None in ensembles:
            raise ValueError(
                "several checkpoints are sampled together only as EBMs of one declared ensemble; "
                f"got {', '.join(f'{m.name} ({m.config.family}, {m.config.ensemble})' for m in members)}"
            )
    if first.config.family == "ebm":
        return sample_ebm(members, n, langevin_settings(first.config, steps), init, generator, callback)
    if first.config.family == "gan":
        return sample_generator(first, n, generator=generator)
    if first.config.family == "flow":
        temperature = float(first.config.sampler.get("temperature", 1.0))
        return first.module.sample(n, temperature, generator).clamp(*first.data_range)
    raise ValueError(f"sampling {first.config.family} checkpoints is not supported yet")


def pooled_buffer(members: list[LoadedModel]) -> ReplayBuffer:
    """The members' saved replay buffers as one (empty when none was saved): an ensemble's shared buffer."""
    states = [member.extras["replay_buffer"] for member in members if "replay_buffer" in member.extras]
    restart = float(members[0].config.sampler.get("restart_prob", 0.05))
    return ReplayBuffer.pooled(states, members[0].shape, restart, members[0].data_range)


def sample_ebm(
    members: list[LoadedModel],
    n: int,
    settings: LangevinSettings,
    init: str = "noise",
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run n chains for settings.steps from uniform noise or from the checkpoints' replay buffers."""
    first = members[0]
    device = next(first.module.parameters()).device
    if init == "buffer":
        buffer = pooled_buffer(members)
        if len(buffer) == 0:
            raise ValueError(f"{first.name} has no saved replay buffer; use init='noise'")
        start, _ = buffer.draw(n, generator)
    elif init == "noise":
        low, high = settings.data_min, settings.data_max
        start = torch.rand(n, *first.shape, generator=generator) * (high - low) + low
    else:
        raise ValueError(f"init must be 'noise' or 'buffer', got {init!r}")
    energy = ensemble_energy([member.module for member in members])
    return sample_langevin(energy, start.to(device), settings, generator, callback)
