"""Checkpoints -> ready modules, and drawing samples from them outside the server."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from training.models import build_model
from training.models.cnf import guided_velocity, is_velocity_field
from training.models.flows import Flow
from training.runtime.checkpoint import Checkpoint, CheckpointError, ModelConfig, load_checkpoint, read_metadata
from training.sampling.ddls import LatentCallback, LatentEnergy, refine_latents, start_latents
from training.sampling.langevin import ReplayBuffer, StepCallback, ensemble_energy, sample_langevin
from training.sampling.noise import chain_classes, chain_gaussian, chain_gaussian_start, chain_start
from training.sampling.ode import OdeCallback, integrate
from training.sampling.sampler_config import Config, EBMSampler, FlowSampler, GANSampler, SamplerConfig, sampler_for


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    module: nn.Module
    sampler: SamplerConfig  # the checkpoint's typed sampling defaults
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    critic: nn.Module | None = None  # a GAN's saved critic (for DDLS), frozen, in eval mode; None: none saved

    def sampler_as(self, kind: type[Config]) -> Config:
        """The sampler config, typed for the family the caller handles."""
        if not isinstance(self.sampler, kind):
            raise ValueError(f"{self.name} is a {self.config.family} model; it has no {kind.__name__}")
        return self.sampler

    @property
    def data_range(self) -> tuple[float, float]:
        low, high = self.config.data.get("range", [-1.0, 1.0])
        return float(low), float(high)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.config.data["shape"])

    @property
    def has_replay_buffer(self) -> bool:
        """Whether it was trained with a replay buffer (contrastive divergence; EqM energies are not)."""
        return "replay_buffer" in self.extras

    @property
    def classes(self) -> list[str] | None:
        """Class names a conditional model draws by index (`label`); None for an unconditional model."""
        classes = self.config.data.get("classes")
        return list(classes) if classes and getattr(self.module, "num_classes", 0) > 0 else None

    def check_labels(self, labels: torch.Tensor | None) -> None:
        """ValueError naming the valid range when labels [B] do not index this model's classes."""
        if labels is None:
            return
        if self.classes is None:
            raise ValueError(f"{self.name} is not class-conditional; it takes no label")
        bad = labels[(labels < 0) | (labels >= len(self.classes))]
        if len(bad):
            raise ValueError(
                f"label {int(bad[0])} is out of range for {self.name}: 0..{len(self.classes) - 1} "
                f"({', '.join(self.classes)})"
            )


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _frozen(arch: dict, weights: dict[str, torch.Tensor], device: torch.device | str) -> nn.Module:
    """The architecture built and loaded with the weights; CheckpointError saying why when a config or tensors
    read from a file do not make one (unknown kwargs, sizes past the build limits, names or shapes that do not fit)."""
    name = str(arch.get("name") if isinstance(arch, dict) else arch)[:40]
    try:
        module = build_model(arch)
    except Exception as error:
        raise CheckpointError(f"arch {name!r} cannot be built: {_first_line(error)}") from error
    try:
        module.load_state_dict({key: value.float() for key, value in weights.items()})
    except Exception as error:
        raise CheckpointError(f"the weights do not fit arch {name!r}: {_first_line(error)}") from error
    module.to(device).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def instantiate(checkpoint: Checkpoint, name: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the module in eval mode with frozen parameters (a GAN uses its EMA weights by default, and
    brings its critic when the checkpoint holds one)."""
    sampler = sampler_for(checkpoint.config.family, checkpoint.config.sampler)
    weights = checkpoint.weights
    if isinstance(sampler, GANSampler) and sampler.weights == "ema":
        weights = checkpoint.extras["ema"]
    module = _frozen(checkpoint.config.arch, weights, device)
    critic = None
    if checkpoint.config.family == "gan" and "critic" in checkpoint.extras and "critic" in checkpoint.config.arch:
        critic = _frozen(checkpoint.config.arch["critic"], checkpoint.extras["critic"], device)
    return LoadedModel(name, checkpoint.config, module, sampler, checkpoint.extras, critic)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """A checkpoint, or a torch.export program `NAME.pt2` with its sidecar (training/runtime/exported.py)."""
    if Path(path).suffix == ".pt2":
        from training.runtime.exported import load_exported

        return load_exported(path, device)
    return instantiate(load_checkpoint(path), Path(path).stem, device)


def latent_energy(model: LoadedModel) -> LatentEnergy:
    """The DDLS energy of a GAN's latent; ValueError saying why when its checkpoint saved no critic."""
    if model.critic is None:
        raise ValueError(
            f"{model.name} has no critic saved with it, so its latents cannot be refined by DDLS "
            "(Langevin steps on ||z||^2/2 - d(G(z))); ask for steps 0, or serve a checkpoint `python -m "
            "training gan` wrote (it keeps the critic)"
        )
    return LatentEnergy(model.module, model.critic)


def default_latent_steps(model: LoadedModel) -> int:
    """The DDLS steps a GAN takes when none are asked for: its sampler's, or 0 (the plain pass) when no critic
    came with it (an exported program keeps the sampler of a checkpoint that had one)."""
    return model.sampler_as(GANSampler).steps if model.critic is not None else 0


def sample_generator(
    model: LoadedModel,
    seeds: torch.Tensor,
    temperature: float | None = None,
    steps: int | None = None,
    callback: LatentCallback | None = None,
) -> torch.Tensor:
    """GAN samples [B, *shape]: G(z) with z ~ N(0, T^2 I) from counter-based noise (the server's latents),
    after `steps` DDLS steps on z (default: the checkpoint's; 0 is the plain pass). T and the DDLS step size
    and noise default to the checkpoint's sampler."""
    sampler = model.sampler_as(GANSampler)
    device = next(model.module.parameters()).device
    scale = sampler.temperature if temperature is None else temperature
    steps = default_latent_steps(model) if steps is None else steps
    z = start_latents(seeds, sampler.latent_dim, scale).to(device)
    if steps > 0:
        z = refine_latents(
            latent_energy(model), z, seeds.to(device), steps, sampler.step_size, sampler.noise, scale, callback
        )
    with torch.no_grad():
        return model.module(z)


@torch.no_grad()
def integrate_cnf(
    field: nn.Module,
    seeds: torch.Tensor,  # [B] chain seeds
    shape: tuple[int, ...],
    sampler: FlowSampler,
    labels: torch.Tensor | None = None,  # [B], -1 = the null label
    temperature: float | None = None,
    steps: int | None = None,
    callback: OdeCallback | None = None,
) -> torch.Tensor:
    """A CNF's samples [B, *shape] (unclamped): x(0) ~ N(0, T^2 I) from counter-based noise of each seed, then
    the sampler's fixed-step ODE solver (training/sampling/ode.py) on the (guided) field to t = 1."""
    if sampler.solver is None or sampler.steps is None:
        raise ValueError("this flow's sampler declares no ODE solver and steps; it is not a CNF")
    device = next(field.parameters()).device
    scale = sampler.temperature if temperature is None else temperature
    start = (chain_gaussian_start(seeds, shape) * scale).to(device)
    velocity = guided_velocity(field, None if labels is None else labels.to(device), sampler.guidance)
    return integrate(velocity, start, sampler.steps if steps is None else steps, sampler.solver, callback)


def sample_flow(
    model: LoadedModel,
    seeds: torch.Tensor,
    temperature: float | None = None,
    steps: int | None = None,
    labels: torch.Tensor | None = None,
    callback: OdeCallback | None = None,
) -> torch.Tensor:
    """Flow samples [B, *shape] in the data range: the inverse of the module's own base at temperature T, or
    for a CNF the ODE from its Gaussian prior (`steps`, `labels` and `callback` apply to a CNF only)."""
    sampler = model.sampler_as(FlowSampler)
    if is_velocity_field(model.module):
        model.check_labels(labels)
        labels = chain_labels(model, seeds, labels)
        x = integrate_cnf(model.module, seeds, model.shape, sampler, labels, temperature, steps, callback)
        return x.clamp(*model.data_range)
    if labels is not None:
        raise ValueError(f"{model.name} is not class-conditional; it takes no label")
    flow = model.module
    assert isinstance(flow, Flow)
    device = next(flow.parameters()).device
    scale = sampler.temperature if temperature is None else temperature
    with torch.no_grad():
        return flow.inverse(flow.base_sample(seeds, scale).to(device))[0].clamp(*model.data_range)


def draw_samples(
    model: LoadedModel | list[LoadedModel],
    seeds: torch.Tensor,
    steps: int | None = None,
    init: str | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    labels: torch.Tensor | None = None,
    buffer: ReplayBuffer | None = None,
) -> torch.Tensor:
    """One entry point for every family, used by the `sample` and `evaluate` commands: one sample per
    chain seed [B] (see `training.sampling.noise.chain_seeds`), drawn as the server draws it. `labels` [B] pick
    the class of each chain of a class-conditional EBM.

    A list of EBM checkpoints of one ensemble samples as the server samples the ensemble: chains move
    under the members in turn and start from their pooled buffers, or from `buffer` when given (the one
    a server saved: `load_server_buffer`). `generator` draws buffer slots only.
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
    if labels is not None and first.config.family == "gan":
        raise ValueError(f"{first.name} is a {first.config.family} model; it takes no label")
    if first.config.family == "ebm":
        return sample_ebm(members, seeds, steps, init, generator, callback, labels, buffer)
    if first.config.family == "gan":
        decoded = None
        if callback is not None:  # DDLS steps report the images their latents decode to

            def decoded(step: int, z: torch.Tensor, energy: torch.Tensor) -> None:
                with torch.no_grad():
                    callback(step, first.module(z).clamp(*first.data_range), energy)

        return sample_generator(first, seeds, steps=steps, callback=decoded).clamp(*first.data_range)
    if first.config.family == "flow":
        return sample_flow(first, seeds, steps=steps, labels=labels, callback=callback)
    raise ValueError(f"sampling {first.config.family} checkpoints is not supported yet")


def pooled_buffer(members: list[LoadedModel]) -> ReplayBuffer:
    """The members' saved replay buffers as one (empty when none was saved): an ensemble's shared buffer."""
    states = [member.extras["replay_buffer"] for member in members if member.has_replay_buffer]
    restart = members[0].sampler_as(EBMSampler).restart_prob
    return ReplayBuffer.pooled(states, members[0].shape, restart, members[0].data_range)


def buffer_group_digest(checkpoint_sha256s: Iterable[str]) -> str:
    """The server's key for the buffer a group of EBMs shares: SHA-256 over its members' checkpoint-file
    SHA-256s in sorted order, so retraining any member retires the saved buffer."""
    return hashlib.sha256("".join(sorted(checkpoint_sha256s)).encode()).hexdigest()


def buffer_file_name(group: str, digest: str) -> str:
    """The file a server keeps a buffer group's replay buffer in, inside its --state-dir."""
    return f"buffer-{group}-{digest[:16]}.safetensors"


def buffer_group_files(checkpoints: list[Path], ensemble: str | None) -> list[Path]:
    """The checkpoint files whose EBMs a server, serving the first one's directory, samples over one replay
    buffer: the checkpoints given and, for an ensemble, every EBM beside them that names the same ensemble."""
    files = {Path(path).resolve() for path in checkpoints}
    if ensemble:
        for sibling in Path(checkpoints[0]).parent.glob("*.safetensors"):
            try:
                config = json.loads(read_metadata(sibling.read_bytes(), str(sibling)).get("config", "{}"))
            except (CheckpointError, json.JSONDecodeError, OSError):
                continue  # the server refuses such a file too
            if config.get("family") == "ebm" and config.get("ensemble") == ensemble:
                files.add(sibling.resolve())
    return sorted(files)


def load_server_buffer(
    state_dir: str | Path, checkpoints: list[Path], members: list[LoadedModel]
) -> tuple[ReplayBuffer, Path]:
    """The replay buffer a server saved in its --state-dir for these EBM checkpoints (one, or members of an
    ensemble), read without changing anything there; and its path.

    The group and file name follow `service/registry.py` and `service/buffer_store.py`: the ensemble's name
    (else the checkpoint's) and `buffer_group_digest` of the group's files as they are now."""
    state_dir = Path(state_dir)
    first = members[0]
    if first.config.family != "ebm":
        raise ValueError(f"--state-dir: {first.name} is a {first.config.family} model; only EBMs have replay buffers")
    if not any(member.has_replay_buffer for member in members):
        raise ValueError(f"--state-dir: {first.name} was trained without a replay buffer; a server keeps none for it")
    if not state_dir.is_dir():
        raise FileNotFoundError(f"--state-dir {state_dir} is not a directory; pass the server's --state-dir")
    group = first.config.ensemble or first.name
    files = buffer_group_files(checkpoints, first.config.ensemble)
    digest = buffer_group_digest(hashlib.sha256(path.read_bytes()).hexdigest() for path in files)
    path = state_dir / buffer_file_name(group, digest)
    if not path.is_file():
        others = sorted(other.name for other in state_dir.glob(f"buffer-{group}-*.safetensors"))
        hint = (
            f"it holds {', '.join(others)}, saved while {group} had other checkpoint files than "
            f"{', '.join(file.name for file in files)}"
            if others
            else "a server saves it once chains have run (every --buffer-save-interval-s, and at shutdown)"
        )
        raise FileNotFoundError(f"{state_dir} has no replay buffer {path.name} for {group}: {hint}")
    try:
        buffer = ReplayBuffer.from_state_dict(load_file(path))
    except (SafetensorError, KeyError, ValueError, RuntimeError) as error:
        raise ValueError(f"replay buffer {path} is unreadable ({error}); a server moves it aside on start") from error
    if buffer.shape != first.shape:
        raise ValueError(f"replay buffer {path} holds samples of shape {buffer.shape}; {group} needs {first.shape}")
    return buffer, path


def chain_labels(model: LoadedModel, seeds: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """The class each chain samples [B]: the asked-for labels, or for a conditional energy asked for none
    a class drawn from each chain's seed when its sampler says `unlabelled: random` (else the null label).
    The same for a conditional energy and a conditional CNF."""
    sampler = model.sampler
    unlabelled = sampler.unlabelled if isinstance(sampler, (EBMSampler, FlowSampler)) else "null"
    if labels is not None or model.classes is None or unlabelled != "random":
        return labels
    return chain_classes(seeds, len(model.classes))


def sample_ebm(
    members: list[LoadedModel],
    seeds: torch.Tensor,
    steps: int | None = None,
    init: str | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    labels: torch.Tensor | None = None,
    buffer: ReplayBuffer | None = None,
) -> torch.Tensor:
    """Run one chain per seed [B] for `steps` (default: the checkpoint's), from the checkpoint's prior
    ('noise') or a replay buffer ('buffer': `buffer`, else the members' pooled ones), with counter-based
    noise: seeded chains follow the path they follow in the server. `labels` [B] condition a
    class-conditional energy."""
    first = members[0]
    first.check_labels(labels)
    sampler = first.sampler_as(EBMSampler)
    device = next(first.module.parameters()).device
    init = init or sampler.init
    if init == "buffer":
        buffer = pooled_buffer(members) if buffer is None else buffer
        if len(buffer) == 0:
            raise ValueError(f"{first.name} has no saved replay buffer; use init='noise'")
        start, _, labels = buffer.start_chains(len(seeds), generator, labels, chain_labels(first, seeds, None))
    elif init == "noise":
        labels = chain_labels(first, seeds, labels)
        start = chain_start(seeds, first.shape, sampler, first.data_range)
    else:
        raise ValueError(f"init must be 'noise' or 'buffer', got {init!r}")

    def noise(step: int, x: torch.Tensor) -> torch.Tensor:
        return chain_gaussian(seeds, torch.full_like(seeds, step), first.shape).to(x.device)

    if labels is not None:
        labels = labels.to(device)
    energy = ensemble_energy([member.module for member in members], labels, sampler.guidance)
    return sample_langevin(energy, start.to(device), sampler, first.data_range, noise, callback, steps)
