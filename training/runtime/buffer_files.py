"""Where a server keeps a buffer group's replay buffer, and how it is read back: one module for the server
(service/buffer_store.py) and the CLI (`sample --state-dir`), so both find the same file for every model.

A group's buffer is keyed by its digest: SHA-256 over its members' digests in sorted order, each member's the
SHA-256 of its file (a program's together with its sidecar), so retraining any member retires the buffer. A
single server saves `buffer-GROUP-DIGEST16.safetensors`; the replicas of `--engine ray` save a shard each,
`buffer-GROUP-DIGEST16-SHARD.safetensors`, and whoever reads pools every file of the group and digest,
thinned evenly to the largest capacity among them. A saved file is read only if a server could have written
it (size, dtypes, capacity and values bounded before anything is allocated for it).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes

from training.runtime.checkpoint import CheckpointError, check_name, max_buffer_capacity, read_metadata, read_model_file
from training.runtime.exported import PROGRAM_SUFFIX, SIDECAR_SUFFIX, read_sidecar
from training.runtime.load import read_model_payload
from training.runtime.loaded import LoadedModel
from training.sampling.replay_buffer import ReplayBuffer

log = logging.getLogger(__name__)

HEADER_BYTES = 64 * 1024  # a saved buffer's safetensors header and metadata: under 1 KiB as a server writes it
SAVED_KEYS = {"samples", "labels", "capacity", "restart_prob", "next_replace", "data_range"}  # labels optional


def model_digest(payload: bytes) -> str:
    """One member's digest: the SHA-256 of what `load.read_model_payload` read (a program with its sidecar)."""
    return hashlib.sha256(payload).hexdigest()


def group_digest(member_digests: Iterable[str]) -> str:
    """A buffer group's key: SHA-256 over its members' digests in sorted order."""
    return hashlib.sha256("".join(sorted(member_digests)).encode()).hexdigest()


def buffer_stem(group: str, digest: str, where: str) -> str:
    """`buffer-GROUP-DIGEST16`, the start of every file of the group's buffer; the group name is checked first."""
    check_name(group, "buffer group", where)
    return f"buffer-{group}-{digest[:16]}"


def buffer_file_name(group: str, digest: str, shard: str | None = None, where: str = "state directory") -> str:
    """The file one server (or, with `shard`, one replica) saves the group's buffer in."""
    return f"{buffer_stem(group, digest, where)}{f'-{shard}' if shard else ''}.safetensors"


def inside_state_dir(state_dir: Path, group: str, name: str) -> Path:
    """state_dir/name, refused (ValueError) unless it names a file directly inside the state directory."""
    path = state_dir / name
    if "\x00" in name or Path(os.path.normpath(path)).parent != Path(os.path.normpath(state_dir)):
        raise ValueError(f"buffer group {group!r} would make a path outside the state directory: {name!r}")
    return path


def is_shard(name: str, stem: str) -> bool:
    """Whether `name` is `STEM-SHARD.safetensors` with a shard name as the server's settings allow one."""
    shard = name.removeprefix(f"{stem}-").removesuffix(".safetensors")
    return name.startswith(f"{stem}-") and bool(shard) and all(char.isalnum() or char == "_" for char in shard)


def saved_buffer_paths(state_dir: Path, group: str, digest: str) -> list[Path]:
    """Every saved file of the group and digest: the unsharded one and each shard, in name order; a file that
    resolves outside the state directory (a planted symbolic link) is left out with a warning."""
    stem = buffer_stem(group, digest, f"state directory {state_dir}")
    unsharded = inside_state_dir(state_dir, group, f"{stem}.safetensors")
    found = [unsharded, *state_dir.glob(f"{glob.escape(stem)}-*.safetensors")]
    shards = [path for path in found if path.name == unsharded.name or is_shard(path.name, stem)]
    inside = []
    for path in sorted(set(shards)):
        if not path.is_file():
            continue
        if not path.resolve().is_relative_to(state_dir.resolve()):
            log.warning("not reading replay buffer %s: it resolves outside the state directory", path)
            continue
        inside.append(path)
    return inside


def max_buffer_file_bytes(shape: tuple[int, ...]) -> int:
    """The largest file a saved buffer of samples `shape` can be: float32 samples and int64 labels at the
    largest capacity a server allocates, and a header."""
    return max_buffer_capacity(shape) * (4 * math.prod(shape) + 8) + HEADER_BYTES


