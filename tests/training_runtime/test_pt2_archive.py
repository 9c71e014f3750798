"""Hostile torch.export archives, each built here byte by byte: loading one runs no code (a pickle payload
would create a marker file), takes bounded time and memory, and ends in a CheckpointError naming what is
wrong; a server with all of them in its models directory serves the good program beside them."""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import torch
from hostile_archives import (
    Entry,
    deflate_bomb,
    end_record,
    local_entries,
    pickled_marker,
    records,
    replaced,
    tiny_program,
    two_views,
    zip_archive,
)
from server import running_server

from service.catalogue.registry import load_registry
from service.settings import Settings
from training.commands.cli import main
from training.runtime import pt2_archive, pt2_graph, pt2_zip
from training.runtime.checkpoint import CheckpointError
from training.runtime.exported import read_program
from training.runtime.load import load_model


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_program(tmp_path_factory.mktemp("plain") / "plain.pt2")


def write_beside(path: Path, payload: bytes) -> Path:
    """The archive at path, with the good program's sidecar beside it."""
    path.write_bytes(payload)
    path.with_suffix(".json").write_text(json.dumps({"family": "ebm", "data": {"shape": [1, 2, 2]}, "sampler": {}}))
    return path


def graph_of(plain: Path) -> dict:
    return json.loads(next(entry.data for entry in records(plain) if entry.name.endswith("models/model.json")))


def with_graph(plain: Path, graph: dict) -> bytes:
    return zip_archive(replaced(records(plain), {"models/model.json": json.dumps(graph).encode()}))


def with_expression(plain: Path, expression: str) -> bytes:
    """The program with every symbolic size it writes replaced by `expression`."""
    text = json.dumps(graph_of(plain))
    symbol = "Symbol('s77', positive=True, integer=True)"
    assert symbol in text, "the tiny program's batch symbol moved; update the test"
    return with_graph(plain, json.loads(text.replace(json.dumps(symbol), json.dumps(expression))))


def test_an_archive_two_zip_readers_see_differently_runs_nothing(plain: Path, tmp_path: Path) -> None:
    """torch's miniz reader sees a program of a future schema, which load_pt2 refuses; torch.export.load then
    reads the file again through Python's zipfile, sees the pre-2.8 format and unpickles its constants."""
    marker = tmp_path / "ran"
    crafted = write_beside(tmp_path / "two_views.pt2", two_views(plain, marker))
    with pytest.raises(CheckpointError, match="the end record says the central directory starts at"):
        read_program(crafted.read_bytes(), crafted.name)
    with pytest.raises(CheckpointError, match="central directory"):
        load_model(crafted)
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(crafted), "--n", "1", "--out", str(tmp_path / "grid.png")])
    assert exit_info.value.code == 2
    assert not marker.exists()
    with contextlib.suppress(Exception):
        torch.export.load(crafted)  # what the check stands in front of
    assert marker.exists()


def zip_variants(plain: Path) -> dict[str, bytes]:
    """The tiny program laid out in ways two zip readers (or one reader and the file's own claims) could read
    differently; each archive's entries are otherwise the good program's."""
    entries = records(plain)
    body, directory = local_entries(entries, 0)
    count, size = len(entries), len(directory)
    shifted_body, shifted_directory = local_entries(entries, 64)
    first_end = 30 + len(entries[0].name) + len(entries[0].data)
    gap_body, gap_directory = local_entries(entries[:1], 0)
    rest_body, rest_directory = local_entries(entries[1:], first_end + 16)
    inner_body, inner_directory = local_entries(entries[1:2], 30 + len("outer"))
    outer_body, outer_directory = local_entries([Entry("outer", inner_body)], 0)
    overlap_directory = outer_directory + inner_directory
    deflated = replaced(entries, {"models/model.json": deflate_bomb(b"{}", 2 + (1 << 20))})
    deflated_body, deflated_directory = local_entries(deflated, 0)
    zip64_end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, size, len(body), 0)
    return {
        "stated offset": body + b"\0" * 16 + directory + end_record(count, size, len(body)),
        "prepended": b"\0" * 64 + shifted_body + shifted_directory + end_record(count, size, 64 + len(body)),
        "appended": body + directory + end_record(count, size, len(body)) + b"trailing",
        "gap": gap_body
        + b"\0" * 16
        + rest_body
        + gap_directory
        + rest_directory
        + end_record(count, size, first_end + 16 + len(rest_body)),
        "duplicate": zip_archive([*entries, entries[-1]]),
        "overlap": outer_body + overlap_directory + end_record(2, len(overlap_directory), len(outer_body)),
        "count": body + directory + end_record(count - 1, size, len(body)),
        "zip64": body + directory + zip64_end,
        "compressed": deflated_body + deflated_directory + end_record(count, size, len(deflated_body)),
    }


