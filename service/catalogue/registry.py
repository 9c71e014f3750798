"""Checkpoints in the models directory -> served models, ensembles and the buffer groups they share.

Any file there may be hostile, so loading is bounded file by file: each is read and checked by the one loader
(training/runtime/load.py: regular files inside the folder only, at most `max_model_bytes`, architectures
rehearsed under build limits), and each loads in a thread of its own that is given up after
`model_load_timeout_s`. That holds at start and for every file the live models directory loads later
(service/catalogue/model_watch.py): both go through `load_file`, and `assemble` makes the served names (ensembles
regrouped) from whatever files are loaded at the time.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import torch

from service.settings import Settings
from training.families import Family, family_of
from training.runtime.buffer_names import group_digest, model_digest
from training.runtime.checkpoint import CheckpointError, check_name
from training.runtime.draw import pooled_buffer
from training.runtime.exported import PROGRAM_SUFFIX, companion_role
from training.runtime.load import load_model_file
from training.runtime.loaded import LoadedModel
from training.sampling.replay_buffer import ReplayBuffer

log = logging.getLogger(__name__)
MAX_REASON_CHARS = 300  # a refusal is one line of /readyz, whatever the file made its error say
VERSION_CHARS = 12  # a served version is this much of its digest (hex): what X-Model-Version and /models show
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
    version: str = ""  # its file's digest prefix (an ensemble: its buffer group's); changes when the file does
    pool_version: str = ""  # the version of the pool that runs it: its buffer group's (EBMs), else its own
    loaded_at: datetime | None = None  # when its file (an ensemble: its newest member's) was loaded, UTC

    @property
    def config(self):
        return self.members[0].config

    @property
    def kind(self) -> Family:
        """Its family (training/families/): the fields its requests read, its pools, how it describes itself."""
        return family_of(self.members[0])

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

    @property
    def pool_key(self) -> str:
        """The pool and the version of it that runs this model: a replaced file's requests run on in the old one."""
        return f"{self.pool}@{self.pool_version}"


@dataclass
class Registry:
    models: dict[str, ServedModel] = field(default_factory=dict)
    groups: dict[str, BufferGroup] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # file -> why it is not served


@dataclass(frozen=True)
class LoadedFile:
    """One model file as loaded: the model, the digest of what was read (its version) and when."""

    file: str  # the file's name in the models directory
    model: LoadedModel
    digest: str  # SHA-256 of the bytes read (a program's with its sidecar's): buffer_files.model_digest
    loaded_at: datetime
    size: int = 0  # bytes read (a program's with its sidecar's): what it counts against max_loaded_model_bytes

    @property
    def version(self) -> str:
        return self.digest[:VERSION_CHARS]


