"""`python -m training fetch-data` against a local HTTP mirror, as a user behind a proxy would point it at one:
verified files land and load, a second run downloads nothing, a corrupted file is deleted with a checksum error;
MNIST is checked by SHA-256, Fashion-MNIST by the MD5s Zalando publishes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from hostile_http import Respond, hostile_server

from training.commands import fetch_data
from training.commands.cli import main
from training.train.data import load_dataset

FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class CountingHandler(SimpleHTTPRequestHandler):
    requests: ClassVar[list[str]] = []  # paths asked for, across the server's threads

    def do_GET(self) -> None:
        CountingHandler.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        pass


@contextlib.contextmanager
def serve_mirror(
    idx_dir: Path, served: Path, monkeypatch: pytest.MonkeyPatch, dataset: str, algorithm: str
) -> Iterator[str]:
    """A threaded HTTP server over a copy of the tiny IDX files, whose digests (by the dataset's publisher's
    algorithm) stand in for the published ones."""
    shutil.copytree(idx_dir, served)
    table = {name: (algorithm, hashlib.new(algorithm, (served / name).read_bytes()).hexdigest()) for name in FILES}
    monkeypatch.setitem(fetch_data.CHECKSUMS, dataset, table)
    monkeypatch.setitem(fetch_data.SIZES, dataset, {name: (served / name).stat().st_size for name in FILES})
    CountingHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def mirror(idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "mirror"
    with serve_mirror(idx_dir, served, monkeypatch, "mnist", "sha256") as url:
        yield url, served


def test_fetch_data_downloads_verified_files_that_train_and_skips_them_the_second_time(
    mirror: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = mirror
    data = tmp_path / "data"
    main(["fetch-data", "mnist", "--dir", str(data), "--mirror", url])
    assert sorted(path.name for path in data.iterdir()) == sorted(FILES)  # no .part left behind
    assert len(load_dataset("mnist", str(data), "train").images) == 512
    assert len(CountingHandler.requests) == 4
    assert "checksum verified" in capsys.readouterr().err

    main(["fetch-data", "mnist", "--dir", str(data), "--mirror", url])
    assert len(CountingHandler.requests) == 4  # nothing downloaded again
    assert capsys.readouterr().err.count("already there, checksum verified") == 4


def test_a_corrupted_file_is_deleted_and_the_command_fails_naming_it(
    mirror: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, served = mirror
    labels = served / "t10k-labels-idx1-ubyte.gz"
    damaged = bytearray(labels.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    labels.write_bytes(bytes(damaged))
    data = tmp_path / "data"
    with pytest.raises(SystemExit) as exit_info:
        main(["fetch-data", "mnist", "--dir", str(data), "--mirror", url])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.splitlines()[-1]
    assert "t10k-labels-idx1-ubyte.gz" in error and "checksum" in error
    assert sorted(path.name for path in data.iterdir()) == sorted(FILES[:3])  # the bad one (and its .part) is gone


def test_a_copy_already_on_disk_that_does_not_match_is_downloaded_again(
    mirror: tuple[str, Path], tmp_path: Path
) -> None:
    url, served = mirror
    data = tmp_path / "data"
    data.mkdir()
    (data / FILES[0]).write_bytes(b"an interrupted download from somewhere else")
    main(["fetch-data", "mnist", "--dir", str(data), "--mirror", url])
    assert (data / FILES[0]).read_bytes() == (served / FILES[0]).read_bytes()


def test_a_mirror_without_the_files_fails_with_the_url_and_what_to_do(
    mirror: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = mirror
    with pytest.raises(SystemExit) as exit_info:
        main(["fetch-data", "mnist", "--dir", str(tmp_path / "data"), "--mirror", url + "elsewhere/"])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert f"{url}elsewhere/train-images-idx3-ubyte.gz" in error and "--mirror" in error


def test_fashion_mnist_is_checked_by_md5_and_a_corrupted_copy_is_still_refused(
    idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Zalando publishes MD5s, so the files whose MD5 matches are accepted (the SHA-256 table this replaced
    refused the real ones), and a damaged one is still deleted."""
    assert {algorithm for algorithm, _ in fetch_data.CHECKSUMS["fashion-mnist"].values()} == {"md5"}
    served = tmp_path / "mirror"
    with serve_mirror(idx_dir, served, monkeypatch, "fashion-mnist", "md5") as url:
        main(["fetch-data", "fashion-mnist", "--dir", str(tmp_path / "good"), "--mirror", url])
        assert sorted(path.name for path in (tmp_path / "good").iterdir()) == sorted(FILES)
        images = served / FILES[0]
        damaged = bytearray(images.read_bytes())
        damaged[-1] ^= 0xFF  # the same size: the checksum, not the size cap, refuses it
        images.write_bytes(bytes(damaged))
        with pytest.raises(SystemExit) as exit_info:
            main(["fetch-data", "fashion-mnist", "--dir", str(tmp_path / "bad"), "--mirror", url])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.splitlines()[-1]
    assert FILES[0] in error and "failed its checksum: MD5" in error
    assert not (tmp_path / "bad" / FILES[0]).exists() and not (tmp_path / "bad" / f"{FILES[0]}.part").exists()


