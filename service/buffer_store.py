"""Persistent replay buffers: atomic save, restore on start, and recovery from a corrupt file.

Each buffer group's file is keyed by the hash of its checkpoints, so a retrained model never inherits
an old buffer. Saves go through `atomic_write_bytes` (write, fsync, rename): a crash at any moment
leaves the old file or the new one, and at worst a temporary file that `remove_stale_temp_files`
clears at the next start.

Several servers (the replicas of `--engine ray`) can share one state directory: each saves its own
shard, `buffer-GROUP-DIGEST-SHARD.safetensors`, and each pools at start every file of its group and
digest (the unsharded one and every shard), thinned evenly to the largest capacity among them, so what
one replica's chains learned reaches the others after a restart, and every replica starts from the
same buffer.

Persisting is a convenience, not a condition for serving: a state directory that is read-only or
vanishes is reported once (at start, or at the first failed save) and the server goes on sampling.

The state directory is not trusted either: every path built from a group name is checked to name a file
directly inside it (group names are checked at load too), a file that resolves outside it is not read,
and a saved buffer is read only if it is one this server could have written (its size, dtypes and
capacity bounded before anything is allocated for it); anything else is moved aside.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from training.runtime.checkpoint import atomic_write_bytes, check_name, max_buffer_capacity
from training.sampling.langevin import ReplayBuffer

log = logging.getLogger(__name__)

STALE_TEMP_AGE_S = 3600.0  # younger temporary files may be another replica's save in progress
HEADER_BYTES = 64 * 1024  # a saved buffer's safetensors header and metadata: under 1 KiB as this server writes it


class BufferStore:
    def __init__(self, state_dir: Path, shard: str | None = None) -> None:
        self.state_dir = state_dir
        self.shard = shard  # this server's shard name; None: the one unsharded file
        self.saved_at: dict[str, datetime] = {}  # group -> last save (or the saved file's time), UTC
        self.persisting = self._probe()

    def _probe(self) -> bool:
        """Whether a file can be written in the state directory; one warning if not."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.state_dir):
                pass
        except OSError as error:
            log.warning(
                "state directory %s is not writable (%s): replay buffers will be read from it but not saved, "
                "so they will not persist across restarts; make it writable or choose another --state-dir",
                self.state_dir,
                error.strerror or error,
            )
            return False
        return True

    def path(self, group: str, digest: str) -> Path:
        """The file this server saves the group's buffer to (its shard's, when it has one)."""
        shard = f"-{self.shard}" if self.shard else ""
        return self._inside(group, f"{self._stem(group, digest)}{shard}.safetensors")

    def saved_paths(self, group: str, digest: str) -> list[Path]:
        """Every saved file of the group and digest: the unsharded one and each shard, in name order; a file
        that resolves outside the state directory (a planted symbolic link) is left out with a warning."""
        stem = self._stem(group, digest)
        unsharded = self._inside(group, f"{stem}.safetensors")
        found = [unsharded, *self.state_dir.glob(f"{glob.escape(stem)}-*.safetensors")]
        shards = [path for path in found if path.name == unsharded.name or _is_shard(path.name, stem)]
        inside = []
        for path in sorted(shards):
            if not path.is_file():
                continue
            if not path.resolve().is_relative_to(self.state_dir.resolve()):
                log.warning("not reading replay buffer %s: it resolves outside the state directory", path)
                continue
            inside.append(path)
        return inside

    def _stem(self, group: str, digest: str) -> str:
        check_name(group, "buffer group", f"state directory {self.state_dir}")
        return f"buffer-{group}-{digest[:16]}"

    def _inside(self, group: str, name: str) -> Path:
        """state_dir/name, refused (ValueError) unless it names a file directly inside the state directory."""
        path = self.state_dir / name
        if "\x00" in name or Path(os.path.normpath(path)).parent != Path(os.path.normpath(self.state_dir)):
            raise ValueError(f"buffer group {group!r} would make a path outside the state directory: {name!r}")
        return path

    def load(self, group: str, digest: str, shape: tuple[int, ...]) -> ReplayBuffer | None:
        """The saved buffers of the group pooled (see the module docstring), or None when none is saved."""
        states: list[dict[str, torch.Tensor]] = []
        for path in self.saved_paths(group, digest):
            state = self._read(path, group, shape)
            if state is not None:
                states.append(state)
        if not states:
            return None
        if len(states) == 1:
            return ReplayBuffer.from_state_dict(states[0])
        return ReplayBuffer.from_state_dict(pooled_state(states))

    def _read(self, path: Path, group: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor] | None:
        """One saved buffer's state, or None; a file that cannot be read is moved aside (if it can be)."""
        try:
            status = path.stat()
            largest = max_buffer_file_bytes(shape)
            if status.st_size > largest:
                raise ValueError(f"{status.st_size:,} bytes; no buffer of samples {list(shape)} takes over {largest:,}")
            state = load_safetensors_bytes(path.read_bytes())
            check_saved_state(state, tuple(shape))
            saved = datetime.fromtimestamp(status.st_mtime, UTC)
        except FileNotFoundError:  # another replica's shard went away between listing and reading
            return None
        except Exception as error:  # any unreadable file must not stop the server
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            try:
                path.rename(aside)
                where = f"moved to {aside.name}"
            except OSError as move_error:
                where = f"left in place: could not move it aside ({move_error.strerror or move_error})"
            log.warning(
                "replay buffer %s is unreadable (%s); %s; starting from the checkpoint's buffer", path, error, where
            )
            return None
        self.saved_at[group] = max(saved, self.saved_at.get(group, saved))
        return state

    def save(self, group: str, digest: str, buffer: ReplayBuffer) -> bool:
        """Write the buffer atomically; False (and one warning while failures last) if it could not be."""
        path = self.path(group, digest)
        started = time.perf_counter()
        state = {key: value.contiguous() for key, value in buffer.state_dict().items()}
        try:
            atomic_write_bytes(path, save_safetensors_bytes(state, metadata={"group": group}))
        except OSError as error:
            if self.persisting:
                log.warning(
                    "could not save replay buffer %s (%s): buffers will not persist until %s is writable again; "
                    "the server keeps sampling and retries at each save",
                    path,
                    error.strerror or error,
                    self.state_dir,
                )
            else:
                log.debug("replay buffer %s still not saved (%s)", path, error)
            self.persisting = False
            return False
        if not self.persisting:
            log.warning("state directory %s is writable again: replay buffers persist from now on", self.state_dir)
            self.persisting = True
        self.saved_at[group] = datetime.now(UTC)
        milliseconds = 1000 * (time.perf_counter() - started)
        log.info("saved replay buffer %s: %d chains in %.0f ms", path, len(buffer), milliseconds)
        return True


