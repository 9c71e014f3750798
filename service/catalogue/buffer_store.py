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

Buffers are held and saved in float16 (files saved in float32 by earlier servers still load). A save copies
the buffer out a chunk at a time as it writes (training/runtime/buffer_files.py), on the worker's saver thread
(`BufferSaver`), so chain steps never wait for a save; a load reads the file a chunk at a time into the
buffer, so start-up peaks at the buffer and one chunk. Every buffer of a server shares one byte budget
(`BufferBudget` in service/catalogue/budgets.py, --buffer-budget-mb): a buffer that does not fit is thinned
or refused, with the reason in the log and in /models.

The state directory is not trusted either: every path built from a group name is checked to name a file
directly inside it (group names are checked at load too), a file that resolves outside it is not read,
and a saved buffer is read only if it is one this server could have written (its size, dtypes and
capacity bounded before anything is allocated for it); anything else is moved aside.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from datetime import UTC, datetime
from pathlib import Path

import torch

from training.runtime.buffer_files import (
    SavedBuffer,
    UnreadableBuffer,
    buffer_file_chunks,
    open_saved_buffer,
    read_saved_buffers,
)
from training.runtime.buffer_names import buffer_file_name, inside_state_dir, saved_buffer_paths
from training.runtime.checkpoint import atomic_write_bytes
from training.sampling.replay_buffer import ReplayBuffer

log = logging.getLogger(__name__)

STALE_TEMP_AGE_S = 3600.0  # younger temporary files may be another replica's save in progress
BUFFER_DTYPE = torch.float16  # what a server holds and saves its replay buffers in
# The saver thread's niceness: CPU weight 110 against the worker's 1024 (19 would starve a save under load).
SAVER_NICE = 10


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

    def load(
        self,
        group: str,
        digest: str,
        shape: tuple[int, ...],
        capacity: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> ReplayBuffer | None:
        """The saved buffers of the group pooled into one of `capacity` slots (default: the largest saved) in
        `dtype` (see the module docstring), or None when none is saved."""
        saved = [each for path in self.saved_paths(group, digest) if (each := self._open(path, group, shape))]
        while saved:
            try:
                return read_saved_buffers(saved, tuple(shape), capacity, dtype)
            except UnreadableBuffer as error:  # its samples, read after its header: drop it and pool the rest
                self._move_aside(error.path, error.error)
                saved = [each for each in saved if each.path != error.path]
        return None

    def _open(self, path: Path, group: str, shape: tuple[int, ...]) -> SavedBuffer | None:
        """One saved buffer's header, checked, or None; a file that cannot be read is moved aside (if it can be)."""
        try:
            saved = open_saved_buffer(path, tuple(shape))
            status = path.stat()
            saved_at = datetime.fromtimestamp(status.st_mtime, UTC)
        except FileNotFoundError:  # another replica's shard went away between listing and reading
            return None
        except Exception as error:  # any unreadable file must not stop the server
            self._move_aside(path, error)
            return None
        self.saved_at[group] = max(saved_at, self.saved_at.get(group, saved_at))
        return saved

    def _move_aside(self, path: Path, error: Exception) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        try:
            path.rename(aside)
            where = f"moved to {aside.name}"
        except OSError as move_error:
            where = f"left in place: could not move it aside ({move_error.strerror or move_error})"
        log.warning(
            "replay buffer %s is unreadable (%s); %s; starting from the checkpoint's buffer", path, error, where
        )

    def save(self, group: str, digest: str, buffer: ReplayBuffer) -> bool:
        """Write the buffer atomically; False (and one warning while failures last) if it could not be.

        Safe on another thread than the one stepping chains: the buffer is copied out a chunk at a time."""
        if buffer.capacity == 0:  # refused by the budget: it keeps nothing, and a saved file stays as it is
            return True
        path = self.path(group, digest)
        started = time.perf_counter()
        try:
            atomic_write_bytes(path, buffer_file_chunks(buffer, group))
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
        megabytes = len(buffer) * buffer.slot_bytes(buffer.shape, buffer.dtype) / 2**20
        log.info("saved replay buffer %s: %d chains (%.1f MiB) in %.0f ms", path, len(buffer), megabytes, milliseconds)
        return True


def _yield_to_the_worker() -> None:
    """Lower the saver thread's priority (SAVER_NICE, Linux): on a core the chains keep busy, a save's copies
    and write system calls then take about a tenth of it, so steps barely slow and the save still ends."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: it runs at the same priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SAVER_NICE)


class BufferSaver:
    """Saves replay buffers on a thread of its own, one at a time, so that chain steps never wait for a save:
    the worker submits a buffer and goes on stepping; it collects the outcome later (`finished`)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="buffer-save", initializer=_yield_to_the_worker
        )
        self.saving: dict[str, Future[bool]] = {}  # NAME@DIGEST -> its save under way (or done, not collected)

    def submit(self, name: str, save: Callable[[], bool]) -> bool:
        """Start `save` (BufferStore.save bound to one buffer); False while that buffer's last save is under way."""
        if name in self.saving:
            return False
        self.saving[name] = self._executor.submit(save)
        return True

    def finished(self, wait: bool = False) -> list[tuple[str, Future[bool]]]:
        """The saves that are over (with `wait`: all, once they are), each collected once."""
        if wait:
            futures_wait(list(self.saving.values()))
        done = [(name, future) for name, future in self.saving.items() if future.done()]
        for name, _ in done:
            del self.saving[name]
        return done

    def close(self) -> None:
        self._executor.shutdown(wait=True)


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
