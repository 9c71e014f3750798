"""The one loader of a model file, for the server and the CLI alike, with the checks every file gets.

Any file may be hostile: only a regular file inside its folder is read (a FIFO would block for ever, a link out
of it would serve and echo someone else's file), at most `max_bytes`, checked before reading; every architecture
is rehearsed under build limits (training/models) and compared with the tensors the file holds before anything
is allocated for it; each family checks what it must (a GAN makes images of its declared shape). What only a
server asks of a file (a name it puts in buffer file names, an image shape, one file per name, a time limit) is
service/catalogue/registry.py's.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from training.families import draw_samples, family_named, family_of
from training.models import build_model, skeleton
from training.runtime.checkpoint import (
    MAX_BUFFER_VALUES,
    MAX_MODEL_BYTES,
    SAMPLED_FAMILIES,
    Checkpoint,
    CheckpointError,
    decode_checkpoint,
    first_line,
    read_model_file,
)
from training.runtime.exported import (
    MAX_SIDECAR_BYTES,
    PROGRAM_SUFFIX,
    SIDECAR_SUFFIX,
    companion_role,
    load_exported,
    read_companions,
)
from training.runtime.loaded import LoadedModel
from training.sampling.noise import chain_seeds
from training.sampling.sampler_config import sampler_for


def _frozen(arch: dict, weights: dict[str, torch.Tensor], device: torch.device | str) -> nn.Module:
    """The architecture built and loaded with the weights; CheckpointError saying why when a config or tensors
    read from a file do not make one (unknown kwargs, sizes past the build limits, names or shapes that do not fit)."""
    name = str(arch.get("name") if isinstance(arch, dict) else arch)[:40]
    try:
        module = build_model(arch)
    except Exception as error:
        raise CheckpointError(f"arch {name!r} cannot be built: {first_line(error)}") from error
    try:
        module.load_state_dict({key: value.float() for key, value in weights.items()})
    except Exception as error:
        raise CheckpointError(f"the weights do not fit arch {name!r}: {first_line(error)}") from error
    module.to(device).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def instantiate(checkpoint: Checkpoint, name: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the module in eval mode with frozen parameters, from the weights its family serves (a GAN's EMA
    weights by default) and with the critic its family serves beside it (a GAN's, when the checkpoint holds one)."""
    sampler = sampler_for(checkpoint.config.family, checkpoint.config.sampler)
    family = family_named(checkpoint.config.family)
    module = _frozen(checkpoint.config.arch, family.served_weights(checkpoint, sampler), device)
    critic = family.critic(checkpoint)
    frozen_critic = None if critic is None else _frozen(*critic, device)
    return LoadedModel(name, checkpoint.config, module, sampler, checkpoint.extras, frozen_critic)


def load_model(path: str | Path, device: torch.device | str = "cpu", max_bytes: int = MAX_MODEL_BYTES) -> LoadedModel:
    """A checkpoint, or a torch.export program `NAME.pt2` with its sidecar: what `python -m training sample` and
    `evaluate` load, through the reader and checks a server loads its models directory with."""
    path = Path(path)
    return load_model_file(path, path.parent, torch.device(device), max_bytes)[0]


