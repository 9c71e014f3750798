"""The one loader of a model file, for the server and the CLI alike, with the checks every file gets.

Any file may be hostile: only a regular file inside its folder is read (a FIFO would block for ever, a link out
of it would serve and echo someone else's file), at most `max_bytes`, checked before reading; every architecture
is rehearsed under build limits (training/models) and compared with the tensors the file holds before anything
is allocated for it; a GAN must make images of its declared shape. What only a server asks of a file (a name it
puts in buffer file names, an image shape, one file per name, a time limit) is service/registry.py's.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import torch
from torch import nn

from training.models import build_model, skeleton
from training.runtime.checkpoint import (
    MAX_BUFFER_VALUES,
    SAMPLED_FAMILIES,
    Checkpoint,
    CheckpointError,
    decode_checkpoint,
    first_line,
)
from training.runtime.exported import PROGRAM_SUFFIX, SIDECAR_SUFFIX, load_exported
from training.runtime.loaded import LoadedModel
from training.sampling.sampler_config import GANSampler, sampler_for

MAX_MODEL_BYTES = 512 * 1024 * 1024  # the largest model file read (service/settings.py's max_model_bytes default)


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


def load_model(path: str | Path, device: torch.device | str = "cpu", max_bytes: int = MAX_MODEL_BYTES) -> LoadedModel:
    """A checkpoint, or a torch.export program `NAME.pt2` with its sidecar: what `python -m training sample` and
    `evaluate` load, through the reader and checks a server loads its models directory with."""
    path = Path(path)
    return load_model_file(path, path.parent, torch.device(device), max_bytes)[0]


def _check_generator(model: LoadedModel) -> None:
    """A GAN is served only if one latent of its declared size makes one image of its declared shape."""
    latent_dim = model.sampler_as(GANSampler).latent_dim
    device = next(model.module.parameters()).device
    try:
        with torch.no_grad():
            shape = tuple(model.module(torch.zeros(1, latent_dim, device=device)).shape[1:])
    except RuntimeError as error:
        raise CheckpointError(f"sampler.latent_dim {latent_dim} does not fit the generator ({error})") from error
    if shape != model.shape:
        raise CheckpointError(f"the generator makes images of shape {list(shape)}, the config says {list(model.shape)}")


def _check_shapes(checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint whose config would build other tensors than the file holds, before allocating any.

    The architecture is built on the meta device (shapes without memory) and its state dict compared
    with the tensors read from the file, whose size the file itself bounds; so a config claiming a
    width of 200,000 beside width-32 weights is refused without asking for its terabytes.
    """
    arch = checkpoint.config.arch
    groups = [("weights", arch, checkpoint.weights)]
    if checkpoint.config.family == "gan" and "ema" in checkpoint.extras:
        groups.append(("ema", arch, checkpoint.extras["ema"]))  # what a GAN serves by default
    if checkpoint.config.family == "gan" and "critic" in checkpoint.extras and "critic" in arch:
        groups.append(("critic", arch["critic"], checkpoint.extras["critic"]))  # DDLS's energy
    for group, group_arch, tensors in groups:
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


def _load_checkpoint(path: Path, payload: bytes, device: torch.device) -> LoadedModel:
    checkpoint = decode_checkpoint(payload, path.name)
    family = checkpoint.config.family
    if family not in SAMPLED_FAMILIES:
        raise CheckpointError(f"family {family!r} is not sampled by this version")
    _check_shapes(checkpoint)
    model = instantiate(checkpoint, path.stem, device)
    if family == "gan":
        _check_generator(model)
    return model


def _load_program(path: Path, payload: bytes, device: torch.device) -> LoadedModel:
    """A torch.export program and its sidecar (training/runtime/exported.py checks the archive and probes it)."""
    if path.with_suffix(".safetensors").exists():
        raise CheckpointError(f"{path.stem}.safetensors is served under the same name; rename one of the two")
    model = load_exported(path, device, payload)
    if len(model.shape) != 3:
        raise CheckpointError(f"data shape {list(model.shape)} is not an image [C, H, W]")
    return model


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path: Path, mode: int) -> CheckpointError:
    kind = next((name for test, name in _KINDS if test(mode)), "a device")
    return CheckpointError(f"{path.name} is not a regular file but {kind}; only regular files are read")


def read_model_file(path: Path, models_dir: Path, max_bytes: int) -> bytes:
    """The bytes of a file in the models directory, read only when it is a regular file of at most max_bytes
    that is (or links to) a file inside the directory: so reading never blocks, never fills memory, and a
    refusal never shows what a link out of the folder points at."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # no such file, a dangling link, or a loop of links
        if not os.path.lexists(path):
            raise CheckpointError(f"{path.name} does not exist; check the path and the file's name") from None
        raise CheckpointError(f"{path.name} is a link that does not resolve to a file") from None
    if not target.is_relative_to(models_dir.resolve()):
        raise CheckpointError(
            f"{path.name} is a link that leads outside the models directory; only files inside it are read "
            "(copy the file in instead)"
        )
    if not stat.S_ISREG(mode := target.stat().st_mode):  # before opening: opening a device may act on it
        raise _not_regular(path, mode)
    descriptor = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)  # a FIFO swapped in: no wait
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise _not_regular(path, status.st_mode)
        if status.st_size > max_bytes:
            raise CheckpointError(
                f"{path.name} is {status.st_size:,} bytes; the server reads files of at most {max_bytes:,} "
                "bytes (max_model_bytes)"
            )
        payload = handle.read(max_bytes + 1)
    if len(payload) > max_bytes:
        raise CheckpointError(f"{path.name} grew past {max_bytes:,} bytes (max_model_bytes) while it was read")
    return payload


def read_model_payload(path: Path, models_dir: Path, max_bytes: int = MAX_MODEL_BYTES) -> tuple[bytes, bytes]:
    """A model file's bytes and, for a program, its sidecar's (b"" for a checkpoint or a missing sidecar), read
    as `read_model_file` reads; together they are what a replay buffer's digest covers (buffer_files.py)."""
    payload = read_model_file(path, models_dir, max_bytes)
    sidecar = path.with_suffix(SIDECAR_SUFFIX)
    if path.suffix != PROGRAM_SUFFIX or not os.path.lexists(sidecar):
        return payload, b""
    return payload, read_model_file(sidecar, models_dir, max_bytes)


def load_model_file(
    path: Path, models_dir: Path, device: torch.device, max_bytes: int = MAX_MODEL_BYTES
) -> tuple[LoadedModel, bytes]:
    """The one loader: a checkpoint, or a program with its sidecar, read within models_dir and checked; and the
    bytes a buffer's digest covers (the program and its sidecar together)."""
    payload, sidecar_payload = read_model_payload(path, models_dir, max_bytes)
    if path.suffix != PROGRAM_SUFFIX:
        return _load_checkpoint(path, payload, device), payload
    return _load_program(path, payload, device), payload + sidecar_payload
