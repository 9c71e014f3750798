"""Checkpoints in the models directory -> served models, ensembles and the buffer groups they share.

Any file there may be hostile, so start-up is bounded file by file: only regular files inside the folder
are read (a FIFO would block for ever, a link out of it would serve and echo someone else's file), each at
most `max_model_bytes`, checked before reading; every architecture is rehearsed under build limits
(training/models); and each file loads in a thread of its own that is given up after `model_load_timeout_s`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from service.settings import Settings
from training.models import skeleton
from training.runtime.checkpoint import Checkpoint, CheckpointError, check_name, decode_checkpoint
from training.runtime.draw import LoadedModel, instantiate, pooled_buffer
from training.runtime.exported import PROGRAM_SUFFIX, SIDECAR_SUFFIX, load_exported
from training.sampling.langevin import ReplayBuffer
from training.sampling.sampler_config import GANSampler

log = logging.getLogger(__name__)
SERVED_FAMILIES = ("ebm", "gan", "flow")
MAX_REASON_CHARS = 300  # a refusal is one line of /readyz, whatever the file made its error say
Loaded = TypeVar("Loaded")
MAX_BUFFER_VALUES = 2**28  # replay-buffer capacity x values per sample: 1 GiB of float32 (MNIST's 8192: 6.4 M)


@dataclass
class BufferGroup:
    """EBMs that share one replay buffer: an ensemble, or a lone EBM by itself."""

    name: str
    members: list[LoadedModel]
    digest: str  # changes whenever any member's checkpoint changes: a stale buffer is never reused

    @property
    def has_buffer(self) -> bool:
        """Chains write back into a shared buffer only for EBMs trained with one."""
        return any(member.has_replay_buffer for member in self.members)

    def initial_buffer(self) -> ReplayBuffer:
        """The members' saved buffers pooled, or an empty buffer when none was saved."""
        return pooled_buffer(self.members)


@dataclass
class ServedModel:
    """A name clients can ask for: one checkpoint, or an ensemble sampled over its members in turn."""

    name: str
    family: str
    members: list[LoadedModel]
    group: str | None = None  # the BufferGroup (EBMs)

    @property
    def config(self):
        return self.members[0].config

    @property
    def classes(self) -> list[str] | None:
        """Class names a `label` indexes (class-conditional energies); None for an unconditional model."""
        return self.members[0].classes

    @property
    def has_buffer(self) -> bool:
        """Whether it was trained with a replay buffer (contrastive divergence); EqM energies are not."""
        return any(member.has_replay_buffer for member in self.members)

    @property
    def pool(self) -> str:
        """The worker pool that runs this model: its buffer group (EBMs) or its own name."""
        return self.group or self.name


@dataclass
class Registry:
    models: dict[str, ServedModel] = field(default_factory=dict)
    groups: dict[str, BufferGroup] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # file -> why it is not served


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
        expected = {name: list(tensor.shape) for name, tensor in skeleton(group_arch).state_dict().items()}
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
    if family not in SERVED_FAMILIES:
        raise CheckpointError(f"family {family!r} is not served by this version")
    if len(checkpoint.config.data["shape"]) != 3:
        raise CheckpointError(f"data shape {checkpoint.config.data['shape']} is not an image [C, H, W]")
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
    except (OSError, RuntimeError):  # a dangling link, or a loop of links
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


def _in_time(path: Path, seconds: float, load: Callable[[], Loaded]) -> Loaded:
    """load() in a daemon thread of its own, given up after `seconds`: start-up goes on without the file,
    and the thread, every step of which is bounded, ends on its own without keeping the process alive."""
    results: list[Loaded] = []
    failures: list[BaseException] = []
    finished = threading.Event()

    def run() -> None:
        try:
            results.append(load())
        except BaseException as error:  # raised again in the thread that waits, below
            failures.append(error)
        finally:
            finished.set()

    threading.Thread(target=run, name=f"load {path.name}", daemon=True).start()
    if not finished.wait(seconds):
        raise CheckpointError(
            f"{path.name} took longer than {seconds:g} s to load (model_load_timeout_s); start-up went on without it"
        )
    if failures:
        raise failures[0]
    return results[0]