def check_saved_state(state: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
    """Refuse (ValueError) a saved buffer a server could not have written, before a buffer is allocated for its
    stated capacity: ReplayBuffer.from_state_dict would otherwise allocate whatever it claims."""
    missing, unknown = sorted(SAVED_KEYS - {"labels"} - set(state)), sorted(set(state) - SAVED_KEYS)
    if missing or unknown:
        raise ValueError(f"tensors missing {missing}, unknown {unknown}; a saved buffer has {sorted(SAVED_KEYS)}")
    samples, labels = state["samples"], state.get("labels")
    if samples.dtype != torch.float32 or tuple(samples.shape[1:]) != shape or samples.dim() != len(shape) + 1:
        needed = ", ".join(str(size) for size in shape)
        raise ValueError(f"samples are {samples.dtype} {list(samples.shape)}; the model needs float32 [n, {needed}]")
    if labels is not None and (labels.dtype != torch.int64 or list(labels.shape) != [len(samples)]):
        raise ValueError(f"labels are {labels.dtype} {list(labels.shape)}; they should be int64 [{len(samples)}]")
    for name in ("capacity", "next_replace"):
        if state[name].dtype != torch.int64 or state[name].dim() != 0:
            raise ValueError(f"{name} is {state[name].dtype} {list(state[name].shape)}, not one int64")
    capacity, most = int(state["capacity"]), max_buffer_capacity(shape)
    if not 1 <= capacity <= most:
        raise ValueError(f"capacity {capacity:,} is not a buffer this server allocates (1 to {most:,} samples)")
    if len(samples) > capacity or not 0 <= int(state["next_replace"]) < capacity:
        raise ValueError(
            f"{len(samples)} samples and next_replace {int(state['next_replace'])} do not fit capacity {capacity}"
        )
    restart_prob, data_range = state["restart_prob"], state["data_range"]
    if not (restart_prob.is_floating_point() and restart_prob.dim() == 0 and 0.0 <= float(restart_prob) <= 1.0):
        raise ValueError(f"restart_prob {restart_prob.tolist()} is not one probability")
    if not (data_range.is_floating_point() and list(data_range.shape) == [2] and bool(data_range.isfinite().all())):
        raise ValueError(f"data_range {data_range.tolist()} is not [low, high]")
    if not data_range[0] < data_range[1]:
        raise ValueError(f"data_range {data_range.tolist()} is empty; low must be below high")
    if not bool(samples.isfinite().all()):
        raise ValueError("samples are not all finite: chains started from them would diverge at once")


def read_saved_state(path: Path, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """One saved buffer's state, checked; ValueError (or OSError) saying why it cannot be used."""
    size, largest = path.stat().st_size, max_buffer_file_bytes(shape)
    if size > largest:
        raise ValueError(f"{size:,} bytes; no buffer of samples {list(shape)} takes over {largest:,}")
    state = load_safetensors_bytes(path.read_bytes())
    check_saved_state(state, tuple(shape))
    return state


def pooled_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several saved buffers of one group as one state: their slots in order, thinned evenly to the largest
    capacity among them (so pooling at every restart never grows the buffer), classes kept with their slots."""
    samples = torch.cat([state["samples"].float() for state in states])  # [total, *shape]
    labels = torch.cat([state.get("labels", torch.full((len(state["samples"]),), -1)) for state in states])
    capacity = max(int(state["capacity"]) for state in states)
    if len(samples) > capacity:
        keep = torch.linspace(0, len(samples) - 1, capacity).round().long()  # [capacity]
        samples, labels = samples[keep], labels[keep]
    return {
        **states[0],
        "samples": samples,
        "labels": labels,
        "capacity": torch.tensor(capacity),
        "next_replace": torch.tensor(len(samples) % capacity),
    }


def _payload(path: Path) -> bytes:
    """What a server's digest of a member covers: its bytes and a program's sidecar's, as the loader read them."""
    payload, sidecar = read_model_payload(path, path.parent)
    return payload + (sidecar or b"")


def _ensemble_of(path: Path) -> str | None:
    """The ensemble an EBM file declares (a checkpoint's metadata, a program's sidecar); None otherwise."""
    try:
        if path.suffix == PROGRAM_SUFFIX:
            config = read_sidecar(path.with_suffix(SIDECAR_SUFFIX))
            return config.ensemble if config.family == "ebm" else None
        raw = json.loads(read_metadata(read_model_file(path, path.parent), str(path)).get("config", "{}"))
    except (CheckpointError, json.JSONDecodeError, OSError, ValueError, RecursionError):
        return None  # the server refuses such a file too
    return raw.get("ensemble") if isinstance(raw, dict) and raw.get("family") == "ebm" else None


def buffer_group_files(checkpoints: list[Path], ensemble: str | None) -> list[Path]:
    """The model files whose EBMs a server, serving the first one's directory, samples over one replay buffer:
    the files given and, for an ensemble, every EBM checkpoint or program beside them in the same ensemble."""
    files = {Path(path).resolve() for path in checkpoints}
    if ensemble:
        folder = Path(checkpoints[0]).parent
        for sibling in [*folder.glob("*.safetensors"), *folder.glob(f"*{PROGRAM_SUFFIX}")]:
            if _ensemble_of(sibling) == ensemble:
                files.add(sibling.resolve())
    return sorted(files)


def load_server_buffer(
    state_dir: str | Path, checkpoints: list[Path], members: list[LoadedModel]
) -> tuple[ReplayBuffer, list[Path]]:
    """The replay buffer a server saved in its --state-dir for these EBMs (one, or members of an ensemble),
    read as the server reads it (every shard pooled) without changing anything there; and the files read."""
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
    digest = group_digest(model_digest(_payload(path)) for path in files)
    paths = saved_buffer_paths(state_dir, group, digest)
    if not paths:
        others = sorted(other.name for other in state_dir.glob(f"buffer-{glob.escape(group)}-*.safetensors"))
        hint = (
            f"it holds {', '.join(others)}, saved while {group} had other model files than "
            f"{', '.join(file.name for file in files)}"
            if others
            else "a server saves it once chains have run (every --buffer-save-interval-s, and at shutdown)"
        )
        name = buffer_file_name(group, digest)
        raise FileNotFoundError(f"{state_dir} has no replay buffer {name} (or its shards) for {group}: {hint}")
    states = []
    for path in paths:
        try:
            states.append(read_saved_state(path, first.shape))
        except (ValueError, KeyError, RuntimeError, OSError) as error:
            raise ValueError(f"replay buffer {path} is unreadable ({error}); a server moves it aside on start") from (
                error
            )
    return ReplayBuffer.from_state_dict(states[0] if len(states) == 1 else pooled_state(states)), paths