ZIP_REASONS = {
    "stated offset": "the end record says the central directory starts at",
    "prepended": "bytes before the first entry",
    "appended": "the end record is not at the end",
    "gap": "bytes between entries",
    "duplicate": "names .* twice",
    "overlap": "overlap",
    "count": "the end record counts",
    "zip64": "zip64",
    "compressed": "compressed",
}


@pytest.mark.parametrize("variant", list(ZIP_REASONS))
def test_a_zip_two_readers_could_read_differently_is_refused(variant: str, plain: Path) -> None:
    with pytest.raises(CheckpointError, match=ZIP_REASONS[variant]):
        read_program(zip_variants(plain)[variant], f"{variant}.pt2")


def test_the_good_program_still_loads_from_every_zip_writer(plain: Path) -> None:
    """torch's own layout (64-byte aligned, data descriptors, zip64 end records) and a plain zipfile one."""
    read_program(plain.read_bytes(), plain.name)
    read_program(zip_archive(records(plain)), "rewritten.pt2")
    reordered = records(plain)
    read_program(zip_archive(reordered[::-1]), "reordered.pt2")


@pytest.mark.timeout(60)  # sympy would evaluate the first of these for hours
@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("Max(Symbol('s77', positive=True, integer=True), Pow(10, 100000000))", "'Pow'.* is not shape arithmetic"),
        ("Symbol('s77', positive=True, integer=True)**Integer(100000000)", r"powers \(\*\*\)"),
        ("Max(Symbol('s77', positive=True, integer=True), Integer(10000000000))", "10000000000 is over 2\\*\\*31"),
        ("Mul(Float('1e400'), Symbol('s77', positive=True, integer=True))", "'Float'.* is not shape arithmetic"),
        ("Symbol('s77', positive=True, integer=True).__class__", "not a shape expression"),
        ("Max(Min(s77, s1), Min(s77, 3), Min(s1, 5), Min(s77, 7))", "makes 5 calls on 2 symbols"),
        ("Add(s77, s1, s2)", "makes 1 calls on 3 symbols"),
    ],
)
def test_shape_expressions_past_plain_shape_arithmetic_are_refused(plain: Path, expression: str, reason: str) -> None:
    with pytest.raises(CheckpointError, match=reason):
        read_program(with_expression(plain, expression), "expression.pt2")


def test_the_shape_arithmetic_an_export_writes_still_loads(plain: Path) -> None:
    """Products, sums, floor divisions and bounds of the batch symbol, as exports of reshapes and slices write."""
    symbol = "Symbol('s77', positive=True, integer=True)"
    for expression in (f"Mul(Integer(196), {symbol})", f"Max(Integer(1), FloorDiv(Add({symbol}, Integer(-1)), 1))"):
        graph = graph_of(plain)
        graph["graph_module"]["graph"]["sym_int_values"] = {"extra": {"as_expr": {"expr_str": expression}}}
        pt2_graph.check_graph_json(graph, "", "expression.pt2")


MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    from training.runtime.checkpoint import CheckpointError
    from training.runtime.exported import read_program
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reasons = {}
    for path in sys.argv[1:]:
        with open(path, "rb") as handle:
            payload = handle.read()
        try:
            read_program(payload, path)
            reasons[path] = None
        except CheckpointError as error:
            reasons[path] = str(error)
        del payload
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"reasons": reasons, "grown_mib": (peak - before) / 1024}))
    """
)


def test_archives_that_would_allocate_gibibytes_are_refused_in_bounded_memory(plain: Path, tmp_path: Path) -> None:
    """A 1 MB archive whose weight deflates to 1 GiB; an empty record beside a config claiming 2**27 complex128
    values (2 GiB); a record 4 bytes short of its shape. Measured in a fresh process: its peak memory grows by
    less than the smallest of them would take."""
    entries = records(plain)
    root = entries[0].name.split("/")[0]
    weights = next(entry for entry in entries if entry.name.endswith("weights/weight_0"))
    config = json.loads(next(entry.data for entry in entries if entry.name.endswith("model_weights_config.json")))
    fqn = next(name for name, meta in config["config"].items() if meta["path_name"] == "weight_0")
    huge = {
        **config["config"][fqn]["tensor_meta"],
        "dtype": 11,
        "sizes": [{"as_int": 2**27}],
        "strides": [{"as_int": 1}],
    }
    config["config"][fqn]["tensor_meta"] = huge  # 11: complex128
    files = {
        "bomb": replaced(entries, {"data/weights/weight_0": deflate_bomb(weights.data, len(weights.data) + (1 << 30))}),
        "complex": replaced(
            entries,
            {"data/weights/weight_0": b"", "data/weights/model_weights_config.json": json.dumps(config).encode()},
        ),
        "short": replaced(entries, {"data/weights/weight_0": weights.data[:-4]}),
    }
    paths = []
    for name, archive in files.items():
        path = tmp_path / f"{name}.pt2"
        path.write_bytes(zip_archive(archive))
        paths.append(str(path))
    assert all(entry.name.startswith(root) for entry in files["bomb"])
    assert (tmp_path / "bomb.pt2").stat().st_size < 2**21
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *paths], capture_output=True, text=True, check=True, timeout=120
    )
    measured = json.loads(result.stdout.splitlines()[-1])
    reasons = measured["reasons"]
    assert "compressed" in reasons[paths[0]], reasons
    assert "complex128 claims 2,147,483,648 bytes" in reasons[paths[1]], reasons
    assert "holds 12 bytes" in reasons[paths[2]], reasons
    assert measured["grown_mib"] < 100, measured


def test_declared_bytes_past_the_archive_cap_are_refused(plain: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap counts every tensor record's bytes together; one record past its own cap is refused too."""
    monkeypatch.setattr(pt2_archive, "MAX_TENSOR_BYTES", 16)
    with pytest.raises(CheckpointError, match="tensor bytes in all; at most 16"):
        read_program(plain.read_bytes(), plain.name)
    monkeypatch.setattr(pt2_archive, "MAX_RECORD_BYTES", 8)
    with pytest.raises(CheckpointError, match="at most 8 bytes per record"):
        read_program(plain.read_bytes(), plain.name)


def test_an_archive_of_too_many_entries_is_refused_before_it_is_read(plain: Path) -> None:
    entries = records(plain)
    root = entries[0].name.split("/")[0]
    padding = [Entry(f"{root}/extra/pad{index}", b"") for index in range(pt2_zip.MAX_ENTRIES)]
    with pytest.raises(CheckpointError, match=f"entries; at most {pt2_zip.MAX_ENTRIES:,}"):
        read_program(zip_archive([*entries, *padding]), "many.pt2")


def test_pickled_legacy_records_and_sample_inputs_are_refused_without_running(plain: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    entries = records(plain)
    crafted = {
        "legacy weights": {"data/weights/model.pt": pickled_marker(marker)},
        "sample inputs": {"data/sample_inputs/model.pt": pickled_marker(marker)},
    }
    reasons = {"legacy weights": "data/weights/model.pt: not part of", "sample inputs": "is not plain tensors"}
    for name, changes in crafted.items():
        with pytest.raises(CheckpointError, match=reasons[name]):
            read_program(zip_archive(replaced(entries, changes)), f"{name}.pt2")
        assert not marker.exists(), name


@pytest.mark.timeout(120)
def test_a_server_beside_every_hostile_archive_serves_the_good_program(plain: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    models = tmp_path / "models"
    models.mkdir()
    write_beside(models / "good.pt2", plain.read_bytes())
    entries = records(plain)
    weights = next(entry for entry in entries if entry.name.endswith("weights/weight_0"))
    hostile = {
        "two_views": two_views(plain, marker),
        "power": with_expression(plain, "Max(Symbol('s77', positive=True, integer=True), Pow(10, 100000000))"),
        "bomb": zip_archive(
            replaced(entries, {"data/weights/weight_0": deflate_bomb(weights.data, len(weights.data) + (1 << 30))})
        ),
        "pickled_inputs": zip_archive(replaced(entries, {"data/sample_inputs/model.pt": pickled_marker(marker)})),
    }
    for name, payload in hostile.items():
        write_beside(models / f"{name}.pt2", payload)
    registry = load_registry(models, torch.device("cpu"))
    assert set(registry.models) == {"good"} and set(registry.refused) == {f"{name}.pt2" for name in hostile}
    settings = Settings(models_dir=models, state_dir=tmp_path / "state", device="cpu")
    with running_server(settings) as (base, _):
        refused = httpx.get(f"{base}/readyz").json()["refused"]
        assert set(refused) == {f"{name}.pt2" for name in hostile}
        assert "central directory" in refused["two_views.pt2"] and "Pow" in refused["power.pt2"]
        reply = httpx.post(f"{base}/sample", json={"model": "good", "n": 2, "seed": 1, "format": "json"})
        assert reply.status_code == 200 and len(reply.json()["images"]) == 2
    assert not marker.exists()
