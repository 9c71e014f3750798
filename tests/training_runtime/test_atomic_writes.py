"""Training writes where a server reads: every save replaces the file whole, so a reader that opens it while a
run saves again and again gets one complete version or the other, never a torn file, and a watching server
can take a finished save at first sight."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_ebm

from service.catalogue.model_watch import is_complete, stamp_of
from training.commands.export import export_model
from training.commands.set_sampler import set_sampler
from training.runtime.checkpoint import Checkpoint, CheckpointError, decode_checkpoint, load_checkpoint, save_checkpoint
from training.runtime.load import load_model, read_model_file

MAX_BYTES = 64 * 1024 * 1024


def _big_checkpoint(path: Path, seed: int) -> Checkpoint:
    """A tiny EBM with a 4 MB replay buffer: large enough that a plain write takes many system calls."""
    write_tiny_ebm(path, seed=seed)
    checkpoint = load_checkpoint(path)
    generator = torch.Generator().manual_seed(seed)
    checkpoint.extras["replay_buffer"]["samples"] = torch.rand(1280, 1, 28, 28, generator=generator) * 2 - 1
    return checkpoint


def _read_while(writing: threading.Thread, path: Path, check) -> int:
    """Read `path` as the server does, over and over while `writing` runs; `check` each read; the reads made."""
    reads = 0
    while writing.is_alive() or reads == 0:
        payload = read_model_file(path, path.parent, MAX_BYTES)
        check(payload)
        reads += 1
    return reads


def test_a_reader_never_sees_a_torn_checkpoint_while_saves_replace_it(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    versions = [_big_checkpoint(tmp_path / f"source{seed}.safetensors", seed) for seed in (1, 2)]
    save_checkpoint(path, versions[0])
    digests = set()
    for version in versions:
        save_checkpoint(tmp_path / "probe.safetensors", version)
        digests.add(hashlib.sha256((tmp_path / "probe.safetensors").read_bytes()).hexdigest())
    failures: list[BaseException] = []

    def saves() -> None:
        try:
            for index in range(40):
                save_checkpoint(path, versions[index % 2])
        except BaseException as error:
            failures.append(error)

    seen: set[str] = set()

    def whole(payload: bytes) -> None:
        decode_checkpoint(payload, path.name)  # raises on a torn file
        seen.add(hashlib.sha256(payload).hexdigest())

    writer = threading.Thread(target=saves)
    writer.start()
    reads = _read_while(writer, path, whole)
    writer.join()
    assert not failures
    assert reads >= 5, f"only {reads} reads overlapped the saves"
    assert seen <= digests  # every read was one saved version, byte for byte
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_the_reader_check_refuses_a_torn_file(tmp_path: Path) -> None:
    """The check above can fail: half a checkpoint, as a plain write leaves it mid-way, is refused."""
    path = write_tiny_ebm(tmp_path / "whole.safetensors")
    payload = path.read_bytes()
    with pytest.raises(CheckpointError):
        decode_checkpoint(payload[: len(payload) // 2], "torn.safetensors")


def test_set_sampler_rewrites_a_checkpoint_whole_while_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, _big_checkpoint(tmp_path / "source.safetensors", 3))
    failures: list[BaseException] = []

    def rewrites() -> None:
        try:
            for index in range(20):
                set_sampler(path, [f"steps={5 + index % 2}"])
        except BaseException as error:
            failures.append(error)

    steps: set[int] = set()
    writer = threading.Thread(target=rewrites)
    writer.start()
    _read_while(writer, path, lambda payload: steps.add(decode_checkpoint(payload, path.name).config.sampler["steps"]))
    writer.join()
    assert not failures
    assert steps <= {10, 5, 6}  # the original default, or one of the two rewrites


def test_saves_and_exports_are_complete_at_first_sight_for_a_watching_server(tmp_path: Path) -> None:
    """A server polling its models directory takes a finished save at once, not a poll later; a program and its
    sidecar (two files) once they have stopped changing."""
    checkpoint = write_tiny_ebm(tmp_path / "ebm.safetensors")
    set_sampler(checkpoint, ["steps=4"])
    assert is_complete(stamp_of(checkpoint), previous=None)

    program, _ = export_model(load_model(checkpoint), tmp_path / "exported.pt2")
    stamp = stamp_of(program)
    program_and_sidecar, companions = stamp[:2], stamp[2:]
    assert all(part is not None and part.renamed_in for part in program_and_sidecar)
    assert companions and all(part is None for part in companions)  # an energy has none
    assert not is_complete(stamp, previous=None) and is_complete(stamp, previous=stamp)
    assert not list(tmp_path.glob(".*.tmp"))
    assert load_model(program).name == "exported"

    in_place = tmp_path / "copied.safetensors"
    with in_place.open("wb") as handle:  # as `cp` writes: in place, no rename
        handle.write(checkpoint.read_bytes())
    assert not is_complete(stamp_of(in_place), previous=None)
    assert is_complete(stamp_of(in_place), previous=stamp_of(in_place))
    os.utime(in_place, ns=(0, 0))  # as `cp -p` ends: the source's times restored once the bytes are in
    assert is_complete(stamp_of(in_place), previous=None)
