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

import logging
import tempfile
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors_bytes

from training.runtime.buffer_files import (
    buffer_file_name,
    inside_state_dir,
    pooled_state,
    read_saved_state,
    saved_buffer_paths,
)
from training.runtime.checkpoint import atomic_write_bytes
from training.sampling.replay_buffer import ReplayBuffer

log = logging.getLogger(__name__)

STALE_TEMP_AGE_S = 3600.0  # younger temporary files may be another replica's save in progress


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
        name = buffer_file_name(group, digest, self.shard, f"state directory {self.state_dir}")
        return inside_state_dir(self.state_dir, group, name)

    def saved_paths(self, group: str, digest: str) -> list[Path]:
        """Every saved file of the group and digest (training/runtime/buffer_files.py)."""
        return saved_buffer_paths(self.state_dir, group, digest)

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
            state = read_saved_state(path, tuple(shape))
            status = path.stat()
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
