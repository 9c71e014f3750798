"""Mutated model files: whatever the bytes, the CLI's loader (training.runtime.draw.load_model) loads the file or
refuses it with a CheckpointError that says why, never another exception; the server's registry serves it
or lists it as refused with a reason; and no code of the file ever runs (the hostile archives among the
starting points would create a marker file if anything unpickled them)."""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path

import pytest
import torch
from hostile_archives import (
    TINY_SHAPE,
    Entry,
    pickled_marker,
    records,
    replaced,
    tiny_program,
    two_views,
    zip_archive,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.catalogue.registry import load_registry
from training.models import build_model
from training.runtime.checkpoint import Checkpoint, CheckpointError, ModelConfig, encode_checkpoint
from training.runtime.load import load_model

RUN = settings(
    deadline=None,
    derandomize=True,  # the same cases every run: a failure here is a regression, not bad luck
    database=None,
    suppress_health_check=list(HealthCheck),
)
CPU = torch.device("cpu")


def tiny_checkpoint() -> bytes:
    """A four-pixel MLP energy checkpoint: the smallest real checkpoint the server would serve."""
    torch.manual_seed(0)
    arch = {"name": "mlp_energy", "kwargs": {"dim": 4, "hidden": 4, "depth": 1}}
    config = ModelConfig(
        family="ebm",
        arch=arch,
        data={"shape": list(TINY_SHAPE), "range": [-1.0, 1.0]},
        sampler={"steps": 2, "step_size": 0.05, "noise": 0.01, "init": "noise"},
        training={"seed": 0},
    )
    return encode_checkpoint(Checkpoint(config, build_model(arch).state_dict()))


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file a pickle payload of the hostile starting points creates."""
    return tmp_path_factory.mktemp("marker") / "ran"


class Bases(dict[str, tuple[str, bytes]]):
    """name -> (suffix, bytes), shown by name only in hypothesis' reports."""

    def __repr__(self) -> str:
        return f"Bases({', '.join(self)})"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, marker: Path) -> Bases:
    """Starting points: name -> (suffix, bytes). The good program and checkpoint, and two archives that run
    code under torch.export.load (read two ways by two zip readers; pickled sample inputs)."""
    directory = tmp_path_factory.mktemp("bases")
    program = tiny_program(directory / "tiny.pt2")
    pickled_inputs = replaced(records(program), {"data/sample_inputs/model.pt": pickled_marker(marker)})
    return Bases(
        program=(".pt2", program.read_bytes()),
        two_views=(".pt2", two_views(program, marker)),
        pickled_inputs=(".pt2", zip_archive(pickled_inputs)),
        checkpoint=(".safetensors", tiny_checkpoint()),
    )


def mutate(payload: bytes, suffix: str, kind: str, rng: random.Random) -> bytes:
    """One mutation of a file: flipped bytes (anywhere, or where its structure lies), truncation, data
    appended or prepended, entries reordered, bytes flipped inside one zip record with its CRC made good, or
    one value of its JSON (the graph, a payload config, a checkpoint's config) replaced by a hostile one."""
    data = bytearray(payload)
    structure = _structure(payload, suffix)
    if kind in ("flip", "flip_structure"):
        for _ in range(rng.randint(1, 4)):
            low, high = structure if kind == "flip_structure" else (0, len(data))
            position = rng.randrange(low, high)
            data[position] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == "truncate":
        return bytes(data[: rng.randrange(len(data))])
    if kind == "append":
        return bytes(data) + rng.randbytes(rng.randint(1, 64))
    if kind == "prepend":
        return rng.choice([b"PK\x03\x04", b"\0" * 8, rng.randbytes(16)]) + bytes(data)
    if kind == "reorder":
        return _reordered(payload, suffix, rng)
    if kind == "json":
        return _json_mutated(payload, suffix, rng)
    return _record_flipped(payload, suffix, rng)


def _structure(payload: bytes, suffix: str) -> tuple[int, int]:
    """Where the bytes that describe the file lie: a safetensors header, a zip's directory and end records."""
    if suffix == ".safetensors":
        return 0, 8 + int.from_bytes(payload[:8], "little")
    return max(0, len(payload) - 2048), len(payload)


def _reordered(payload: bytes, suffix: str, rng: random.Random) -> bytes:
    if suffix == ".safetensors":  # the header's keys in another order, every offset kept
        size = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8 : 8 + size])
        keys = list(header)
        rng.shuffle(keys)
        text = json.dumps({key: header[key] for key in keys}).encode()
        text += b" " * (size - len(text)) if len(text) <= size else b""
        return len(text).to_bytes(8, "little") + text + payload[8 + size :]
    entries = _entries(payload)
    rng.shuffle(entries)
    return zip_archive(entries)