def _in_time(path: Path, seconds: float, load: Callable[[], Loaded]) -> Loaded:
    """load() in a daemon thread of its own, given up after `seconds`: loading goes on without the file,
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
            f"{path.name} took longer than {seconds:g} s to load (model_load_timeout_s); loading went on without it"
        )
    if failures:
        raise failures[0]
    return results[0]


def _load_file(path: Path, models_dir: Path, device: torch.device, max_bytes: int) -> tuple[LoadedModel, str, int]:
    """One served file through the one loader (training/runtime/load.py), with what only a server asks of it:
    a name it can put in buffer file names, one file per name, an image shape; and its buffer digest."""
    check_name(path.stem, "model name (the file's stem)", path.name)  # it names buffer files
    if path.suffix == PROGRAM_SUFFIX and path.with_suffix(".safetensors").exists():
        raise CheckpointError(f"{path.stem}.safetensors is served under the same name; rename one of the two")
    model, payload = load_model_file(path, models_dir, device, max_bytes, images_only=True)
    if len(model.shape) != 3:
        raise CheckpointError(f"data shape {list(model.shape)} is not an image [C, H, W]")
    return model, model_digest(payload), len(payload)


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


def model_files(models_dir: Path) -> list[Path]:
    """The files a models directory serves: checkpoints, then torch.export programs (each beside its JSON
    sidecar); names starting with a dot are left out (the temporary files of atomic saves). OSError when the
    directory is gone or cannot be listed (`Path.glob` would answer "no files", and unserve every model)."""
    names = [name for name in os.listdir(models_dir) if not name.startswith(".")]
    checkpoints = sorted(name for name in names if name.endswith(".safetensors"))
    programs = sorted(
        name for name in names if name.endswith(PROGRAM_SUFFIX) and not _companion_with_owner(name, names)
    )
    return [models_dir / name for name in [*checkpoints, *programs]]


def _companion_with_owner(name: str, names: list[str]) -> bool:
    """Whether `name` is a companion program (`NAME.critic.pt2`) whose own program is there: it is read, checked
    and swapped with that one. A companion alone is listed, and refused with the reason."""
    role = companion_role(name)
    return role is not None and name.removesuffix(f".{role}{PROGRAM_SUFFIX}") + PROGRAM_SUFFIX in names


def load_file(path: Path, models_dir: Path, device: torch.device, max_file_bytes: int, timeout_s: float) -> LoadedFile:
    """One file, read and checked as every served file is, within `timeout_s`; CheckpointError (or whatever
    the file made the loader raise) when it cannot be served."""
    model, digest, size = _in_time(
        path, timeout_s, functools.partial(_load_file, path, models_dir, device, max_file_bytes)
    )
    return LoadedFile(path.name, model, digest, datetime.now(UTC), size)


def refusal(error: BaseException) -> str:
    """Why a file is not served, as one line of /readyz."""
    return _one_line(error)


def assemble(files: Mapping[str, LoadedFile], refused: Mapping[str, str] | None = None) -> Registry:
    """The served names from the files loaded (file name -> LoadedFile): each file's model, and the buffer
    groups of EBMs (an ensemble, or a lone EBM by itself) with their digests; `refused` is carried over.

    Pure: called again whenever a file is added, replaced or removed, so ensembles regroup and a group's
    digest (the key of its replay buffer) follows its members.
    """
    registry = Registry(refused=dict(refused or {}))
    groups: dict[str, list[LoadedFile]] = {}
    for loaded in sorted(files.values(), key=_serving_order):
        model = loaded.model
        if model.name in registry.models:  # a program and a checkpoint of one name: the checkpoint is served
            registry.refused[loaded.file] = f"{model.name} is served from another file; rename one of the two"
            continue
        version, family = loaded.version, model.config.family
        served = ServedModel(
            model.name, family, [model], version=version, pool_version=version, loaded_at=loaded.loaded_at
        )
        registry.models[model.name] = served
        if served.kind.keeps_buffers:  # energies share replay buffers in groups (an ensemble, or one alone)
            groups.setdefault(model.config.ensemble or model.name, []).append(loaded)
    for group_name, members in groups.items():
        names = [member.model.name for member in members]
        problem = None
        if len({tuple(member.model.shape) for member in members}) > 1:
            problem = f"ensemble {group_name!r} mixes data shapes"
        elif group_name in registry.models and names != [group_name]:
            problem = f"ensemble name {group_name!r} is also a checkpoint's name; rename one"
        if problem:
            for member in members:
                registry.models.pop(member.model.name, None)
                registry.refused[member.file] = problem
            continue
        combined = group_digest(member.digest for member in members)
        models = [member.model for member in members]
        registry.groups[group_name] = BufferGroup(group_name, models, combined)
        version = combined[:VERSION_CHARS]
        for name in names:
            registry.models[name].group = group_name
            registry.models[name].pool_version = version
        if group_name not in registry.models:  # an ensemble (a lone EBM is its own group, under its own version)
            newest = max(member.loaded_at for member in members)
            registry.models[group_name] = ServedModel(
                group_name, "ebm", models, group=group_name, version=version, pool_version=version, loaded_at=newest
            )
    return registry


def _serving_order(loaded: LoadedFile) -> tuple[bool, str]:
    """Checkpoints before programs, each in name order: the order start-up has always loaded them in."""
    return loaded.file.endswith(PROGRAM_SUFFIX), loaded.file


def load_registry(
    models_dir: Path,
    device: torch.device,
    max_file_bytes: int = Settings.model_fields["max_model_bytes"].default,
    load_timeout_s: float = Settings.model_fields["model_load_timeout_s"].default,
) -> Registry:
    """Load every checkpoint in models_dir, and every torch.export program `NAME.pt2` with its sidecar
    `NAME.json`; a file that cannot be served, in time or at all, is refused with a one-line reason."""
    if not models_dir.is_dir():
        raise FileNotFoundError(f"models directory {models_dir} does not exist")
    files: dict[str, LoadedFile] = {}
    refused: dict[str, str] = {}
    for path in model_files(models_dir):
        try:
            files[path.name] = load_file(path, models_dir, device, max_file_bytes, load_timeout_s)
        except Exception as error:  # one bad file must not keep the others from being served
            refused[path.name] = refusal(error)
            log.warning("not serving %s: %s", path.name, refused[path.name])
    return assemble(files, refused)