def max_buffer_file_bytes(shape: tuple[int, ...]) -> int:
    """The largest file a saved buffer of samples `shape` can be: float32 samples and int64 labels at the
    largest capacity the server allocates, and a header."""
    return max_buffer_capacity(shape) * (4 * math.prod(shape) + 8) + HEADER_BYTES


SAVED_KEYS = {"samples", "labels", "capacity", "restart_prob", "next_replace", "data_range"}  # labels optional


def check_saved_state(state: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
    """Refuse (ValueError) a saved buffer this server could not have written, before a buffer is allocated
    for its stated capacity: ReplayBuffer.from_state_dict would otherwise allocate whatever it claims."""
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


def _is_shard(name: str, stem: str) -> bool:
    """Whether `name` is `STEM-SHARD.safetensors` with a shard name as Settings allows one."""
    shard = name.removeprefix(f"{stem}-").removesuffix(".safetensors")
    return name.startswith(f"{stem}-") and bool(shard) and all(char.isalnum() or char == "_" for char in shard)


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


def remove_stale_temp_files(directories: Iterable[Path], older_than_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Delete the temporary files of interrupted atomic saves (`.NAME.XXXXXXXX.tmp`, as `atomic_write_bytes`
    names them) older than `older_than_s`, logging each; younger ones are kept and counted."""
    removed: list[Path] = []
    now = time.time()
    for directory in directories:
        if not directory.is_dir():
            continue
        young = 0
        for path in sorted(directory.glob(".*.tmp")):
            try:
                if not path.is_file() or path.is_symlink():
                    continue
                status = path.stat()
                if now - status.st_mtime < older_than_s:
                    young += 1
                    continue
                path.unlink()
            except OSError as error:
                log.warning("could not remove the interrupted save %s (%s)", path, error.strerror or error)
                continue
            removed.append(path)
            log.info(
                "removed %s, left by an interrupted save %.1f h ago (%.1f MB)",
                path,
                (now - status.st_mtime) / 3600,
                status.st_size / 1e6,
            )
        if young:
            log.info(
                "kept %d temporary file(s) in %s younger than %.0f s: saves may be under way",
                young,
                directory,
                older_than_s,
            )
    return removed