def _record_flipped(payload: bytes, suffix: str, rng: random.Random) -> bytes:
    if suffix == ".safetensors":
        return mutate(payload, suffix, "flip_structure", rng)
    entries = _entries(payload)
    index = rng.randrange(len(entries))
    content = bytearray(entries[index].data)
    for _ in range(rng.randint(1, 3)):
        if content:
            content[rng.randrange(len(content))] = rng.choice(b'0123456789{}[]":,-aez ')
    entries[index] = Entry(entries[index].name, bytes(content))
    return zip_archive(entries)


HOSTILE_VALUES = [
    None, True, -1, 0, 2**31, 2**63, 10**30, 1.5, float("nan"), "", "x" * 300, "Pow(10, 100000000)",
    "__import__('os').system('true')", "s0", "torch.ops.aten.add.Tensor", [], {}, [[[]]], {"as_int": -1},
    {"as_expr": {"expr_str": "s0"}}, {"as_int": 2**40}, [{"as_int": 3}] * 20,
]  # fmt: skip


def _replace_a_value(value: object, rng: random.Random) -> object:
    """The JSON value with one of its values, anywhere inside, replaced by one of HOSTILE_VALUES."""
    paths: list[tuple] = []

    def walk(node: object, path: tuple) -> None:
        paths.append(path)
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, child in children:
            walk(child, (*path, key))

    walk(value, ())
    path = rng.choice(paths[1:] or paths)
    if not path:
        return rng.choice(HOSTILE_VALUES)
    parent = value
    for key in path[:-1]:
        parent = parent[key]  # type: ignore[index]
    parent[path[-1]] = rng.choice(HOSTILE_VALUES)  # type: ignore[index]
    return value


def _json_mutated(payload: bytes, suffix: str, rng: random.Random) -> bytes:
    if suffix == ".safetensors":  # the config in the header's metadata; the header rewritten to its new length
        size = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8 : 8 + size])
        config = _replace_a_value(json.loads(header["__metadata__"]["config"]), rng)
        header["__metadata__"]["config"] = json.dumps(config)
        text = json.dumps(header).encode()
        return len(text).to_bytes(8, "little") + text + payload[8 + size :]
    entries = _entries(payload)
    candidates = [index for index, entry in enumerate(entries) if entry.name.endswith(".json")]
    index = rng.choice(candidates)
    document = _replace_a_value(json.loads(entries[index].data), rng)
    entries[index] = Entry(entries[index].name, json.dumps(document).encode())
    return zip_archive(entries)


def _entries(payload: bytes) -> list[Entry]:
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        return [Entry(info.filename, archive.read(info)) for info in archive.infolist()]


def load_both_ways(path: Path) -> None:
    """The file through the CLI's loader (loaded, or a CheckpointError) and through the server's registry,
    which loads each file on its own (served, or refused with a reason)."""
    try:
        load_model(path)
    except CheckpointError as error:
        assert str(error).strip(), "a refusal must say why"
    served = load_registry(path.parent, CPU)
    assert path.stem in served.models or served.refused[path.name].strip()


KINDS = ["flip", "flip_structure", "truncate", "append", "prepend", "reorder", "record", "json", "json", "json"]


@settings(RUN, max_examples=600)
@given(
    base=st.sampled_from(["program", "two_views", "pickled_inputs"]),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_mutated_program_loads_or_is_refused_and_never_runs_code(
    bases: Bases,
    marker: Path,
    tmp_path_factory: pytest.TempPathFactory,
    base: str,
    kind: str,
    seed: int,
) -> None:
    suffix, payload = bases[base]
    directory = tmp_path_factory.mktemp("mutant")
    path = directory / f"mutant{suffix}"
    path.write_bytes(mutate(payload, suffix, kind, random.Random(seed)))
    path.with_suffix(".json").write_text(
        json.dumps({"family": "ebm", "data": {"shape": list(TINY_SHAPE)}, "sampler": {"steps": 2}})
    )
    load_both_ways(path)
    assert not marker.exists(), "a pickle payload ran"


@settings(RUN, max_examples=800)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1))
def test_a_mutated_checkpoint_loads_or_is_refused(
    bases: Bases, tmp_path_factory: pytest.TempPathFactory, kind: str, seed: int
) -> None:
    suffix, payload = bases["checkpoint"]
    path = tmp_path_factory.mktemp("mutant") / f"mutant{suffix}"
    path.write_bytes(mutate(payload, suffix, kind, random.Random(seed)))
    load_both_ways(path)