def test_every_dataset_lists_a_checksum_for_each_of_its_four_files() -> None:
    lengths = {"sha256": 64, "md5": 32}
    for dataset, table in fetch_data.CHECKSUMS.items():
        assert sorted(table) == sorted(FILES), dataset
        for algorithm, digest in table.values():
            assert len(digest) == lengths[algorithm] and int(digest, 16) >= 0, (dataset, digest)
        assert fetch_data.MIRRORS[dataset], dataset


# --- a hostile mirror (issue 37, item 9): each failure one line, exit 2, no part file left, nothing outside written --


def test_every_published_file_has_a_size_to_cap_its_download_at() -> None:
    assert {dataset: set(files) for dataset, files in fetch_data.SIZES.items()} == {
        dataset: set(files) for dataset, files in fetch_data.CHECKSUMS.items()
    }


def part_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.endswith(".part"))


def fails_in_one_line(url: str, data: Path, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fetch-data", "mnist", "--dir", str(data), "--mirror", url])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: could not download train-images-idx3-ubyte.gz: ") and url in last
    return last


def test_a_part_link_planted_in_the_directory_is_not_written_through(mirror: tuple[str, Path], tmp_path: Path) -> None:
    url, served = mirror
    data, outside = tmp_path / "data", tmp_path / "outside.txt"
    data.mkdir()
    outside.write_text("not yours to write")
    for name in FILES:
        (data / (name + ".part")).symlink_to(outside)
    main(["fetch-data", "mnist", "--dir", str(data), "--mirror", url])
    assert outside.read_text() == "not yours to write"
    assert all((data / name).read_bytes() == (served / name).read_bytes() for name in FILES)
    assert part_files(data) == sorted(name + ".part" for name in FILES)  # the planted links, untouched


def serve_hostile(respond: Respond, monkeypatch: pytest.MonkeyPatch, size: int = 1000):  # type: ignore[no-untyped-def]
    """A hostile mirror; each file's published size is `size` bytes (checksums never matter: it fails first)."""
    sizes = {name: size for name in FILES}
    monkeypatch.setitem(fetch_data.SIZES, "mnist", sizes)
    return hostile_server(respond)


def endless_body() -> Respond:
    """A body without a length, to be read until the connection closes: it never does."""

    async def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
        for _ in range(1 << 18):  # 16 GiB at most: an endless body to the client
            writer.write(b"\0" * 65536)
            await writer.drain()

    return respond


def raw(data: bytes) -> Respond:
    async def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return respond


@pytest.mark.parametrize(
    ("respond", "says"),
    [
        (endless_body(), "more than the 1,000 bytes of the published file"),
        (raw(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"\0" * 10), "ended after 10 of the file's 1,000"),
        (raw(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3e8\r\n" + b"\0" * 10), "IncompleteRead"),
        (raw(b"SPEAKING NOT HTTP\r\n\r\n"), "SPEAKING NOT HTTP"),
        (raw(b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n" + b"\0" * 1000), "Content-Length that is not a number"),
        (raw(b"HTTP/1.1 200 OK\r\ncontent-length: 99999999\r\n\r\n"), "a Content-Length of 99,999,999 bytes"),
    ],
    ids=[
        "endless",
        "cut body",
        "cut chunk",
        "garbage status line",
        "length abc",
        "too long",
    ],
)
def test_every_network_failure_is_one_line_and_leaves_no_part_file(
    respond: Respond, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    with serve_hostile(respond, monkeypatch) as (url, _):
        error = fails_in_one_line(url + "/", data, capsys)
    assert says in error
    assert list(data.iterdir()) == []  # no part file, no 0-byte file
