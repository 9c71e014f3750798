"""Persistent replay buffers: atomic save, restore on start, and recovery from a corrupt file.

Each buffer group's file is keyed by the hash of its checkpoints, so a retrained model never inherits
an old buffer. Saves go through `atomic_write_bytes` (write, fsync, rename): a crash at any moment
leaves the old file or the new one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from training.checkpoint import atomic_write_bytes
from training.langevin import ReplayBuffer

log = logging.getLogger(__name__)


class BufferStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.saved_at: dict[str, float] = {}

    def path(self, group: str, digest: str) -> Path:
        return self.state_dir / f"buffer-{group}-{digest[:16]}.safetensors"

    def load(self, group: str, digest: str, shape: tuple[int, ...]) -> ReplayBuffer | None:
        """The saved buffer, or None; a file that cannot be read is moved aside with a warning."""
        path = self.path(group, digest)
        if not path.exists():
            return None
        try:
            buffer = ReplayBuffer.from_state_dict(load_safetensors_bytes(path.read_bytes()))
            if buffer.shape != tuple(shape):
                raise ValueError(f"samples of shape {buffer.shape}, the model needs {tuple(shape)}")
        except Exception as error:  # any unreadable file must not stop the server
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            try:
                path.rename(aside)
            except OSError:
                log.exception("could not move %s aside", path)
            log.warning(
                "replay buffer %s is unreadable (%s); moved to %s, starting from the checkpoint's buffer",
                path,
                error,
                aside.name,
            )
            return None
        self.saved_at[group] = path.stat().st_mtime
        return buffer

    def save(self, group: str, digest: str, buffer: ReplayBuffer) -> None:
        state = {key: value.contiguous() for key, value in buffer.state_dict().items()}
        atomic_write_bytes(self.path(group, digest), save_safetensors_bytes(state, metadata={"group": group}))
        self.saved_at[group] = time.time()
