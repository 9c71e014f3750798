"""Where a server keeps a buffer group's replay buffer: the digests that key it and the names and paths of its
files (training/runtime/buffer_files.py reads and writes them).

A group's buffer is keyed by its digest: SHA-256 over its members' digests in sorted order, each member's the
SHA-256 of its file (a program's together with its sidecar), so retraining any member retires the buffer. A
single server saves `buffer-GROUP-DIGEST16.safetensors`; the replicas of `--engine ray` save a shard each,
`buffer-GROUP-DIGEST16-SHARD.safetensors`.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from training.runtime.checkpoint import check_name

log = logging.getLogger(__name__)


def model_digest(payload: bytes) -> str:
    """One member's digest: the SHA-256 of what `load.read_model_files` read (`ModelFiles.digested`)."""
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