def _check_shapes(checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint whose config would build other tensors than the file holds, before allocating any.

    The architecture is built on the meta device (shapes without memory) and its state dict compared
    with the tensors read from the file, whose size the file itself bounds; so a config claiming a
    width of 200,000 beside width-32 weights is refused without asking for its terabytes.
    """
    for group, group_arch, tensors in family_named(checkpoint.config.family).weight_groups(checkpoint):
        try:
            built = skeleton(group_arch)
        except CheckpointError:
            raise
        except Exception as error:  # a config from a file: unknown kwargs or names, wrong types, past the limits
            reason = f"{group}: arch {str(group_arch)[:60]!r} cannot be built: {first_line(error)}"
            raise CheckpointError(reason) from error
        expected = {name: list(tensor.shape) for name, tensor in built.state_dict().items()}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{group} do not fit arch {group_arch['name']!r}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for name, shape in expected.items():
            if list(tensors[name].shape) != shape:
                raise CheckpointError(
                    f"{group}/{name} is {list(tensors[name].shape)} in the file, but the config's arch "
                    f"{group_arch.get('kwargs', {})} makes it {shape}"
                )
    state = checkpoint.extras.get("replay_buffer")
    if state is not None and "capacity" in state:
        capacity = int(state["capacity"].reshape(-1)[0]) if state["capacity"].numel() else 0
        values = capacity * math.prod(checkpoint.config.data["shape"])
        if capacity < 1 or values > MAX_BUFFER_VALUES:
            raise CheckpointError(
                f"replay_buffer/capacity {capacity:,} is not a buffer this server allocates "
                f"(1 to {MAX_BUFFER_VALUES // math.prod(checkpoint.config.data['shape']):,} samples of this shape)"
            )


def _load_checkpoint(path: Path, payload: bytes, device: torch.device, images_only: bool) -> LoadedModel:
    checkpoint = decode_checkpoint(payload, path.name)
    family = checkpoint.config.family
    if family not in SAMPLED_FAMILIES:
        raise CheckpointError(f"family {family!r} is not sampled by this version")
    if images_only and len(shape := checkpoint.config.data["shape"]) != 3:  # said before the probe fails on it
        raise CheckpointError(f"data shape {list(shape)} is not an image [C, H, W]")
    _check_shapes(checkpoint)
    model = instantiate(checkpoint, path.stem, device)
    family_of(model).check_loaded(model)
    check_classes(model)
    probe_checkpoint(model)
    return model


def check_classes(model: LoadedModel) -> None:
    """A conditional network's `data.classes` name exactly its classes: a label past the network's classes
    would index outside its embedding on the device (an IndexError in the middle of a shared batch)."""
    stated = model.config.data.get("classes")
    network = int(getattr(model.module, "num_classes", 0) or 0)
    if stated is not None and network and len(stated) != network:
        raise CheckpointError(
            f"data.classes lists {len(stated):,} class names, but the network has {network} classes; "
            "list exactly one name per class"
        )


def _non_finite(module: nn.Module | None) -> str | None:
    """The name of the first parameter or buffer of `module` holding NaN or infinity; None when all are finite."""
    if module is None:
        return None
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def probe_checkpoint(model: LoadedModel) -> None:
    """Finite weights and one probe step, as a request would take it, with finite results: what a checkpoint
    must pass before it is served, at first load and as a replacement (an exported program is probed by
    exported.probe). Weights with NaN in them would otherwise take over from a good version and answer every
    request with "chains diverged"; a `sample` would write a black image."""
    for what, module in (("weights", model.module), ("critic", model.critic)):
        if (name := _non_finite(module)) is not None:
            raise CheckpointError(f"{what}/{name} holds NaN or infinite values; a model is served with finite weights")
    try:
        samples = draw_samples(model, chain_seeds(0, 2), steps=family_of(model).probe_steps(model), init="noise")
    except Exception as error:  # a config that builds but cannot sample (a shape the network does not take, ...)
        raise CheckpointError(f"the probe step fails: {first_line(error)}") from error
    if not bool(torch.isfinite(samples).all()):
        raise CheckpointError("the probe step makes NaN or infinite values; this model cannot be sampled")


def _load_program(path: Path, files: ModelFiles, device: torch.device) -> LoadedModel:
    """A torch.export program, its sidecar and companions (training/runtime/exported.py checks and probes them)."""
    if path.with_suffix(".safetensors").exists():
        raise CheckpointError(f"{path.stem}.safetensors is served under the same name; rename one of the two")
    model = load_exported(path, device, files.payload, files.sidecar, files.companions)
    if len(model.shape) != 3:
        raise CheckpointError(f"data shape {list(model.shape)} is not an image [C, H, W]")
    return model


@dataclass(frozen=True)
class ModelFiles:
    """The bytes of what is served as one model, each file read once by `read_model_file`: a checkpoint; or a
    program with its sidecar (None when missing) and its companion programs by role."""

    payload: bytes
    sidecar: bytes | None = None
    companions: dict[str, bytes] = field(default_factory=dict)

    @property
    def digested(self) -> bytes:
        """What a model's digest covers (a replay buffer's key, a version): every file of the bundle, in order."""
        companions = (self.companions[role] for role in sorted(self.companions))
        return b"".join([self.payload, self.sidecar or b"", *companions])


def read_model_files(path: Path, models_dir: Path, max_bytes: int = MAX_MODEL_BYTES) -> ModelFiles:
    """A model file's bytes and, for a program, its sidecar's and its companions' (see `ModelFiles`)."""
    payload = read_model_file(path, models_dir, max_bytes)
    if path.suffix != PROGRAM_SUFFIX or companion_role(path.name) is not None:
        return ModelFiles(payload)
    sidecar_path = path.with_suffix(SIDECAR_SUFFIX)
    sidecar = None
    if os.path.lexists(sidecar_path):
        sidecar = read_model_file(sidecar_path, models_dir, min(max_bytes, MAX_SIDECAR_BYTES))
    return ModelFiles(payload, sidecar, read_companions(path, models_dir, max_bytes))


def load_model_file(
    path: Path, models_dir: Path, device: torch.device, max_bytes: int = MAX_MODEL_BYTES, images_only: bool = False
) -> tuple[LoadedModel, bytes]:
    """The one loader: a checkpoint, or a program with its sidecar and companions, read within models_dir and
    checked; and the bytes a digest covers (every file of the bundle). `images_only` (a server's): a data shape
    other than [C, H, W] is refused before anything is built."""
    files = read_model_files(path, models_dir, max_bytes)
    if path.suffix != PROGRAM_SUFFIX:
        model = _load_checkpoint(path, files.payload, device, images_only)
    else:
        model = _load_program(path, files, device)
    return model, files.digested
