"""Checkpoints in the models directory -> served models, ensembles and the buffer groups they share.

Any file there may be hostile, so start-up is bounded file by file: each is read and checked by the one loader
(training/runtime/load.py: regular files inside the folder only, at most `max_model_bytes`, architectures
rehearsed under build limits), and each loads in a thread of its own that is given up after
`model_load_timeout_s`.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from service.settings import Settings
from training.runtime.buffer_files import group_digest, model_digest
from training.runtime.checkpoint import CheckpointError, check_name
from training.runtime.draw import pooled_buffer
from training.runtime.exported import PROGRAM_SUFFIX
from training.runtime.load import load_model_file
from training.runtime.loaded import LoadedModel
from training.sampling.replay_buffer import ReplayBuffer

log = logging.getLogger(__name__)
MAX_REASON_CHARS = 300  # a refusal is one line of /readyz, whatever the file made its error say
Loaded = TypeVar("Loaded")


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


def _load_file(path: Path, models_dir: Path, device: torch.device, max_bytes: int) -> tuple[LoadedModel, str]:
    """One served file through the one loader (training/runtime/load.py), with what only a server asks of it:
    a name it can put in buffer file names, one file per name, an image shape; and its buffer digest."""
    check_name(path.stem, "model name (the file's stem)", path.name)  # it names buffer files
    if path.suffix == PROGRAM_SUFFIX and path.with_suffix(".safetensors").exists():
        raise CheckpointError(f"{path.stem}.safetensors is served under the same name; rename one of the two")
    model, payload = load_model_file(path, models_dir, device, max_bytes)
    if len(model.shape) != 3:
        raise CheckpointError(f"data shape {list(model.shape)} is not an image [C, H, W]")
    return model, model_digest(payload)


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
            model, digest = _in_time(
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
            groups.setdefault(group_name, []).append((model, digest))
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
        combined = group_digest(digest for _, digest in members)
        registry.groups[group_name] = BufferGroup(group_name, [member for member, _ in members], combined)
        for name in names:
            registry.models[name].group = group_name
        if group_name not in registry.models:
            registry.models[group_name] = ServedModel(
                group_name, "ebm", [member for member, _ in members], group=group_name
            )
    return registry