def _load_file(path: Path, models_dir: Path, device: torch.device, max_bytes: int) -> tuple[LoadedModel, bytes]:
    """One checkpoint, or one program with its sidecar; and the bytes a buffer's digest covers."""
    check_name(path.stem, "model name (the file's stem)", path.name)  # it names buffer files
    payload = read_model_file(path, models_dir, max_bytes)
    if path.suffix != PROGRAM_SUFFIX:
        return _load_checkpoint(path, payload, device), payload
    sidecar = path.with_suffix(SIDECAR_SUFFIX)
    sidecar_payload = read_model_file(sidecar, models_dir, max_bytes) if os.path.lexists(sidecar) else b""
    return _load_program(path, payload, device), payload + sidecar_payload  # a buffer's digest covers both


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


@contextmanager
def signals_end_loading() -> Iterator[None]:
    """While models load, SIGTERM or Ctrl+C ends the process at once, as with no handler at all.

    Nothing has been served or changed yet, and uvicorn only notes the signal until start-up is over, so a
    slow file would otherwise hold the process until it is killed. Signals are the main thread's only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def end(number: int, frame: object) -> None:
        log.warning("%s while loading models: stopping before serving", signal.Signals(number).name)
        signal.signal(number, signal.SIG_DFL)
        signal.raise_signal(number)

    previous = {number: signal.signal(number, end) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def load_registry(
    models_dir: Path,
    device: torch.device,
    max_file_bytes: int = Settings.model_fields["max_model_bytes"].default,
    load_timeout_s: float = Settings.model_fields["model_load_timeout_s"].default,
) -> Registry:
    """Load every checkpoint in models_dir, and every torch.export program `NAME.pt2` with its sidecar
    `NAME.json`; a file that cannot be served, in time or at all, is refused with a one-line reason."""
    registry = Registry()
    if not models_dir.is_dir():
        raise FileNotFoundError(f"models directory {models_dir} does not exist")
    groups: dict[str, list[tuple[LoadedModel, str]]] = {}
    files: dict[str, str] = {}  # served name -> its file
    programs = sorted(models_dir.glob(f"*{PROGRAM_SUFFIX}"))  # torch.export programs beside JSON sidecars
    for path in [*sorted(models_dir.glob("*.safetensors")), *programs]:
        try:
            model, payload = _in_time(
                path, load_timeout_s, functools.partial(_load_file, path, models_dir, device, max_file_bytes)
            )
        except Exception as error:  # one bad file must not keep the others from being served
            registry.refused[path.name] = _one_line(error)
            log.warning("not serving %s: %s", path.name, registry.refused[path.name])
            continue
        family = model.config.family
        registry.models[model.name] = ServedModel(model.name, family, [model])
        files[model.name] = path.name
        if family == "ebm":
            group_name = model.config.ensemble or model.name
            groups.setdefault(group_name, []).append((model, hashlib.sha256(payload).hexdigest()))
    for group_name, members in groups.items():
        names = [member.name for member, _ in members]
        problem = None
        if len({tuple(member.shape) for member, _ in members}) > 1:
            problem = f"ensemble {group_name!r} mixes data shapes"
        elif group_name in registry.models and names != [group_name]:
            problem = f"ensemble name {group_name!r} is also a checkpoint's name; rename one"
        if problem:
            for name in names:
                registry.models.pop(name, None)
                registry.refused[files[name]] = problem
            continue
        combined = hashlib.sha256("".join(sorted(digest for _, digest in members)).encode()).hexdigest()
        registry.groups[group_name] = BufferGroup(group_name, [member for member, _ in members], combined)
        for name in names:
            registry.models[name].group = group_name
        if group_name not in registry.models:
            registry.models[group_name] = ServedModel(
                group_name, "ebm", [member for member, _ in members], group=group_name
            )
    return registry
